"""Fast paths the trainer turns on when it runs on a GPU.

The trainer calls these, all safe on a CPU-only machine:

- `attention_implementation(cfg)` before loading the model: the name to pass
  as `attn_implementation`. On a CUDA GPU with PyTorch's variable-length
  flash kernel this registers and returns `VARLEN_ATTENTION`, an attention
  function for packed batches: all samples of a micro-batch concatenated into
  one row, `position_ids` restarting at 0 for each sample. Each token attends
  only to earlier tokens of its own sample, and the cost grows with the sum of
  the squared sample lengths instead of the square of the row length (the
  dense block-diagonal mask that `sdpa` needs for packed rows is quadratic in
  batch x length). Elsewhere it returns "sdpa" (which builds that mask from
  `position_ids` itself, so CPU runs stay correct).
- `apply_fast_paths(model, cfg, use_fp8)` after the PEFT adapter is attached: each
  LoRA linear as one fused autograd node (`lora_linear`), with `use_fp8` the
  frozen base products in FP8 (`fp8_base_products`, trainer/fp8.py), Liger kernels
  (fused RMSNorm, RoPE, SwiGLU) when liger-kernel is importable and the
  model sits on a CUDA device, and frozen fp32 copies of embeddings /
  lm_head (left by k-bit preparation) cast back to the compute dtype, so
  that the 128k-vocab output projection runs on the tensor cores.

- `tune_sft_arguments(kwargs, model, cfg)` before the Trainer is built: the
  micro-batch and checkpointing from the memory plan, and how many of the
  last layers may skip checkpointing (`uncheckpoint_last_layers`, applied by
  the SelectiveCheckpointing callback once the Trainer has turned it on).

The memory planning (`plan_micro_batch`) is pure arithmetic on the model's
shape so that it can be unit tested on a CPU; `auto_micro_batch` feeds it
the device's numbers.

Nothing GPU-only is imported at module import time.

Environment overrides, for benchmarks and for debugging a bad kernel:
`KUBETUNE_ATTENTION` (an attention implementation name, e.g. "sdpa"),
`KUBETUNE_LIGER=0` (no Liger kernels), `KUBETUNE_FUSED_LORA=0` (PEFT's own
LoRA forward), `KUBETUNE_MEMORY_BUDGET_GIB` (the GPU
memory the automatic micro-batch sizing may plan for; default: 90% of the
device), `KUBETUNE_COMPILE=1` (torch.compile each decoder layer; off: under
activation checkpointing torch 2.11 fails it with "a different number of
tensors was saved during the original forward and recomputation",
bench/RESULTS.md), `KUBETUNE_SELECTIVE_CHECKPOINTING=0`
(checkpoint every layer even when memory is left for some not to be),
`KUBETUNE_FP8=0/1` (FP8 base products off / on whatever training.fp8 says,
where the GPU can; `fp8.enabled`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

from kubetune.trainer import fp8
from kubetune.trainer.deepspeed import zero3_enabled

log = logging.getLogger(__name__)

VARLEN_ATTENTION = "kubetune_varlen"
ENV_ATTENTION = "KUBETUNE_ATTENTION"
ENV_LIGER = "KUBETUNE_LIGER"
ENV_MEMORY_BUDGET = "KUBETUNE_MEMORY_BUDGET_GIB"
ENV_FUSED_LORA = "KUBETUNE_FUSED_LORA"
ENV_COMPILE = "KUBETUNE_COMPILE"
ENV_SELECTIVE = "KUBETUNE_SELECTIVE_CHECKPOINTING"

# A micro-batch past this many tokens gains almost nothing in throughput on an
# 8B model (the matrix products are already large) and only costs memory.
MAX_AUTO_TOKENS = 16384
GIB = 2**30


# --------------------------------------------------------------------------
# Packed sequences: boundaries from position_ids (pure, CPU-testable)
# --------------------------------------------------------------------------

def cu_seqlens_from_position_ids(position_ids):
    """Cumulative sample boundaries of a packed batch, for a varlen kernel.

    `position_ids` is (batch, seq) or (seq,). A new sample starts at the
    beginning of every row and wherever the position does not continue the
    previous one by exactly +1 (usually a reset to 0). Rows are concatenated
    in order, so the result indexes the flattened (batch * seq) tokens.

    Returns `(cu_seqlens, max_len)`: an int32 tensor [0, e1, e2, ..., total]
    on the same device, and the longest sample length as a Python int.
    """
    import torch

    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be 1-D or 2-D, got shape {tuple(position_ids.shape)}")
    rows, seq = position_ids.shape
    if rows == 0 or seq == 0:
        raise ValueError(f"position_ids is empty (shape {tuple(position_ids.shape)})")
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    start_idx = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    total = torch.tensor([rows * seq], device=position_ids.device, dtype=start_idx.dtype)
    cu = torch.cat([start_idx, total]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max().item())
    return cu, max_len


class _BoundaryCache:
    """Every layer of one forward pass sees the same position_ids tensor, and
    finding the boundaries syncs with the host: compute them once per tensor.
    Holds one entry; the reference keeps the tensor alive only until the next
    batch replaces it."""

    def __init__(self) -> None:
        self._key: Any = None
        self._value: Any = None

    def get(self, position_ids, rows: int):
        # Keyed on the tensor object itself (plus its version counter, bumped
        # by in-place writes), not on its address, which a later batch reuses.
        key = (rows, tuple(position_ids.shape), position_ids._version)
        if self._key is not None and self._key[0] is position_ids and self._key[1] == key:
            return self._value
        expanded = position_ids.expand(rows, -1) if position_ids.shape[0] != rows else position_ids
        value = cu_seqlens_from_position_ids(expanded)
        self._key, self._value = (position_ids, key), value
        return value


_boundaries = _BoundaryCache()


# --------------------------------------------------------------------------
# The varlen attention function (registered with transformers)
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _varlen_kernel():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _kernel_options(params: set[str], n_heads: int, n_kv_heads: int, scaling: Optional[float], head_dim: int) -> tuple[dict, bool]:
    """Keyword arguments for the installed `varlen_attn` (its signature changed
    between PyTorch releases) and whether key/value heads must be repeated
    for grouped-query attention because the kernel cannot take them as is."""
    kw: dict[str, Any] = {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)  # causal
    elif "is_causal" in params:
        kw["is_causal"] = True
    else:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn takes neither window_size nor is_causal")
    if scaling is not None and not math.isclose(scaling, head_dim**-0.5, rel_tol=1e-6):
        if "scale" not in params:
            raise RuntimeError(f"this varlen_attn has no scale argument and the model needs scaling={scaling}")
        kw["scale"] = scaling
    repeat_kv = False
    if n_kv_heads != n_heads:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            repeat_kv = True
    return kw, repeat_kv


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: (batch, heads, seq, dim) in,
    (batch, seq, heads, dim) out, like the sdpa integration.

    Sample boundaries come from `cu_seq_lens_q` / `max_length_q` when the
    collator provides them, else from `position_ids`, else each row is one
    sample. Anything that is not self-attention over unpadded rows (a KV
    cache during generation, a padding mask) goes to sdpa with the mask that
    `varlen_mask` built for it.
    """
    import torch

    bsz, n_heads, seq, head_dim = query.shape
    if attention_mask is not None or key.shape[2] != seq:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("kubetune varlen attention does not implement attention dropout")
    n_kv = key.shape[1]
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None or max_len is None:
        pos = kwargs.get("position_ids")
        if pos is not None:
            cu, max_len = _boundaries.get(pos, bsz)
        else:
            cu = torch.arange(0, (bsz + 1) * seq, seq, device=query.device, dtype=torch.int32)
            max_len = seq
    cu = cu.to(device=query.device, dtype=torch.int32)
    max_len = int(max_len)

    kernel, params = _varlen_kernel()
    opts, repeat_kv = _kernel_options(params, n_heads, n_kv, scaling, head_dim)
    q = query.transpose(1, 2).reshape(bsz * seq, n_heads, head_dim)
    k = key.transpose(1, 2).reshape(bsz * seq, n_kv, head_dim)
    v = value.transpose(1, 2).reshape(bsz * seq, n_kv, head_dim)
    if repeat_kv:
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
    out = kernel(q, k, v, cu, cu, max_len, max_len, **opts)
    return out.reshape(bsz, seq, n_heads, head_dim), None


def varlen_mask(batch_size, q_length, kv_length, attention_mask=None, **kwargs):
    """transformers mask function for the varlen implementation: no mask at
    all for self-attention over unpadded rows (sample boundaries travel in
    position_ids; a dense block-diagonal mask is what we avoid), the sdpa
    mask otherwise (generation with a cache, padded batches)."""
    if q_length == kv_length and (attention_mask is None or bool(attention_mask.all())):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, **kwargs)


def varlen_available() -> bool:
    """A CUDA device of compute capability >= 8.0 and a PyTorch with varlen_attn."""
    try:
        import torch

        if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
            return False
        _varlen_kernel()
        return True
    except Exception:  # ImportError on older PyTorch; a broken driver is the same answer
        return False


def register_varlen_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)
    return VARLEN_ATTENTION


def attention_implementation(cfg: Any = None) -> str:
    """The attn_implementation to load the model with (see module docstring)."""
    forced = os.environ.get(ENV_ATTENTION)
    if forced:
        if forced == VARLEN_ATTENTION:
            if not varlen_available():
                raise RuntimeError(f"{ENV_ATTENTION}={VARLEN_ATTENTION} needs a CUDA GPU (sm80+) and torch.nn.attention.varlen")
            return register_varlen_attention()
        return forced
    if varlen_available():
        return register_varlen_attention()
    return "sdpa"


# --------------------------------------------------------------------------
# Memory planning (pure)
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            vocab=config.vocab_size,
        )


def layer_activation_bytes_per_token(shape: ModelShape, bytes_per_value: int = 2) -> int:
    """What one decoder layer keeps for its backward, per token, when it is not
    checkpointed (see `activation_bytes_per_token`)."""
    kv = shape.hidden // shape.heads * shape.kv_heads
    return (7 * shape.hidden + 2 * kv + 4 * shape.intermediate) * bytes_per_value


def activation_bytes_per_token(shape: ModelShape, *, checkpointing: bool, fused_loss: bool, bytes_per_value: int = 2) -> int:
    """Estimated training memory per token of a micro-batch (bf16 activations).

    One decoder layer keeps about 7 hidden-sized tensors (norm inputs, the
    q/k/v/o/gate/up inputs, attention output), 2 kv-sized ones and 4
    intermediate-sized ones (gate, up, their product, the SwiGLU
    intermediate). With gradient checkpointing only each layer's input stays
    for the whole step and one layer is live at a time. Without a fused loss
    the fp32 logits and their gradient add 2 x 4 bytes x vocab.
    Deliberately a little generous: the planner should not plan an OOM.
    """
    per_layer = layer_activation_bytes_per_token(shape, bytes_per_value)
    if checkpointing:
        live = shape.layers * shape.hidden * bytes_per_value + 2 * per_layer
    else:
        live = shape.layers * per_layer
    loss = 2 * shape.hidden * bytes_per_value if fused_loss else 2 * 4 * shape.vocab
    return live + loss


@dataclass(frozen=True)
class MicroBatchPlan:
    rows: int
    tokens: int
    checkpointing: bool
    bytes_per_token: int
    budget_bytes: int
    fixed_bytes: int
    # With checkpointing: how many of the last layers keep their activations instead
    # (no recompute for them), in the memory the micro-batch leaves over.
    uncheckpointed_layers: int = 0


def plan_micro_batch(
    shape: ModelShape,
    *,
    max_length: int,
    budget_bytes: int,
    fixed_bytes: int,
    fused_loss: bool,
    allow_no_checkpointing: bool = True,
    max_tokens: int = MAX_AUTO_TOKENS,
) -> MicroBatchPlan:
    """Rows of `max_length` tokens per micro-batch that fit `budget_bytes`.

    `fixed_bytes` is what is already taken (weights, adapter, optimizer
    state). Without checkpointing is preferred (a third less compute) when at
    least `max_tokens` fit that way; otherwise checkpointing and as many rows
    as fit, up to `max_tokens`, and then as many of the last layers left
    uncheckpointed as the remaining memory holds. At least one row: if even
    that does not fit, raise with the numbers, rather than fail later with a
    CUDA OOM.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    free = budget_bytes - fixed_bytes
    cap_rows = max(1, max_tokens // max_length)
    if allow_no_checkpointing:
        per_tok = activation_bytes_per_token(shape, checkpointing=False, fused_loss=fused_loss)
        rows = min(cap_rows, free // (per_tok * max_length)) if free > 0 else 0
        if rows >= cap_rows:
            return MicroBatchPlan(rows, rows * max_length, False, per_tok, budget_bytes, fixed_bytes)
    per_tok = activation_bytes_per_token(shape, checkpointing=True, fused_loss=fused_loss)
    rows = min(cap_rows, free // (per_tok * max_length)) if free > 0 else 0
    if rows >= 1:
        # Selective checkpointing: the recompute is a third of the step's matrix work, so
        # every layer that fits uncheckpointed in the left-over memory is one less to redo.
        # A layer that skips it keeps its full activations in place of its saved input.
        # What a layer keeps depends on its kernels (dropout masks, saved LoRA inputs): plan a
        # quarter more than the estimate, since a layer too many costs an OOM and a retry.
        spare = free - rows * max_length * per_tok
        extra = rows * max_length * max(1, layer_activation_bytes_per_token(shape) - shape.hidden * 2) * 5 // 4
        skip = int(min(shape.layers, max(0, spare // extra))) if allow_no_checkpointing else 0
        return MicroBatchPlan(int(rows), int(rows) * max_length, True, per_tok, budget_bytes, fixed_bytes, skip)
    raise MemoryError(
        f"one row of {max_length} tokens needs about {per_tok * max_length / GIB:.1f} GiB of activations "
        f"but only {max(free, 0) / GIB:.1f} GiB of the {budget_bytes / GIB:.1f} GiB budget is left after "
        f"{fixed_bytes / GIB:.1f} GiB of weights; lower dataset.maxLength or raise {ENV_MEMORY_BUDGET}"
    )


def memory_budget_bytes(device_total_bytes: int) -> int:
    raw = os.environ.get(ENV_MEMORY_BUDGET)
    if not raw:
        return int(device_total_bytes * 0.9)
    try:
        gib = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_MEMORY_BUDGET} must be a number of GiB, got {raw!r}") from None
    if gib <= 0:
        raise ValueError(f"{ENV_MEMORY_BUDGET} must be > 0, got {raw!r}")
    return min(int(gib * GIB), device_total_bytes)


def auto_micro_batch(model, cfg: Any, max_length: int) -> MicroBatchPlan:
    """Plan the micro-batch on the current CUDA device, after the model
    (and adapter) are loaded there."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    fixed = torch.cuda.memory_allocated()
    # LoRA parameters get fp32 grads and two Adam moments: 3 more copies.
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    fixed += 3 * trainable
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return plan_micro_batch(
        ModelShape.from_config(base.config),
        max_length=max_length,
        budget_bytes=memory_budget_bytes(total),
        fixed_bytes=fixed,
        fused_loss=True,  # TRL's SFTTrainer computes the loss with a chunked LM head
    )


# --------------------------------------------------------------------------
# Fused LoRA linear (one autograd node per adapted linear layer)
# --------------------------------------------------------------------------
#
# PEFT computes a LoRA layer as base(x).clone() + lora_B(lora_A(dropout(x))) * s:
# on an 8B model with 16k-token micro-batches, the clone, the scaling and
# the add are three full passes over every projection's output in the
# forward (twice with gradient checkpointing) and more in the backward,
# about a quarter of the step time in a profile. Here the LoRA product is
# accumulated into the base output by the matrix multiply itself (addmm
# with beta=1) and the backward adds its input gradient the same way.
# The frozen base weight is used in the compute dtype (a bitsandbytes 4-bit
# weight is dequantised in the forward and again in the backward, as
# bitsandbytes does), and the adapter's fp32 master weights get fp32
# gradients, as under autocast.


def _dense_weight(base, dtype):
    w = base.weight
    quant_state = getattr(w, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, quant_state).to(dtype)
    return w.to(dtype)


def dropout_with_mask(x, p: float):
    """(dropout(x), keep-mask as bool) from one fused kernel: one pass over x
    instead of the five of rand/compare/cast/scale/multiply, and a one-byte
    mask for the backward (a separate function so that tests can regenerate
    the same mask from the same RNG state)."""
    import torch

    return torch.ops.aten.native_dropout(x, p, True)


def _lora_linear_fn():
    import torch

    class LoraLinearFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, lora_a, lora_b, base, scaling: float, p: float, use_fp8: bool):
            cdt = _compute_dtype_of(x)
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(cdt)
            w = _dense_weight(base, cdt)
            y = fp8.linear(x2, w, cdt) if use_fp8 else x2 @ w.t()
            if getattr(base, "bias", None) is not None:
                y += base.bias.to(cdt)
            xd, mask = dropout_with_mask(x2, p) if p > 0 else (x2, None)
            a, b = lora_a.to(cdt), lora_b.to(cdt)
            xa = xd @ a.t()
            y.addmm_(xa, b.t(), alpha=scaling)
            ctx.save_for_backward(xd, xa, lora_a, lora_b, mask)
            ctx.base, ctx.scaling, ctx.cdt, ctx.shape, ctx.p, ctx.fp8 = base, scaling, cdt, shape, p, use_fp8
            return y.view(*shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, dy):
            xd, xa, lora_a, lora_b, mask = ctx.saved_tensors
            cdt, s = ctx.cdt, ctx.scaling
            dy2 = dy.reshape(-1, dy.shape[-1]).to(cdt)
            a, b = lora_a.to(cdt), lora_b.to(cdt)
            dxa = (dy2 @ b).mul_(s)  # (tokens, r)
            d_a = d_b = dx = None
            if ctx.needs_input_grad[2]:
                d_b = (dy2.t() @ xa).mul_(s).to(lora_b.dtype)
            if ctx.needs_input_grad[1]:
                d_a = (dxa.t() @ xd).to(lora_a.dtype)
            if ctx.needs_input_grad[0]:
                w = _dense_weight(ctx.base, cdt)
                dx = fp8.linear_input_grad(dy2, w, cdt) if ctx.fp8 else dy2 @ w
                if mask is None:
                    dx.addmm_(dxa, a)
                else:
                    dx.add_(torch.ops.aten.native_dropout_backward(dxa @ a, mask, 1.0 / (1.0 - ctx.p)))
                dx = dx.view(ctx.shape)
            return dx, d_a, d_b, None, None, None, None

    return LoraLinearFn


_LORA_FN = None


def lora_linear(x, lora_a, lora_b, base, scaling: float, p: float = 0.0, use_fp8: bool = False):
    """base(x) + scaling * dropout_p(x) @ A^T @ B^T as one autograd node; with
    use_fp8 the base product (forward and input gradient) runs in FP8 (`fp8`)."""
    global _LORA_FN
    if _LORA_FN is None:
        _LORA_FN = _lora_linear_fn()
    return _LORA_FN.apply(x, lora_a, lora_b, base, float(scaling), float(p), bool(use_fp8))


def _compute_dtype_of(x):
    """The dtype the products run in: autocast's when it is on, else x's."""
    import torch

    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _frozen_linear_fn():
    import torch

    class FrozenLinearFn(torch.autograd.Function):
        """y = x @ W^T (+ b) of a frozen plain or 4-bit linear with the product in
        FP8; saves nothing (the weight is re-read in the backward, as bitsandbytes does)."""

        @staticmethod
        def forward(ctx, x, base):
            cdt = _compute_dtype_of(x)
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(cdt)
            y = fp8.linear(x2, _dense_weight(base, cdt), cdt)
            if getattr(base, "bias", None) is not None:
                y += base.bias.to(cdt)
            ctx.base, ctx.cdt, ctx.shape = base, cdt, shape
            return y.view(*shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, dy):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(ctx.cdt)
            dx = fp8.linear_input_grad(dy2, _dense_weight(ctx.base, ctx.cdt), ctx.cdt)
            return dx.view(ctx.shape), None

    return FrozenLinearFn


_FROZEN_FN = None


def frozen_linear_fp8(x, base):
    """A frozen linear layer's forward with its product in FP8 (`fp8`)."""
    global _FROZEN_FN
    if _FROZEN_FN is None:
        _FROZEN_FN = _frozen_linear_fn()
    return _FROZEN_FN.apply(x, base)


def _plain_or_4bit_linear(module) -> bool:
    """An nn.Linear or a bitsandbytes 4-bit linear: the weights `_dense_weight` can read."""
    import torch.nn as nn

    is_4bit = type(module).__name__ == "Linear4bit" and hasattr(getattr(module, "weight", None), "quant_state")
    return is_4bit or type(module) is nn.Linear


def _fusable(layer) -> bool:
    """A PEFT LoRA layer over a plain or bitsandbytes-4-bit linear, with one
    vanilla adapter (no DoRA or other variant, no LoRA bias)."""
    import torch.nn as nn

    if not _plain_or_4bit_linear(layer.get_base_layer()):
        return False
    if getattr(layer, "lora_variant", None) or any(getattr(layer, "lora_bias", {}).values()):
        return False
    if any(getattr(layer, "use_dora", {}).values()):
        return False
    return all(isinstance(d, (nn.Dropout, nn.Identity)) for d in layer.lora_dropout.values())


def _fused_lora_forward(layer, original):
    import torch.nn as nn

    def forward(x, *args, **kwargs):
        active = layer.active_adapters
        if args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1 or active[0] not in layer.lora_A:
            return original(x, *args, **kwargs)
        name = active[0]
        drop = layer.lora_dropout[name]
        p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
        return lora_linear(x, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.get_base_layer(),
                           layer.scaling[name], p, getattr(layer, "_kubetune_fp8", False))

    forward._kubetune_fused = True
    return forward


def fuse_lora_layers(model) -> int:
    """Route every fusable PEFT LoRA linear through `lora_linear`; returns how
    many. Idempotent; unfusable layers keep PEFT's forward."""
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and _fusable(module):
            if getattr(module.forward, "_kubetune_fused", False):
                n += 1
                continue
            module.forward = _fused_lora_forward(module, module.forward)
            n += 1
    return n


def _frozen_linear(module) -> bool:
    """A plain or bitsandbytes-4-bit linear layer with every parameter frozen."""
    return _plain_or_4bit_linear(module) and not any(p.requires_grad for p in module.parameters())


def fp8_base_products(model) -> int:
    """Route the frozen base products of the decoder layers through FP8 (`fp8`):
    the fused LoRA layers' base product, and every other frozen linear (the MLP
    without adapters). Not the LM head (the loss stays in bf16). Layers whose
    dimensions are off cuBLASLt's grid (`fp8.pays`) keep bf16.
    Idempotent; returns how many layers run in FP8."""
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        LoraLayer = ()
    n = 0
    for block in decoder_layers(model):
        lora_bases = set()
        for m in block.modules():
            if LoraLayer and isinstance(m, LoraLayer):
                base = m.get_base_layer()
                lora_bases.add(id(base))
                if getattr(m.forward, "_kubetune_fused", False) and fp8.pays(base.in_features, base.out_features):
                    m._kubetune_fp8 = True
                    n += 1
        for m in block.modules():
            if id(m) in lora_bases or not _frozen_linear(m) or not fp8.pays(m.in_features, m.out_features):
                continue
            if not getattr(m.forward, "_kubetune_fp8", False):
                m.forward = _fp8_forward(m)
            n += 1
    return n


def _fp8_forward(module):
    def forward(x, *args, **kwargs):
        return frozen_linear_fp8(x, module)

    forward._kubetune_fp8 = True
    return forward


# --------------------------------------------------------------------------
# Liger kernels and dtype clean-up
# --------------------------------------------------------------------------

def _model_device_is_cuda(model) -> bool:
    try:
        return next(model.parameters()).is_cuda
    except StopIteration:
        return False


def liger_wanted(model) -> bool:
    if os.environ.get(ENV_LIGER, "1") == "0" or not _model_device_is_cuda(model):
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def downcast_frozen_fp32(model, dtype) -> int:
    """Cast frozen floating-point parameters held in fp32 to `dtype`.

    k-bit preparation upcasts every non-quantized weight to fp32 for
    stability; for frozen weights that buys nothing (they get no update) and
    makes the 128k x 4096 output projection run in fp32, off the tensor
    cores, several times slower. Trainable (LoRA) weights keep fp32.
    Returns the number of parameters cast.
    """
    import torch

    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.dtype == torch.float32 and p.is_floating_point():
            p.data = p.data.to(dtype)
            n += p.numel()
    return n


def _compute_dtype(model):
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dt = getattr(base.config, "dtype", None) or getattr(base.config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    if dt not in (torch.bfloat16, torch.float16):
        dt = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    return dt


def apply_fast_paths(model, cfg: Any = None, use_fp8: bool = False) -> None:
    """Swap in the fast kernels on a CUDA model; a no-op on CPU.

    Safe to call before and after the PEFT adapter is attached (the LoRA
    fusion only finds layers once it is). The loss is left alone: TRL's
    SFTTrainer computes it with its own chunked LM head (no full logits),
    which bypasses a patched model forward anyway. With `use_fp8` (decided
    by `train.resolve_fp8` from training.fp8) the frozen base products run
    in FP8 (`fp8_base_products`).
    """
    if not _model_device_is_cuda(model):
        return
    dtype = _compute_dtype(model)
    if dtype is not None:
        n = downcast_frozen_fp32(model, dtype)
        if n:
            log.info("cast %d frozen fp32 parameters to %s", n, dtype)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if liger_wanted(model) and not getattr(base, "_kubetune_liger", False):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(
            model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
        base._kubetune_liger = True
        log.info("liger kernels applied to %s", type(base).__name__)
    # Under ZeRO-3 a base weight is only gathered when its own module runs its forward
    # (DeepSpeed's hooks); the fused node reads it directly, so PEFT's forward stays.
    zero3 = zero3_enabled(getattr(getattr(cfg, "training", None), "strategy", ""))
    if os.environ.get(ENV_FUSED_LORA, "1") != "0" and not zero3:
        n = fuse_lora_layers(model)
        if n:
            log.info("fused %d LoRA linear layers", n)
    if use_fp8:
        log.info("FP8 base products in %d linear layers", fp8_base_products(model))
    # Last, over the fused layers. Not under ZeRO-3: DeepSpeed's gather hooks fire per module.
    if os.environ.get(ENV_COMPILE, "0") == "1" and not zero3:
        log.info("compiled %d decoder layers", compile_layers(model))


def decoder_layers(model) -> list:
    """The transformer blocks of a (PEFT-wrapped) causal LM: the modules transformers
    runs under gradient checkpointing, one per layer."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(model) -> int:
    """torch.compile every decoder layer in place (regional compilation).

    All layers share one code object, so one compilation serves all of them
    (plus one recompile when the packed length first changes: dynamic shapes),
    instead of the minutes a whole-model graph takes; the matrix products stay
    cuBLAS calls, and what Inductor gains is fusing the element-wise work around
    them (residual adds, norms, casts, dropout). `Module.compile` keeps module
    identity, so PEFT, gradient checkpointing and DDP wrap the same objects.
    Returns how many layers were compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def tune_sft_arguments(kwargs: dict, model, cfg: Any) -> tuple[dict, int]:
    """Adjust trl.SFTConfig keyword arguments to this GPU, after the model is
    loaded: with `training.batchSize: auto`, the micro-batch (rows of
    dataset.maxLength tokens) and whether to checkpoint activations come from
    `auto_micro_batch`; an explicit batch size is left alone. Checkpointing
    always uses the non-reentrant implementation (no need for inputs that
    require grad, works with frozen embeddings).

    Returns the arguments and how many of the last decoder layers should run
    without checkpointing (`uncheckpoint_last_layers`, after the Trainer has
    turned checkpointing on): 0 unless the plan leaves memory for them, under
    ZeRO-3 (partitioned weights make the measured memory meaningless) and with
    KUBETUNE_SELECTIVE_CHECKPOINTING=0."""
    out = dict(kwargs)
    skip = 0
    t = getattr(cfg, "training", None)
    if t is not None and t.batch_size == "auto":
        plan = auto_micro_batch(model, cfg, cfg.dataset.max_length)
        out["per_device_train_batch_size"] = plan.rows
        out["per_device_eval_batch_size"] = plan.rows
        out["gradient_checkpointing"] = bool(plan.checkpointing or t.gradient_checkpointing)
        if plan.checkpointing and os.environ.get(ENV_SELECTIVE, "1") != "0" and not zero3_enabled(t.strategy):
            skip = plan.uncheckpointed_layers
        log.info("micro-batch plan: %d x %d tokens, checkpointing=%s, %d last layers without (%.1f of %.1f GiB budget fixed)",
                 plan.rows, cfg.dataset.max_length, out["gradient_checkpointing"], skip, plan.fixed_bytes / GIB,
                 plan.budget_bytes / GIB)
    if out.get("gradient_checkpointing"):
        out["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    return out, skip


def uncheckpoint_last_layers(model, n: int) -> int:
    """Run the last `n` decoder layers without activation checkpointing (their
    activations stay; no recompute). transformers checks the flag per layer on
    every call, so this works once the Trainer has turned checkpointing on.
    The last layers, because their activations are the first the backward frees.
    Returns how many layers were switched."""
    layers = decoder_layers(model)
    chosen = layers[len(layers) - min(n, len(layers)):] if n > 0 else []
    for layer in chosen:
        layer.gradient_checkpointing = False
    return len(chosen)
