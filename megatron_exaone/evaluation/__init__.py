"""Evaluation: validation loss / perplexity / bits per byte and the needle-in-a-haystack gate."""

from .evaluator import EvalSetupError, Evaluator
from .gates import gate_failures

__all__ = ["EvalSetupError", "Evaluator", "gate_failures"]
