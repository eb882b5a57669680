"""sft: supervised fine-tuning of LLMs from one validated job spec, on PyTorch or MindSpore.

Core (this package) imports no ML framework: it validates configs, loads plugins, prepares
tokenized data and hands a `TrainPlan` to a backend. See README.md for the tour.
"""

from sft.hookspecs import hookimpl

__all__ = ["__version__", "hookimpl"]
__version__ = "0.1.0"
