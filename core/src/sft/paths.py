"""Where sft keeps things: `$SFT_CACHE_DIR` (default `~/.cache/sft`) holds converted models and
tokenized data caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SFT_CACHE_DIR") or Path.home() / ".cache" / "sft")
