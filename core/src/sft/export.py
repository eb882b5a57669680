"""Export contract: turn a finished run into something to ship, and verify it.

Exporters are registered by plugins (`sft_register_exporters`): the torch backend provides
`hf` (merged safetensors) and `adapter`, the MindSpore backend `ckpt`, the GGUF plugin `gguf`.
Each one verifies what it wrote and says what it checked in its report.

    $ sft export runs/smollm2-135m-lora --format gguf --dtype q8_0 --out exports/
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sft.errors import SftError


@dataclass
class ExportRequest:
    run_dir: Path
    """A finished run directory (holds `final/` and `config.yaml`), or a plain HF model dir."""
    out: Path
    """Where to write."""
    dtype: str = "f16"
    """f32 | f16 | bf16 | q8_0 (exporters refuse what they cannot write)."""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportReport:
    format: str
    path: str
    """The main file or directory written."""
    checks: dict[str, Any] = field(default_factory=dict)
    """What was verified, with numbers (e.g. max_abs_logit_diff, tensors_compared)."""
    ok: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def run_export(fmt: str, request: ExportRequest) -> ExportReport:
    """Run a registered exporter; a failed verification raises."""
    from sft.plugins import get_plugins

    exporter = get_plugins().exporters.get(fmt)
    request.out.mkdir(parents=True, exist_ok=True)
    report: ExportReport = exporter.fn(request)
    (request.out / f"export-{fmt}.json").write_text(report.to_json())
    if not report.ok:
        raise SftError(f"export {fmt!r} failed its verification: {report.checks}")
    return report
