"""Operator scripts (the memory/FLOPs planner); run them as files, e.g. `python tools/planner.py
--help`."""
