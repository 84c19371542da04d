"""Thin command-line entry points (argument parsing only)."""
