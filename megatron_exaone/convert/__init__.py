"""Conversion between training checkpoints and Hugging Face format."""
