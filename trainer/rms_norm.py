"""RMSNorm with a frozen weight: forward and backward of one program per row.

Why: Liger's RMSNorm backward (liger-kernel 0.8.5) runs one program per SM, each looping
over its share of the rows one after another (and, with the weight trainable, summing
their weight gradient). On an 8B step of 16k tokens x 4096 that loop took 0.187 ms a call,
against 0.068 ms for its forward, which reads and writes half as much (bench/RESULTS.md,
issue 16, tenth round). A LoRA run never trains the norm's weight, so nothing has to be
summed across rows: here each row is one program in both directions, and the backward is
one read of dy and x and one write of dx, in place into dy as Liger's Llama norm does. The
forward is Llama's (and Liger's "llama" casting): the rstd in fp32, the normalised row
rounded to the compute dtype before the weight.

`use_frozen_backward` routes a norm module that Liger patched (Llama's casting, no offset)
through it while its weight is frozen; a trainable weight keeps Liger's node.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton

    from kubetune.trainer import rms_norm_kernels as k

    return triton, k


def _warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def normalize(x2, w, eps: float, rows: bool = False):
    """(y, rstd, y's rows) of Llama's RMSNorm of x2 (M, K) with weight w (K,): y in x2's
    dtype, rstd fp32 (M,); with `rows` also y's `fp8.quantize_rows` (q, scale) from the same
    kernel (y is not read back for them), else None."""
    import torch

    from kubetune.trainer import fp8

    triton, k = _kernels()
    m, kk = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(m, dtype=torch.float32, device=x2.device)
    q = s = None
    grid = m
    if rows:
        grid = fp8.padded_rows(m)
        q = torch.empty((grid, kk), dtype=torch.float8_e4m3fn, device=x2.device)
        s = torch.empty((grid, 1), dtype=torch.float32, device=x2.device)
    block = triton.next_power_of_2(kk)
    if grid:
        k.forward_kernel[(grid,)](x2, y, w, rstd, q if rows else y, s if rows else rstd, m, kk, x2.stride(0),
                                  y.stride(0), float(eps), BLOCK=block, ROWS=rows, num_warps=_warps(block))
    return y, rstd, ((q, s) if rows else None)


def normalize_backward(dy2, x2, w, rstd, out=None):
    """dx (M, K) of the frozen-weight norm from dy2 and its saved x2 (M, K) and rstd (M,);
    written into `out` (dy2 itself for in place), else a new tensor."""
    import torch

    triton, k = _kernels()
    m, kk = x2.shape
    dx = torch.empty_like(dy2) if out is None else out
    block = triton.next_power_of_2(kk)
    if m:
        k.backward_kernel[(m,)](dy2, dx, x2, w, rstd, kk, dy2.stride(0), dx.stride(0), x2.stride(0), BLOCK=block,
                                num_warps=_warps(block))
    return dx


@functools.lru_cache(maxsize=None)
def _function():
    import torch

    class FrozenRMSNormFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, eps: float, offer_rows: bool):
            from kubetune.trainer import fp8

            x2 = x.contiguous().view(-1, x.shape[-1])
            y, rstd, rows = normalize(x2, w, eps, rows=offer_rows)
            ctx.save_for_backward(x2, w, rstd)
            ctx.shape = x.shape
            out = y.view(x.shape)
            if rows is not None:
                fp8.shared_rows.offer(out, rows)
            return out

        @staticmethod
        def backward(ctx, dy):
            x2, w, rstd = ctx.saved_tensors
            dy2 = dy.contiguous().view(-1, x2.shape[1])
            return normalize_backward(dy2, x2, w, rstd, out=dy2).view(ctx.shape), None, None, None

    return FrozenRMSNormFn


def frozen_rms_norm(x, w, eps: float, offer_rows: bool = False):
    """Llama's RMSNorm of x with the frozen weight w (`normalize`, `normalize_backward`).
    `offer_rows`: the output's e4m3 rows, made by the norm's own kernel, are left in
    `fp8.shared_rows` for the FP8 projections that read the output next (the attention's
    q/k/v, the MLP's gate/up): one pass over a 16k x 4096 activation less per norm."""
    return _function().apply(x, w, float(eps), bool(offer_rows))


def use_frozen_backward(norm) -> bool:
    """Route a norm module Liger patched (its `casting_mode` Llama's, no offset) through
    `frozen_rms_norm` while its weight is frozen (checked at each call: a weight made
    trainable later gets Liger's node back). True if routed; idempotent."""
    mode = getattr(norm, "casting_mode", None)
    if getattr(norm, "_kubetune_frozen_norm", False):
        return True
    if mode not in ("llama", 0) or getattr(norm, "offset", None) != 0 or getattr(norm, "weight", None) is None:
        return False
    liger_forward = norm.forward

    def forward(hidden_states):
        if norm.weight.requires_grad:
            return liger_forward(hidden_states)
        return frozen_rms_norm(hidden_states, norm.weight, norm.variance_epsilon,
                               getattr(norm, "_kubetune_offer_rows", False))

    norm.forward = forward
    norm._kubetune_frozen_norm = True
    return True
