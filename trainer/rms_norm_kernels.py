"""The Triton kernel of `rms_norm` (imported only when first used: this module imports
triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def backward_kernel(dy_ptr, dx_ptr, x_ptr, w_ptr, rstd_ptr, K, stride_dy, stride_dx, stride_x,
                    BLOCK: tl.constexpr):
    """dx of one row of y = (x * rstd).to(x's dtype) * w (Llama's casting), w frozen:
    dx = rstd * g - rstd^3 / K * sum(g * x) * x with g = dy * w, in fp32 as Liger's
    backward computes it, stored in dx's dtype. dx may be dy itself (in place)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < K
    dy = tl.load(dy_ptr + row * stride_dy + offs, mask=m, other=0.0)
    x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    g = dy.to(tl.float32) * w
    dx = rstd * g
    dx += rstd * (-(1 / K) * rstd * rstd * tl.sum(g * x, axis=0) * x)
    tl.store(dx_ptr + row * stride_dx + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def forward_kernel(x_ptr, y_ptr, w_ptr, rstd_ptr, K, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    """One row of Llama's RMSNorm: rstd = 1 / sqrt(mean(x^2) + eps) in fp32 (kept for the
    backward), y = (x * rstd) rounded to x's dtype, times w, rounded again."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / K + eps)  # eps an fp32 scalar argument
    tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = (xf * rstd).to(x.dtype).to(tl.float32) * w
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=m)
