"""A tokenizer saved by transformers 5 (the torch environment) loads in the MindSpore environment
(transformers 4.57.1), with the same ids and the same chat rendering.

transformers 5 writes `"tokenizer_class": "TokenizersBackend"`, a class 4.57.1 does not have;
`sft.data.tokenizer.load_tokenizer` then builds a PreTrainedTokenizerFast from tokenizer.json.

$ SFT_TORCH_PYTHON=.venvs/torch/bin/python .venvs/ms/bin/python -m pytest \
      tests/backends/mindspore/test_tokenizer_compat.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mindspore")

from sft.cli import main
from sft.data.tokenizer import load_tokenizer

from tests.backends.mindspore.conftest import torch_python

pytestmark = pytest.mark.mindspore

TEXTS = ["Hello! How can I help you today?", "The capital of France is Paris.<|im_end|>"]
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me a joke about cats."},
    {"role": "assistant", "content": "Cats are quick."},
]

# Runs in the torch environment: save the tiny tokenizer with transformers 5, then record what
# that transformers makes of it (ids, special ids, chat rendering).
_SAVE = """
import json, sys
sys.path.insert(0, sys.argv[3])
from tests.tiny import make_tokenizer
from transformers import AutoTokenizer
import transformers
make_tokenizer(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts, chat = json.loads(sys.argv[2])
out = {
    "version": transformers.__version__,
    "ids": [tok(t, add_special_tokens=True).input_ids for t in texts],
    "eos": tok.eos_token_id, "pad": tok.pad_token_id,
    "chat": tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False),
    "chat_prompt": tok.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True),
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def tok5(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    exe = torch_python()
    out = tmp_path_factory.mktemp("tok5") / "tok"
    root = str(Path(__file__).resolve().parents[3])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run(
        [exe, "-c", _SAVE, str(out), json.dumps([TEXTS, CHAT]), root],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_transformers5_tokenizer_loads_with_same_ids_and_chat(tok5):
    path, ref = tok5
    import transformers

    assert ref["version"].startswith("5"), ref["version"]
    assert transformers.__version__.startswith("4.")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "TokenizersBackend"
    # the bug this guards: 4.57's AutoTokenizer cannot load it
    with pytest.raises(ValueError, match="TokenizersBackend"):
        transformers.AutoTokenizer.from_pretrained(str(path))

    tok = load_tokenizer(path)
    assert [tok(t, add_special_tokens=True).input_ids for t in TEXTS] == ref["ids"]
    assert (tok.eos_token_id, tok.pad_token_id) == (ref["eos"], ref["pad"])
    assert tok.apply_chat_template(CHAT, tokenize=False) == ref["chat"]
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == ref["chat_prompt"]


def test_sft_data_stats_runs_on_a_transformers5_model(tok5, tiny_llama, tmp_path, capsys):
    """The README's cross-backend path: a model converted by the torch environment."""
    path, _ = tok5
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    for f in model.glob("tokenizer*"):
        f.unlink()
    for f in path.iterdir():
        shutil.copy(f, model / f.name)
    (tmp_path / "d.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"What is {i}?", "completion": f"{i}."}) for i in range(4))
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"backend: mindspore\nmodel: {model}\ndata: {{train: d.jsonl}}\noutput_dir: {tmp_path / 'run'}\n"
    )
    rc = main(["data", "stats", "-c", str(cfg)])
    assert rc == 0, capsys.readouterr().err
    assert sys.modules.get("torch") is None
