"""Fuzz tests run twice: on a fixed corpus and on a fresh seed.

    @fuzz(FUZZ, fresh_examples=100, edits=st.lists(...))
    def test_mutated_configs_fail_clearly(workdir, edits): ...
    test_mutated_configs_fail_clearly_fresh_seed = test_mutated_configs_fail_clearly.fresh_seed

The first is `@FUZZ @given(...)` as written, with `derandomize=True`: the same examples every run,
so CI is stable and a regression on them is seen at once. The second draws `fresh_examples`
new ones from this session's seed, so every run explores something new. The seed is printed in
pytest's header ("fuzz seed: N") and on a failure; `SFT_FUZZ_SEED=N pytest ...` replays it.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Callable
from typing import Any

from hypothesis import given, note, seed, settings

SEED = int(os.environ.get("SFT_FUZZ_SEED") or secrets.randbelow(2**32))


def fuzz(fixed: settings, fresh_examples: int, *args: Any, **kwargs: Any) -> Callable:
    """`given(*args, **kwargs)` under `fixed` (derandomized); `.fresh_seed` holds the twin."""

    def deco(body: Callable) -> Callable:
        fixed_test = fixed(given(*args, **kwargs)(body))

        @functools.wraps(body)
        def noted(*a: Any, **k: Any) -> Any:
            note(f"fresh-seed fuzz example: replay with SFT_FUZZ_SEED={SEED}")
            return body(*a, **k)

        fresh = settings(fixed, derandomize=False, max_examples=fresh_examples, database=None)
        fixed_test.fresh_seed = seed(SEED)(fresh(given(*args, **kwargs)(noted)))
        return fixed_test

    return deco
