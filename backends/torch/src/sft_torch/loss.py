"""The training loss: summed token cross-entropy of one micro-batch, and eval loss/perplexity.

    loss_sum, n = batch_loss(model, batch, LossSettings(chunked=True, chunk_size=1024))
    (loss_sum / n_trained_in_global_batch).backward()   # exact under gradient accumulation

The sum (not a mean) is returned so the training loop can divide by the trained tokens of the
whole global batch: micro-batch 1 x accumulation 8 then equals micro-batch 8 x accumulation 1.

Chunked loss: logits are computed only for trained positions (labels != -100 after the shift),
a chunk at a time, each chunk under activation checkpointing, so neither the [tokens x vocab]
logits nor their fp32 copy is ever held whole; backward recomputes one chunk's logits at a time.

Packed rows (several samples per row) must not attend across samples. `packed="position_ids"`
passes no attention mask: transformers (4.57 and 5.x, `masking_utils.find_packed_sequence_indices`)
turns position ids that restart at 0 into a block-diagonal causal mask. Flash attention is
different: transformers derives varlen boundaries from position ids only for a batch of one row,
so for flash attention sft passes the boundaries itself (`varlen_kwargs`: `cu_seq_lens_q/k` and
`max_length_q/k` over the flattened batch, which transformers' flash path hands to
`flash_attn_varlen_func`). `packed="mask"` passes an explicit 4-D mask built from the sample
lengths.
Right padding needs no mask either way: causal attention never looks forward, and each padding
token (position id 0) becomes a one-token "sample" of its own.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from sft.data.cache import IGNORE_INDEX
from torch.utils.checkpoint import checkpoint

from sft_torch.model import causal_lm, split_model


@dataclass(frozen=True)
class LossSettings:
    chunked: bool = True
    """Chunked linear + cross-entropy over trained positions (see module docstring)."""
    chunk_size: int = 1024
    fused: bool = True
    """Chunks through `LinearCrossEntropy` (gradients in the forward pass) where the head allows
    it; else each chunk is checkpointed and recomputed in backward."""
    packed: str = "position_ids"
    """`segments`, `position_ids` or `mask`: how packed samples are kept apart (only `mask`
    changes the inputs; `segments` is the model's attention function, sft_torch.attention)."""
    reuse_logits: bool = False
    """`LinearCrossEntropy` computes each chunk's logits into a buffer kept between calls
    (`LOGITS_BUFFERS`) instead of a new tensor, and keeps a frozen head's autocast copy
    (`FROZEN_CAST`): on CPU, where a chunk or that copy is larger than glibc's largest mmap
    threshold (see `LogitsBuffers`)."""


def block_causal_mask(batch: dict[str, Any], eager: bool) -> torch.Tensor:
    """[B, 1, L, L] mask: query q sees key k iff both are in the same sample and k <= q.
    Each padding token sees only itself (a fully masked row would give NaN in sdpa).
    Bool (True = attend) for sdpa; additive float (0 / -inf-ish) for eager attention."""
    ids = batch["input_ids"]
    B, L = ids.shape
    seg = torch.empty((B, L), dtype=torch.long)
    for b, lens in enumerate(batch["seq_lens"]):
        seg[b] = -1 - torch.arange(L)  # padding: a unique segment per position
        t = 0
        for j, n in enumerate(lens):
            seg[b, t : t + n] = j
            t += n
    seg = seg.to(ids.device)
    causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    allowed = allowed[:, None]
    if not eager:
        return allowed
    zero = torch.zeros((), dtype=torch.float32, device=ids.device)
    return torch.where(allowed, zero, torch.finfo(torch.float32).min)


@lru_cache(maxsize=1)
def transformers_detects_packing() -> bool:
    """Whether this transformers derives packed-sequence masks from position ids (4.54+;
    verified with 4.57 and 5.x). Without it, packed rows need the explicit 4-D mask."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def model_inputs(model: Any, batch: dict[str, Any], settings: LossSettings) -> dict[str, Any]:
    inputs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }
    packed = any(len(lens) > 1 for lens in batch["seq_lens"])
    if not packed:
        return inputs
    impl = str(causal_lm(model).config._attn_implementation)
    if uses_flash(impl):
        inputs.update(varlen_kwargs(batch))
    elif settings.packed == "mask" or not transformers_detects_packing():
        inputs["attention_mask"] = block_causal_mask(batch, impl == "eager")
    return inputs


def uses_flash(attn_implementation: str) -> bool:
    """flash_attention_2 / _3 or a hub flash kernel: transformers' `_flash_attention_forward`."""
    return "flash" in attn_implementation


def varlen_kwargs(batch: dict[str, Any]) -> dict[str, Any]:
    """The flash-attention varlen boundaries of a [B, L] batch flattened to one row of B * L
    tokens: each sample is a sequence, and so is each padding token (as transformers derives
    them from position ids for one row). Computed on the host from the sample lengths, so no
    layer syncs with the device to find them.

        seq_lens [[3, 2], [4]], L = 6  ->  cu_seq_lens [0, 3, 5, 6, 10, 11, 12], max_length 4
    """
    L = batch["input_ids"].shape[1]
    bounds = [0]
    for b, lens in enumerate(batch["seq_lens"]):
        end = b * L
        for n in lens:
            end += n
            bounds.append(end)
        bounds.extend(range(end + 1, (b + 1) * L + 1))  # padding: one-token sequences
    cu = torch.tensor(bounds, dtype=torch.int32, device=batch["input_ids"].device)
    longest = max(e - s for s, e in itertools.pairwise(bounds))
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


class LogitsBuffers:
    """Buffers for `LinearCrossEntropy`'s logits chunks, kept from one call to the next.

    Why not just allocate: a chunk of 510 trained tokens x 49,152 is 100 MB of fp32, more than
    the largest block glibc serves from its heap (32 MiB), so each chunk was a fresh mmap: ~25,000
    page faults, each a zeroed page, for every micro-batch, and its unmap on free
    (docs/performance.md, "Kept memory"); under bf16 autocast the chunk's bf16 logits (50 MB)
    are a second such block. CUDA's caching allocator already reuses such blocks, so the
    trainer turns this on for CPU only (`LossSettings.reuse_logits`). A buffer is lent to one
    call at a time (micro-batch threads each get their own); at most `keep` are kept, the
    largest; `clear` drops them (the trainer does when training ends)."""

    ROWS = 64
    """Buffers are sized in multiples of this many rows, so chunks of 507 and 511 rows share one."""

    def __init__(self, keep: int = 8) -> None:
        self._keep = keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def lend(
        self, rows: int, cols: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> Iterator[torch.Tensor]:
        """A flat `dtype` buffer of at least rows x cols elements, this call's alone until
        exit."""
        rows = -(-rows // self.ROWS) * self.ROWS
        with self._lock:
            fits = [
                b
                for b in self._free
                if b.numel() >= rows * cols and b.device == device and b.dtype == dtype
            ]
            buf = min(fits, key=torch.Tensor.numel) if fits else None
            if buf is not None:
                self._free = [b for b in self._free if b is not buf]
        if buf is None:
            buf = torch.empty(rows * cols, dtype=dtype, device=device)
        try:
            yield buf
        finally:
            with self._lock:
                self._free.append(buf)
                self._free.sort(key=lambda b: b.numel() * b.element_size(), reverse=True)
                del self._free[self._keep :]

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


LOGITS_BUFFERS = LogitsBuffers()


class FrozenCast:
    """A frozen weight cast to autocast's dtype, kept while the weight is the same tensor,
    unchanged (its version counter) and frozen.

    `LinearCrossEntropy` casts the head's weight once per call; a LoRA run's head (tied to the
    input embeddings, so `torch.bf16_frozen_weights` leaves it in fp32) is the same every call,
    and its bf16 copy (56 MB for SmolLM2) was a fresh mmap per micro-batch on CPU: ~14,000 page
    faults each. One weight is kept (the head); a trainable weight is never cached; `clear`
    drops it (the trainer does when training ends)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[Any, ...] | None = None
        self._low: torch.Tensor | None = None

    def get(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if weight.dtype == dtype or weight.requires_grad:
            return weight.to(dtype)
        key = (weight.data_ptr(), weight._version, dtype)
        with self._lock:
            if self._key is not None and self._key[0]() is weight and self._key[1:] == key:
                return self._low  # type: ignore[return-value]
        low = weight.to(dtype)
        with self._lock:
            self._key, self._low = (weakref.ref(weight), *key), low
        return low

    def clear(self) -> None:
        with self._lock:
            self._key = self._low = None


FROZEN_CAST = FrozenCast()


def _chunk_ce(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _lend(
    reuse: bool, rows: int, cols: int, device: torch.device, dtype: torch.dtype
) -> contextlib.AbstractContextManager[torch.Tensor | None]:
    if not reuse:
        return contextlib.nullcontext()
    return LOGITS_BUFFERS.lend(rows, cols, device, dtype)


def _rows(buf: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor | None:
    """The first rows x cols elements of a lent buffer as a matrix (None without one)."""
    return None if buf is None else buf[: rows * cols].view(rows, cols)


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)), a chunk of rows at a time, with the
    gradients for hidden and weight worked out in the same pass and kept for backward.

    The [tokens x vocab] logits exist one chunk at a time, as with checkpointed chunks, but
    backward does not compute them again: the head's matmul runs twice per chunk instead of three
    times (forward, recompute, input gradient) when the head is frozen (LoRA), three instead of
    four when it trains. Liger-kernel's fused linear cross-entropy does this in Triton (CUDA
    only); this is the same computation in torch ops, for every device.

    Under autocast the matmuls run in the autocast dtype, as autograd's own backward of them
    would, and the softmax in fp32; the weight is cast once per call, not once per matmul as
    autocast casts a frozen weight (56 MB of bf16 per cast for SmolLM2's head)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        reuse: bool = False,
    ) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        device = hidden.device
        autocast = torch.is_autocast_enabled(device.type)
        low = torch.get_autocast_dtype(device.type) if autocast else weight.dtype
        total = torch.zeros((), dtype=torch.float32, device=device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_w else None
        rows, vocab = min(chunk, hidden.shape[0]), weight.shape[0]
        w = FROZEN_CAST.get(weight, low) if reuse else weight.to(low)
        with (
            torch.autocast(device.type, enabled=False),  # the dtypes are set here
            _lend(reuse, rows, vocab, device, torch.float32) as buf,
            _lend(reuse and low != torch.float32, rows, vocab, device, low) as low_buf,
        ):
            for s in range(0, hidden.shape[0], chunk):
                h, t = hidden[s : s + chunk].to(low), targets[s : s + chunk]
                n = h.shape[0]
                logits = _chunk_logits(h, w, _rows(buf, n, vocab), _rows(low_buf, n, vocab))
                picked = logits.gather(1, t[:, None])
                # log-sum-exp and softmax in place in the logits buffer: the chunk is 100 MB for
                # 511 x 49152, and torch.logsumexp then exp(logits - lse) made two more copies
                top = logits.amax(dim=-1, keepdim=True)
                e = logits.sub_(top).exp_()
                sums = e.sum(dim=-1, keepdim=True)
                total += (top + sums.log() - picked).sum()
                if not (need_h or need_w):
                    continue
                # d(sum CE)/d logits = softmax - one_hot(target)
                g = e.div_(sums)
                g[torch.arange(n, device=t.device), t] -= 1.0
                if low != torch.float32:  # into the chunk's low-precision buffer, now free
                    out = _rows(low_buf, n, vocab)
                    g = g.to(low) if out is None else out.copy_(g)
                if grad_h is not None:
                    grad_h[s : s + chunk] = torch.mm(g, w)
                if grad_w is not None:
                    grad_w += torch.mm(g.t(), h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def _chunk_logits(
    h: torch.Tensor, w: torch.Tensor, buf: torch.Tensor | None, low_buf: torch.Tensor | None
) -> torch.Tensor:
    """fp32 logits h @ w.T, computed in h's dtype (h and w share it), into the lent buffers
    where given: `low_buf` for the product in bf16/fp16, `buf` for its fp32 copy."""
    if h.dtype == torch.float32:
        return torch.mm(h, w.t(), out=buf)  # out=None: a new tensor
    low = torch.mm(h, w.t(), out=low_buf)
    return low.float() if buf is None else buf.copy_(low)


def fusable_head(head: Any) -> bool:
    """Whether the output head is a plain bias-free nn.Linear whose weight `LinearCrossEntropy`
    may use directly: no peft wrapper, no quantized weight, and no hooks (FSDP2 and DeepSpeed
    ZeRO-3 gather sharded weights in module hooks, which a direct use of .weight would skip)."""
    from torch import nn

    return (
        type(head) is nn.Linear
        and head.bias is None
        and type(head.weight) is nn.Parameter
        and not hasattr(head.weight, "ds_id")
        and not (head._forward_hooks or head._forward_pre_hooks)
    )


def batch_loss(
    model: Any, batch: dict[str, Any], settings: LossSettings
) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropy, number of trained tokens) of one micro-batch."""
    targets = batch["labels"][:, 1:]
    trained = targets != IGNORE_INDEX
    n = int(trained.sum())
    inputs = model_inputs(model, batch, settings)
    if not settings.chunked:
        logits = model(**inputs).logits[:, :-1].float()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss, n
    decoder, head = split_model(model)
    hidden = decoder(**inputs)[0][:, :-1]
    if n == 0:
        # keeps a graph through the head too, so backward reaches every trainable parameter
        # (DDP without find_unused_parameters waits for a gradient of each one)
        return (hidden.sum() + head(hidden[:, :1]).sum()) * 0.0, 0
    h, t = hidden[trained], targets[trained]
    if settings.fused and fusable_head(head):
        loss = LinearCrossEntropy.apply(
            h, head.weight, t, settings.chunk_size, settings.reuse_logits
        )
        return loss, n
    loss = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, settings.chunk_size):
        part = (head, h[s : s + settings.chunk_size], t[s : s + settings.chunk_size])
        if torch.is_grad_enabled():
            loss = loss + checkpoint(_chunk_ce, *part, use_reentrant=False)
        else:
            loss = loss + _chunk_ce(*part)
    return loss, n


@torch.no_grad()
def eval_loss(model: Any, batches: Any, settings: LossSettings, autocast: Any) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over `batches` (an iterable of batch dicts)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            with autocast():
                loss, n = batch_loss(model, batch, settings)
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    if count == 0:
        return {}
    mean = total / count
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": count}
