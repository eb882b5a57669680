"""`sft_torch.imports.long_lived_imports`: the backend's heavy imports run with the garbage
collector paused and are frozen afterwards (start-up time: docs/performance.md).

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_imports_gc.py

Each case runs in a fresh interpreter: freezing is process-wide and cannot be undone for one test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.torch


def run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_imports_are_frozen_and_no_collection_runs_while_they_load() -> None:
    out = run(
        """
        import gc, weakref
        from sft_torch.imports import long_lived_imports

        class Node:
            pass

        before = Node(); before.me = before  # cyclic garbage made before the block
        dead = weakref.ref(before); del before
        collections = []
        with long_lived_imports("email.mime.multipart"):  # collects before the imports
            gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info))
            for _ in range(50000):  # enough allocations to start collections if it could
                n = Node(); n.me = n
            import email.mime.multipart  # noqa: F401
        print(dead() is None, len(collections), gc.isenabled(), gc.get_freeze_count() > 50000)
        """
    )
    assert out == "True 0 True True"


def test_a_second_time_it_changes_nothing() -> None:
    """Modules already imported: no collection, no freeze (which would keep the garbage a long
    process such as a test session has made since, for good)."""
    out = run(
        """
        import gc, json
        from sft_torch.imports import long_lived_imports

        gc.disable()
        with long_lived_imports("json"):
            pass
        print(gc.get_freeze_count(), gc.isenabled())
        """
    )
    assert out == "0 False"
