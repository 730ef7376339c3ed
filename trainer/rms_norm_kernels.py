"""The Triton kernel of `rms_norm` (imported only when first used: this module imports
triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def backward_kernel(dy_ptr, dx_ptr, x_ptr, w_ptr, rstd_ptr, res_ptr, K, stride_dy, stride_dx, stride_x, stride_res,
                    dy2_ptr, dy3_ptr, stride_dy2, stride_dy3, BLOCK: tl.constexpr, ADD_RES: tl.constexpr,
                    N_DY: tl.constexpr):
    """dx of one row of y = (x * rstd).to(x's dtype) * w (Llama's casting), w frozen:
    dx = rstd * g - rstd^3 / K * sum(g * x) * x with g = dy * w, in fp32 as Liger's
    backward computes it, stored in dx's dtype. dx may be dy itself (in place). With
    ADD_RES, plus the row of res (the gradient x gets from its other reader, the residual
    stream): dx rounded to its dtype first, then the sum rounded again, the two roundings
    autograd's own accumulation of the two gradients makes. With N_DY of 2 or 3, dy is the
    sum of the rows of dy, dy2 (and dy3), the gradients of y's readers, summed in fp32 and
    rounded once to dy's dtype, where autograd would have added them in a pass of their own."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < K
    dy = tl.load(dy_ptr + row * stride_dy + offs, mask=m, other=0.0)
    if N_DY > 1:
        dys = dy.to(tl.float32) + tl.load(dy2_ptr + row * stride_dy2 + offs, mask=m, other=0.0).to(tl.float32)
        if N_DY > 2:
            dys += tl.load(dy3_ptr + row * stride_dy3 + offs, mask=m, other=0.0).to(tl.float32)
        dy = dys.to(dy.dtype)
    x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    g = dy.to(tl.float32) * w
    dx = rstd * g
    dx += rstd * (-(1 / K) * rstd * rstd * tl.sum(g * x, axis=0) * x)
    dx = dx.to(dx_ptr.dtype.element_ty)
    if ADD_RES:
        res = tl.load(res_ptr + row * stride_res + offs, mask=m, other=0.0)
        dx = (dx.to(tl.float32) + res.to(tl.float32)).to(dx_ptr.dtype.element_ty)
    tl.store(dx_ptr + row * stride_dx + offs, dx, mask=m)


@triton.jit(do_not_specialize=["M"])  # the rows of a packed micro-batch change from step to step
def forward_kernel(x_ptr, y_ptr, w_ptr, rstd_ptr, q_ptr, s_ptr, M, K, stride_x, stride_y, eps, r_ptr, sum_ptr,
                   stride_r, stride_sum, BLOCK: tl.constexpr, ROWS: tl.constexpr, ADD_IN: tl.constexpr):
    """One row of Llama's RMSNorm: rstd = 1 / sqrt(mean(x^2) + eps) in fp32 (kept for the
    backward), y = (x * rstd) rounded to x's dtype, times w, rounded again. With ROWS also y's
    e4m3 row and scale, as `fp8.rows_kernel` makes them from y; the grid then covers the rows
    up to the grid of 16 too, which get zeros and scale 1. With ADD_IN the row normalised is
    x + r, rounded to x's dtype as autograd's add rounds it, and stored to sum_ptr too."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < K
    inside = row < M
    here = offs < tl.where(inside, K, 0)  # padding rows: none
    x = tl.load(x_ptr + row * stride_x + offs, mask=here, other=0.0)
    if ADD_IN:
        r = tl.load(r_ptr + row * stride_r + offs, mask=here, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_sum + offs, x, mask=here)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / K + eps)  # eps an fp32 scalar argument
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = ((xf * rstd).to(x.dtype).to(tl.float32) * w).to(y_ptr.dtype.element_ty)
    if inside:
        tl.store(rstd_ptr + row, rstd)
        tl.store(y_ptr + row * stride_y + offs, y, mask=m)
    if ROWS:
        yf = y.to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(yf), axis=0), 1e-12)
        q = tl.clamp(yf * (448.0 / amax), -448.0, 448.0)
        tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv), mask=m)
        tl.store(s_ptr + row, tl.where(inside, amax / 448.0, 1.0))
