"""Fast paths the trainer turns on when it runs on a GPU.

The trainer calls two functions, both safe on a CPU-only machine:

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
- `apply_fast_paths(model, cfg)` after the PEFT adapter is attached: Liger
  kernels (fused RMSNorm, RoPE, SwiGLU and a fused linear + cross-entropy loss
  that never materialises the vocab-sized logits) when liger-kernel is
  importable and the model sits on a CUDA device, and frozen fp32 copies of
  embeddings / lm_head (left by k-bit preparation) cast back to the compute
  dtype, so that the 128k-vocab output projection runs on the tensor cores.

The memory planning (`plan_micro_batch`) is pure arithmetic on the model's
shape so that it can be unit tested on a CPU; `auto_micro_batch` feeds it
the device's numbers.

Nothing GPU-only is imported at module import time.

Environment overrides, for benchmarks and for debugging a bad kernel:
`KUBETUNE_ATTENTION` (an attention implementation name, e.g. "sdpa"),
`KUBETUNE_LIGER=0` (no Liger kernels), `KUBETUNE_MEMORY_BUDGET_GIB` (the GPU
memory the automatic micro-batch sizing may plan for; default: 90% of the
device).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

log = logging.getLogger(__name__)

VARLEN_ATTENTION = "kubetune_varlen"
ENV_ATTENTION = "KUBETUNE_ATTENTION"
ENV_LIGER = "KUBETUNE_LIGER"
ENV_MEMORY_BUDGET = "KUBETUNE_MEMORY_BUDGET_GIB"

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
    sample. `attention_mask` is ignored: transformers builds none for an
    attention function that has no mask function registered, and a right-padded
    row is still correct under a causal kernel (real tokens never look right).
    """
    if dropout:
        raise ValueError("kubetune varlen attention does not implement attention dropout")
    import torch

    bsz, n_heads, seq, head_dim = query.shape
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

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
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
    kv = shape.hidden // shape.heads * shape.kv_heads
    per_layer = (7 * shape.hidden + 2 * kv + 4 * shape.intermediate) * bytes_per_value
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
    as fit, up to `max_tokens`. At least one row: if even that does not fit,
    raise with the numbers, rather than fail later with a CUDA OOM.
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
    if rows < 1:
        raise MemoryError(
            f"one row of {max_length} tokens needs about {per_tok * max_length / GIB:.1f} GiB of activations "
            f"but only {max(free, 0) / GIB:.1f} GiB of the {budget_bytes / GIB:.1f} GiB budget is left after "
            f"{fixed_bytes / GIB:.1f} GiB of weights; lower dataset.maxLength or raise {ENV_MEMORY_BUDGET}"
        )
    return MicroBatchPlan(int(rows), int(rows) * max_length, True, per_tok, budget_bytes, fixed_bytes)


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
        fused_loss=liger_wanted(model),
    )


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


def apply_fast_paths(model, cfg: Any = None) -> None:
    """Swap in the fast kernels on a CUDA model; a no-op on CPU."""
    if not _model_device_is_cuda(model):
        return
    dtype = _compute_dtype(model)
    if dtype is not None:
        n = downcast_frozen_fp32(model, dtype)
        if n:
            log.info("cast %d frozen fp32 parameters to %s", n, dtype)
    if liger_wanted(model):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        _apply_liger_kernel_to_instance(
            model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True
        )
        log.info("liger kernels applied to %s", type(base).__name__)
