"""`mindspore.device_target: auto` never falls back to the CPU silently on an NPU machine.

MindSpore finds Ascend devices through CANN's runtime; a machine whose CANN environment was not
sourced still has the NPU device nodes (/dev/davinciN) and the driver's npu-smi. The device
nodes are faked here with files matched by the same glob (this machine has no NPU).

    $ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_device.py
"""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("mindspore")

from sft.config import load_config
from sft.errors import ConfigError
from sft_mindspore import plugin, runtime

pytestmark = pytest.mark.mindspore


def _job(tmp_path, device="auto"):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "backend": "mindspore",
                "model": str(tmp_path),
                "data": {"train": "d.jsonl"},
                "mindspore": {"device_target": device},
            }
        )
    )
    return path


@pytest.fixture
def no_cann(monkeypatch):
    for key in ("ASCEND_HOME_PATH", "ASCEND_OPP_PATH", "ASCEND_TOOLKIT_HOME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no npu-smi


def test_auto_is_cpu_without_npus(no_cann, monkeypatch, tmp_path):
    monkeypatch.setattr(runtime, "ASCEND_DEVICE_GLOB", str(tmp_path / "davinci[0-9]*"))
    assert runtime.resolve_device(plugin.MindSporeOptions()) == "CPU"


def test_auto_on_an_npu_host_without_cann_is_a_config_error(no_cann, monkeypatch, tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "davinci0").touch()
    monkeypatch.setattr(runtime, "ASCEND_DEVICE_GLOB", str(tmp_path / "dev" / "davinci[0-9]*"))
    with pytest.raises(ConfigError) as info:
        load_config(_job(tmp_path))
    (problem,) = [p for p in info.value.problems if p.path == "mindspore.device_target"]
    assert "set_env.sh" in problem.message and "davinci0" in problem.message
    # an explicit CPU is the user's choice, not a fallback
    assert runtime.resolve_device(plugin.MindSporeOptions(device_target="CPU")) == "CPU"


def test_auto_with_cann_sourced_is_ascend(monkeypatch):
    monkeypatch.setenv("ASCEND_HOME_PATH", "/usr/local/Ascend/ascend-toolkit/latest")
    assert runtime.resolve_device(plugin.MindSporeOptions()) == "Ascend"
