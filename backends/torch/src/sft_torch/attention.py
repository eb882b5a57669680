"""`segments`: causal attention run per sample of a packed row, registered with transformers.

    lm = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register())

A packed row of `max_seq_len` holds several samples that must not attend to each other. sdpa
with the block-diagonal mask transformers derives from restarting position ids computes every
query against every key of the row: the mask rules a score out but the kernel still computes it,
and an explicit mask also turns off its causal block skipping. For three samples of 200, 180 and
132 tokens in a 512-token row that is 512^2 = 262k scores per head where the samples need
(200^2 + 180^2 + 132^2) / 2 = 45k.
Here each sample (a run of consecutive position ids) gets its own `is_causal` sdpa call, so only
the useful scores are computed. flash-attention's varlen kernel does the same on CUDA
(`attn_implementation: flash_attention_2` with `packed_attention: position_ids`); this is the
sdpa equivalent for every device, written here because no library ships one for sdpa.

The outputs are those of sdpa under the block-diagonal causal mask (tested to 1e-6). A token whose
position id does not continue the previous one and is not continued by the next (a padding token:
position 0 between other 0s) sees only itself, so its output is its own value vector, taken
without a kernel call. Anything this cannot express exactly falls back to transformers' sdpa with
a mask: decoding with a KV cache, a sliding window, soft-capping, attention sinks, or a call
without position ids.

No [B, 1, L, L] mask is built for a pass over whole rows (no KV cache, no padding mask), which
is every training and eval forward: the mask function registered for NAME (`segments_mask`)
returns None there, since the per-sample path never reads it (at B = 4, L = 8k it was 268 MB
per forward). A layer that falls back in such a pass builds the block-diagonal causal mask from
the position ids itself (`_fallback_mask`, once per forward).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F

NAME = "sft_segments"

# attention kwargs whose semantics the per-segment path does not implement
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "position_bias")


def register() -> str:
    """Register the attention function (and sdpa's mask builder, for the fallback) under NAME
    with transformers; idempotent. Returns NAME, to pass as `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, segments_mask)
    return NAME


def segments_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' mask function for NAME: None for a pass over whole rows (no cache:
    kv_length is the query length; no padding mask), which `segment_attention` runs from the
    position ids alone; sdpa's mask otherwise (decoding, padded generation), for the fallback.
    Called by keyword (transformers 4.57: cache_position; 5.x: q_length)."""
    from transformers.masking_utils import sdpa_mask

    cache_position = kwargs.get("cache_position")
    q_length = kwargs.get("q_length", None if cache_position is None else cache_position.shape[0])
    if (
        not args
        and kwargs.get("attention_mask") is None
        and kwargs.get("kv_offset", 0) == 0
        and q_length is not None
        and kwargs.get("kv_length") == q_length
    ):
        return None
    return sdpa_mask(*args, **kwargs)  # type: ignore[no-any-return]


def supported(model_class: Any) -> bool:
    """Whether a transformers model class accepts a registered attention function (it declares
    `_supports_attention_backend`) and runs sdpa, which the fallback uses."""
    return bool(getattr(model_class, "_supports_attention_backend", False)) and bool(
        getattr(model_class, "_supports_sdpa", False)
    )


def runs(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive position ids (each sample of a packed row)."""
    pos = position_ids.to("cpu", torch.long)  # a 1-D row
    brk = torch.ones(pos.shape[0], dtype=torch.bool)
    brk[1:] = pos[1:] != pos[:-1] + 1
    starts = brk.nonzero().flatten().tolist()
    return list(zip(starts, [*starts[1:], pos.shape[0]], strict=True))


# Every decoder layer gets the same position_ids tensor: its runs are worked out once per
# forward (and once per checkpoint recompute), not once per layer (a device sync each on GPU).
# Per thread: micro-batches may run on concurrent threads (sft_torch.train).
_RUNS = threading.local()


def _row_runs(position_ids: torch.Tensor, batch: int) -> list[list[tuple[int, int]]]:
    key = (position_ids._version, batch)  # the tensor itself is held, so `is` cannot be fooled
    if getattr(_RUNS, "tensor", None) is not position_ids or _RUNS.key != key:
        pos = position_ids.expand(batch, -1)
        _RUNS.tensor, _RUNS.key = position_ids, key
        _RUNS.runs = [runs(pos[b]) for b in range(batch)]
    return _RUNS.runs  # type: ignore[no-any-return]


def _fallback_mask(position_ids: torch.Tensor, batch: int, window: int | None) -> torch.Tensor:
    """Bool [B, 1, L, L]: query q sees key k iff both are in the same run of consecutive
    position ids, k <= q, and (with a sliding window) q - k < window; once per forward."""
    key = (position_ids._version, batch, window)
    if getattr(_RUNS, "mask_tensor", None) is position_ids and _RUNS.mask_key == key:
        return _RUNS.mask  # type: ignore[no-any-return]
    pos = position_ids.expand(batch, -1)
    brk = torch.ones_like(pos, dtype=torch.bool)
    brk[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    seg = brk.cumsum(-1)
    idx = torch.arange(pos.shape[-1], device=pos.device)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (idx[None, :, None] >= idx[None, None, :])
    if window:
        allowed &= idx[None, :, None] - idx[None, None, :] < window
    _RUNS.mask_tensor, _RUNS.mask_key, _RUNS.mask = position_ids, key, allowed[:, None]
    return _RUNS.mask  # type: ignore[no-any-return]


def _pieces(row_runs: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """(start, end, attend) covering a row: each run of two or more tokens, and each stretch of
    consecutive one-token runs merged into one piece that is not attended (output = values)."""
    out: list[tuple[int, int, bool]] = []
    for s, e in row_runs:
        if e - s == 1 and out and not out[-1][2]:
            out[-1] = (out[-1][0], e, False)
        else:
            out.append((s, e, e - s > 1))
    return out


@torch.compiler.disable  # torch.compile: sample boundaries are data; run this part eagerly
def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature: query [B, H, L, D], key/value
    [B, H_kv, L, D]; returns ([B, L, H, D], None) like `sdpa_attention_forward`."""
    position_ids = kwargs.get("position_ids")
    if (
        position_ids is None
        or query.shape[2] != key.shape[2]
        or position_ids.shape[-1] != query.shape[2]
        or any(kwargs.get(k) is not None for k in _UNSUPPORTED)
        or getattr(module, "sliding_window", None)
        or not getattr(module, "is_causal", True)
    ):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if (
            attention_mask is None
            and position_ids is not None
            and query.shape[2] == key.shape[2] == position_ids.shape[-1]
        ):
            # segments_mask built none for this pass: the samples' block-diagonal causal mask
            window = getattr(module, "sliding_window", None) or kwargs.get("sliding_window")
            attention_mask = _fallback_mask(position_ids, query.shape[0], window)
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    from transformers.integrations.sdpa_attention import repeat_kv

    dtype = query.dtype
    if query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        # torch's CPU flash kernel is slower in bf16 than in fp32 (SmolLM2's 9 heads x 64, one
        # thread, forward + backward of a 100-token sample: 3.3 ms in bf16, 1.4 ms cast to fp32
        # and back; 6.3 vs 4.7 ms at 200 tokens): it runs in fp32, which its bf16 path
        # accumulates in anyway (the outputs' error against fp64 was the same, from the final
        # bf16 rounding). Cast before repeat_kv: fewer elements.
        query, key, value = (t.float() for t in (query, key, value))
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    p = dropout if module.training else 0.0
    rows = []
    # split, not slices: the gradient of a split is one cat, the gradient of each slice a
    # zero-filled tensor of the whole row
    qs, ks, vs = (t.split(1) if t.shape[0] > 1 else (t,) for t in (query, key, value))
    for b, row_runs in enumerate(_row_runs(position_ids, query.shape[0])):
        pieces = _pieces(row_runs)
        sizes = [e - s for s, e, _ in pieces]
        q, k, v = (t[b].split(sizes, dim=2) for t in (qs, ks, vs))
        outs = [
            F.scaled_dot_product_attention(
                q[i], k[i], v[i], dropout_p=p, is_causal=True, scale=scaling
            )
            if attend
            else v[i]  # one-token runs: each sees only itself
            for i, (_, _, attend) in enumerate(pieces)
        ]
        rows.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous().to(dtype), None


def resolve(lm: Any, option: str, attn_implementation: str, packing: bool) -> str:
    """The `torch.packed_attention` mode for a loaded model (switching it to NAME for
    `segments`). `auto`: `segments` for sdpa on a model that supports it and packed rows;
    `position_ids` otherwise (flash-attention varlen, eager with the derived mask)."""
    from sft.errors import SftError

    usable = attn_implementation in ("auto", "sdpa") and supported(type(lm))
    if option == "segments" and not usable:
        raise SftError(
            f"torch.packed_attention: segments needs sdpa attention "
            f"(torch.attn_implementation: {attn_implementation}) on a model whose attention goes "
            f"through transformers' AttentionInterface ({type(lm).__name__} "
            f"{'does' if supported(type(lm)) else 'does not'}); use packed_attention: "
            "position_ids"
        )
    mode = option if option != "auto" else ("segments" if usable and packing else "position_ids")
    if mode == "segments":
        lm.set_attn_implementation(register())
    return mode
