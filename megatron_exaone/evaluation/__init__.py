"""Evaluation: validation loss / perplexity / bits per byte and the needle-in-a-haystack gate."""

from .evaluator import Evaluator
from .gates import gate_failures

__all__ = ["Evaluator", "gate_failures"]
