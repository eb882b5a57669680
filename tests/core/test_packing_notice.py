"""`data.packing: auto` is said out loud at plan time (issue #22): backends resolve it differently
(torch packs, mindspore cannot), and packed steps hold other samples than unpacked ones, so the
same spec must not silently train different batches on two backends.

    $ .venvs/core/bin/python -m pytest tests/core/test_packing_notice.py
"""

from __future__ import annotations

from types import SimpleNamespace

from sft.run import packing_notice, resolve_packing
from sft.specs import RunConfig

PACKS = SimpleNamespace(name="torch", capabilities=frozenset({"packing"}))
NO_PACKING = SimpleNamespace(name="mindspore", capabilities=frozenset({"lora"}))


def spec(packing: object) -> RunConfig:
    return RunConfig.model_validate(
        {"model": "m", "data": {"train": "t.jsonl", "packing": packing}}
    )


def test_auto_names_what_it_became_and_how_to_get_identical_batches():
    cfg = spec("auto")
    on, off = resolve_packing(cfg, PACKS, None), resolve_packing(cfg, NO_PACKING, None)
    assert (on, off) == (True, False)
    packed = packing_notice(cfg, PACKS, on)
    unpacked = packing_notice(cfg, NO_PACKING, off)
    assert packed and "packed rows on backend 'torch'" in packed
    assert unpacked and "no packing on backend 'mindspore'" in unpacked
    for text in (packed, unpacked):
        assert "data.packing: false" in text and "identical batches" in text


def test_an_explicit_choice_is_the_same_everywhere_and_needs_no_notice():
    for value in (True, False):
        cfg = spec(value)
        assert resolve_packing(cfg, PACKS, None) is value
        assert packing_notice(cfg, PACKS, value) is None
