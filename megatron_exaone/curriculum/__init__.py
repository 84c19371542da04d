"""Curriculum stages by token budget: data mixture, sequence length, batch size, LR phase and loss
weights."""

from .schedule import Curriculum, CurriculumError, Gate, LRPhase, Stage, StepPlan

__all__ = ["Curriculum", "CurriculumError", "Gate", "LRPhase", "Stage", "StepPlan"]
