"""PyTorch backend for sft (transformers + peft). Importing this package imports no torch."""
