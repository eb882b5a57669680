"""MindSpore backend for sft (MindFormers). Importing this package imports no mindspore."""
