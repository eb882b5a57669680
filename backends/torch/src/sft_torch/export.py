"""The `hf` and `adapter` exporters (the `sft_register_exporters` hook), each verified.

    $ sft export runs/smollm2-135m-demo --format hf --dtype f32 --out exports/quill-hf
    $ sft export runs/smollm2-135m-demo --format adapter --out exports/quill-adapter

`hf` merges a LoRA adapter into its base (peft `merge_and_unload`) or re-saves a full model,
as safetensors + tokenizer + chat template + `generation_config.json` carrying the end-of-turn
eos ids. A QLoRA adapter was trained against the 4/8-bit base, not the original weights: it is
merged into dequant(quant(W)), the weights bitsandbytes computed with during training (the base
is quantized again exactly as training did; needs bitsandbytes and a CUDA GPU). `adapter`
writes the PEFT adapter alone. Every export reloads what it wrote and reports numbers:

- logits of the export against the run's own model (base + adapter, unmerged; for QLoRA the
  dequantized base) on probe prompts: max |diff| and mean KL; fp32 must agree within 1e-4;
- QLoRA: the same against the quantized model as trained (`quantized_model`), within the KL
  tolerance of its compute dtype;
- the exported chat template renders a probe conversation to exactly the token ids the run's
  tokenizer (next to its weights in final/) produces, and the eos ids agree with the template's end of turn.
A failed check makes `sft export` fail loudly (sft.export.run_export raises).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import sft
from sft.errors import SftError
from sft.export import ExportReport, ExportRequest
from sft.models import resolve_model
from sft.rundir import config_path

TORCH_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
# Max mean KL(reference || export) per dtype; f32 is held to max |logit diff| < 1e-4 instead.
KL_TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 2e-2}
LOGIT_TOLERANCE_F32 = 1e-4
#: ...or this fraction of the largest logit: merging W + s*B@A in fp32 rounds each weight, and
#: what that rounding moves grows with the logits' size (docs/export-eval.md).
LOGIT_TOLERANCE_F32_REL = 1e-5


def f32_tolerance(checks: dict[str, Any]) -> float:
    """max |logit diff| allowed for an f32 export: 1e-4, or 1e-5 of the largest logit."""
    return max(LOGIT_TOLERANCE_F32, LOGIT_TOLERANCE_F32_REL * checks.get("max_abs_logit", 0.0))


# Max mean KL(quantized model as trained || merged export) by the QLoRA run's compute dtype
# (bitsandbytes multiplies in it; the export in fp32)
QLORA_KL_TOLERANCE = {"bf16": 2e-2, "fp16": 2e-3, "fp32": 1e-5}
QLORA_INSTALL_HINT = 'pip install "sft-torch[qlora]"'
PROBE_CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy? Answer in one word."},
    {"role": "assistant", "content": "Rome."},
]
PROBE_PROMPTS = ["Who are you?", "Write a haiku about the sea.", "What is 12 * 7?"]


def render(tok: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template."""
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if hasattr(ids, "keys"):  # transformers 5 may return an encoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _probe_renders(tok: Any) -> list[list[int]]:
    out = []
    for msgs, gen in ((PROBE_CONVERSATION, False), (PROBE_CONVERSATION[:4], True)):
        try:
            out.append(render(tok, msgs, gen))
        except Exception:  # templates that reject a system turn (e.g. gemma): probe without it
            out.append(render(tok, msgs[1:], gen))
    return out


def check_template_parity(exported: Path, reference: Path) -> dict[str, Any]:
    """Compare the exported tokenizer/template/eos with the run's (`reference`, e.g. final/adapter)."""
    from transformers import AutoTokenizer

    from sft_torch.generate import eos_ids_of
    from sft_torch.model_sources import end_of_turn_ids

    exp_tok = AutoTokenizer.from_pretrained(str(exported))
    ref_tok = AutoTokenizer.from_pretrained(str(reference))
    if not getattr(exp_tok, "chat_template", None):
        return {"template_ids_equal": False, "problem": f"{exported} has no chat template"}
    ref_ids = _probe_renders(ref_tok)
    try:
        exp_ids = _probe_renders(exp_tok)
    except Exception as exc:  # a template that cannot even render the probe is a mismatch
        return {
            "template_ids_equal": False,
            "eos_ids_agree": False,
            "problem": f"the exported chat template fails on the probe: {exc}",
        }
    first_diff = next(
        (i for i, (a, b) in enumerate(zip(exp_ids[0], ref_ids[0], strict=False)) if a != b), None
    )
    exp_eos = sorted(eos_ids_of(exported, exp_tok))
    eot = end_of_turn_ids(exp_tok)[:1]
    checks: dict[str, Any] = {
        "template_ids_equal": exp_ids == ref_ids,
        "probe_tokens": len(ref_ids[0]),
        "eos_ids": exp_eos,
        "reference_eos_ids": sorted(eos_ids_of(reference, ref_tok)),
        "end_of_turn_id": eot[0] if eot else None,
    }
    checks["eos_ids_agree"] = (
        checks["eos_ids"] == checks["reference_eos_ids"] and bool(eot) and eot[0] in exp_eos
    )
    if not checks["template_ids_equal"]:
        at = first_diff if first_diff is not None else min(len(exp_ids[0]), len(ref_ids[0]))
        checks["first_mismatch"] = {
            "position": at,
            "exported": exp_tok.decode(exp_ids[0][at : at + 8]),
            "reference": ref_tok.decode(ref_ids[0][at : at + 8]),
        }
    return checks


def probe_batch(tok: Any) -> list[list[int]]:
    """Probe sequences for logit comparison: each probe prompt rendered with the template plus
    the full probe conversation."""
    seqs = [render(tok, [{"role": "user", "content": p}], True) for p in PROBE_PROMPTS]
    return [*seqs, _probe_renders(tok)[0]]


def logits_of(model: Any, seqs: list[list[int]]) -> list[Any]:
    """fp64 logits of each sequence (one at a time: no padding to disturb the comparison)."""
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([s])).logits[0].double() for s in seqs]


def compare_logits(ref: list[Any], got: list[Any]) -> dict[str, float]:
    """max |logit diff|, mean KL(ref || got) over positions, and top-1 agreement."""
    import torch

    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got, strict=True))
    largest = max(float(a.abs().max()) for a in ref)
    kls, agree, total = [], 0, 0
    for a, b in zip(ref, got, strict=True):
        la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        kls.append((la.exp() * (la - lb)).sum(-1))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    return {
        "max_abs_logit_diff": diff,
        "max_abs_logit": largest,
        "mean_kl": float(torch.cat(kls).mean()),
        "top1_agreement": agree / total,
        "positions_compared": total,
    }


def _reference(req: ExportRequest) -> tuple[Any, Any, Path, Any]:
    """(model for reference logits in fp32, tokenizer, dir with the run's tokenizer + generation
    config, RunWeights or None for a plain model directory) of what is being exported."""
    from sft_torch.generate import load_for_inference

    loaded = load_for_inference(req.run_dir)
    return loaded.model, loaded.tokenizer, loaded.info["meta_dir"], loaded.info["run"]


def write_tokenizer_and_generation(tok: Any, meta_dir: Path, out: Path, req: ExportRequest) -> None:
    """Tokenizer + chat template (optionally replaced by `options["chat_template"]`, a .jinja
    path) and generation_config.json with the run's end-of-turn eos ids."""
    from sft_torch.generate import eos_ids_of

    eos = eos_ids_of(meta_dir, tok)
    override = req.options.get("chat_template")
    if override:
        tok.chat_template = Path(override).read_text()
    tok.save_pretrained(str(out))
    gen_path = meta_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    gen["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    if tok.pad_token_id is not None:
        gen.setdefault("pad_token_id", tok.pad_token_id)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _clean_out(out: Path) -> None:
    # A previous export into the same directory must not leave mixed files behind (adapter
    # files beside merged weights make loaders treat the directory as an adapter).
    for pattern in (
        "adapter_config.json",
        "adapter_model.*",
        "*.safetensors",
        "model.safetensors.index.json",
    ):
        for p in out.glob(pattern):
            p.unlink()


def export_hf(req: ExportRequest) -> ExportReport:
    """Merged (or full) model as HF safetensors in `req.dtype`, verified against the run."""
    import torch
    from transformers import AutoModelForCausalLM

    if req.dtype not in TORCH_DTYPES:
        raise SftError(
            f"hf export writes f32, f16 or bf16, not {req.dtype!r} (q8_0 is for --format gguf)"
        )
    model, tok, meta_dir, run = _reference(req)
    kind = run.kind if run else "model"
    seqs = probe_batch(tok)
    quantized: dict[str, Any] = {}
    if run is not None and run.kind == "adapter" and _run_method(run).get("name") == "qlora":
        # the model as trained (4-bit base + adapter) and the weights it computed with
        quantized["logits"], deq, quantized["compute"] = quantized_reference(run, seqs)
        model = on_dequantized_base(run, deq)
    ref = logits_of(model, seqs)
    if kind == "adapter":
        model = model.merge_and_unload()
    _clean_out(req.out)
    model.to(getattr(torch, TORCH_DTYPES[req.dtype])).save_pretrained(str(req.out))
    write_tokenizer_and_generation(tok, meta_dir, req.out, req)
    del model
    back = AutoModelForCausalLM.from_pretrained(str(req.out), dtype=torch.float32).eval()
    checks: dict[str, Any] = {"source": kind, "merged": kind == "adapter", "dtype": req.dtype}
    got = logits_of(back, seqs)
    checks.update(compare_logits(ref, got))
    ok_quantized = True
    if quantized:
        vs_trained = compare_logits(quantized["logits"], got)
        tolerance = max(QLORA_KL_TOLERANCE[quantized["compute"]], KL_TOLERANCE[req.dtype])
        checks["quantized_model"] = {**vs_trained, "kl_tolerance": tolerance}
        ok_quantized = vs_trained["mean_kl"] < tolerance
    checks.update(check_template_parity(req.out, meta_dir))
    checks["no_adapter_config"] = not (req.out / "adapter_config.json").exists()
    ok_logits = (
        checks["max_abs_logit_diff"] < f32_tolerance(checks)
        if req.dtype == "f32"
        else checks["mean_kl"] < KL_TOLERANCE[req.dtype]
    )
    checks["logit_tolerance"] = (
        f"max |diff| < {f32_tolerance(checks):.3g}"
        if req.dtype == "f32"
        else f"mean KL < {KL_TOLERANCE[req.dtype]}"
    )
    ok = ok_logits and ok_quantized and checks["template_ids_equal"] and checks["eos_ids_agree"]
    return ExportReport("hf", str(req.out), checks, ok=bool(ok and checks["no_adapter_config"]))


def _run_config(run: Any) -> dict[str, Any]:
    import yaml

    cfg_path = config_path(run.final.parent)
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    return cfg if isinstance(cfg, dict) else {}


def _run_method(run: Any) -> dict[str, Any]:
    method = _run_config(run).get("method") or {}
    return method if isinstance(method, dict) else {"name": method}


def quantized_reference(run: Any, seqs: list[list[int]]) -> tuple[list[Any], dict[str, Any], str]:
    """(fp64 logits of the QLoRA model as trained, {module name: dequantized fp32 weight on CPU}
    of every quantized Linear, compute precision). The base is quantized again with the run's
    settings (bits, quant type, double quant, load dtype): bitsandbytes' quantization is
    deterministic, so these are the 4/8-bit weights the adapter was trained against."""
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        raise SftError(
            f"{run.final.parent} is a QLoRA run: its adapter was trained against the 4/8-bit "
            "base, so the merged model must be built from the quantized weights, which needs "
            "bitsandbytes and a CUDA GPU (merging into the original weights gives a different "
            "model). Run the export on a GPU machine with "
            f"{QLORA_INSTALL_HINT}, or use --format adapter and load it on the quantized base"
        )
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_torch.generate import run_base_spec
    from sft_torch.model import qlora_compute_dtype, weights_dtype
    from sft_torch.runtime import resolve_precision

    cfg = _run_config(run)
    method, model_cfg = _run_method(run), cfg.get("model") or {}
    load_dtype = str(model_cfg.get("dtype", "auto")) if isinstance(model_cfg, dict) else "auto"
    precision = resolve_precision(
        str((cfg.get("train") or {}).get("precision", "auto")), torch.device("cuda"), load_dtype
    )
    compute = qlora_compute_dtype(precision)
    base = AutoModelForCausalLM.from_pretrained(
        str(resolve_model(run_base_spec(run)).path),
        quantization_config=bnb_config(method, compute),
        dtype=weights_dtype(load_dtype),
        device_map={"": 0},
        use_safetensors=True,
    )
    deq = dequantized_weights(base)
    trained = PeftModel.from_pretrained(base, str(run.weights)).eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=compute, enabled=precision != "fp32"):
        ref = [
            trained(input_ids=torch.tensor([s], device="cuda")).logits[0].double().cpu()
            for s in seqs
        ]
    return ref, deq, precision


def bnb_config(method: dict[str, Any], compute: Any) -> Any:
    """The BitsAndBytesConfig a QLoRA run trained with (`sft_torch.model.quantization_config`),
    from the method section of its config.yaml."""
    from transformers import BitsAndBytesConfig

    if int(method.get("bits", 4)) == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.get("quant_type", "nf4"),
        bnb_4bit_use_double_quant=bool(method.get("double_quant", True)),
        bnb_4bit_compute_dtype=compute,
    )


def dequantized_weights(model: Any, dequantize: Any = None) -> dict[str, Any]:
    """{module name: fp32 CPU weight} of every bitsandbytes-quantized Linear of `model`, through
    peft's `dequantize_bnb_weight` (`bitsandbytes.functional.dequantize_4bit` for 4-bit, the
    row scales for 8-bit) unless `dequantize(weight, state)` is given."""
    import torch
    from peft.utils.integrations import get_bnb_param_type

    if dequantize is None:
        from peft.utils.integrations import dequantize_bnb_weight as dequantize
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.nn.Parameter) and get_bnb_param_type(w):
            out[name] = dequantize(w, getattr(mod, "state", None)).float().cpu()
    return out


def set_weights(model: Any, weights: dict[str, Any]) -> None:
    """Replace the weight of each named module (shapes must match)."""
    for name, w in weights.items():
        mod = model.get_submodule(name)
        if tuple(mod.weight.shape) != tuple(w.shape):
            raise SftError(
                f"dequantized weight of {name} has shape {tuple(w.shape)}, the base has "
                f"{tuple(mod.weight.shape)}: is the run's base model the one it trained on?"
            )
        mod.weight.data = w.to(mod.weight.dtype)


def on_dequantized_base(run: Any, deq: dict[str, Any]) -> Any:
    """The run's adapter (unmerged) on its fp32 base whose quantized Linears hold `deq`: the
    trained model in full precision, ready for `merge_and_unload`."""
    from peft import PeftModel

    from sft_torch.generate import load_base, run_base_spec

    base = load_base(resolve_model(run_base_spec(run)).path)
    set_weights(base, deq)
    return PeftModel.from_pretrained(base, str(run.weights)).eval()


def export_adapter(req: ExportRequest) -> ExportReport:
    """The PEFT adapter alone (+ tokenizer, generation config), reloaded and compared."""
    from peft import PeftModel

    from sft_torch.generate import find_run_weights, load_base, run_base_spec

    run = find_run_weights(req.run_dir)
    if run is None or run.kind != "adapter":
        raise SftError(
            f"{req.run_dir} holds no PEFT adapter (a full or freeze run, or not a run "
            "directory); use --format hf"
        )
    model, tok, meta_dir, _ = _reference(req)
    seqs = probe_batch(tok)
    ref = logits_of(model, seqs)
    del model
    _clean_out(req.out)
    for f in run.weights.glob("adapter_*"):
        shutil.copy2(f, req.out / f.name)
    write_tokenizer_and_generation(tok, meta_dir, req.out, req)
    # A fresh base + the exported files, exactly as a user would load them with plain peft.
    base = resolve_model(run_base_spec(run)).path
    fresh = PeftModel.from_pretrained(load_base(base), str(req.out)).eval()
    checks: dict[str, Any] = {"source": "adapter", "dtype": "as trained", "base": str(base)}
    checks.update(compare_logits(ref, logits_of(fresh, seqs)))
    checks.update(check_template_parity(req.out, meta_dir))
    ok = (
        checks["max_abs_logit_diff"] < f32_tolerance(checks)
        and checks["template_ids_equal"]
        and checks["eos_ids_agree"]
    )
    return ExportReport("adapter", str(req.out), checks, ok=bool(ok))


@sft.hookimpl
def sft_register_exporters(register: Any) -> None:
    register("hf", export_hf, description="merged (or full) safetensors model, verified")
    register("adapter", export_adapter, description="the PEFT adapter alone, verified")
