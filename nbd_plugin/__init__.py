"""nbdkit Python plugin that serves a blockrep volume (see plugin.py)."""
