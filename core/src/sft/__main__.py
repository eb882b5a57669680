"""`python -m sft ...` (also what `torchrun -m sft run ...` starts on each process)."""

from sft.cli import main

raise SystemExit(main())
