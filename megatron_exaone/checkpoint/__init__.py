"""Reshardable DCP checkpoints with atomic visibility."""
