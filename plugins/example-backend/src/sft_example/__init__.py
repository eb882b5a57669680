"""A template third-party backend for sft (see plugin.py)."""
