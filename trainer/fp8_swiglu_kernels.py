"""The Triton kernels of the SwiGLU product in FP8 (`fp8.swiglu_rows`,
`fp8.swiglu_backward_`, `fp8.swiglu_backward_rows`), imported only when first used:
this module imports triton. Module-level, not nested in a function, because the
helpers they call must be globals for Triton's interpreter to find them.
"""

from __future__ import annotations

import triton
import triton.language as tl


# The row kernels below need a row's maximum before they can write any of it. ONE_PASS:
# the whole row in registers (BLOCK, a power of two >= K). Otherwise two passes over
# CHUNK-wide pieces: the maxima, then the same values again and the stores; the second
# reads come mostly from L2, and no program holds a 14,336-wide row of several fp32
# tensors in registers (which spills). The values are the same either way.
@triton.jit
def _swiglu_h(a_ptr, b_ptr, row, offs, m, stride_a, stride_b, ROUND_TO: tl.constexpr):
    a = tl.load(a_ptr + row * stride_a + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * stride_b + offs, mask=m, other=0.0).to(tl.float32)
    silu = (a * tl.sigmoid(a)).to(ROUND_TO).to(tl.float32)
    return (silu * b).to(ROUND_TO).to(tl.float32)


@triton.jit(do_not_specialize=["M"])  # as fp8.rows_kernel
def swiglu_rows_kernel(a_ptr, b_ptr, q_ptr, s_ptr, M, K, stride_a, stride_b, ROUND_TO: tl.constexpr,
                       BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, CHUNK: tl.constexpr):
    # h = silu(a) * b rounded as the unfused path rounds it (silu to the compute dtype,
    # then the product), and h's row straight to e4m3 as `rows_kernel` does: h is never
    # written. Rows M.. (the padding) get zeros and scale 1.
    row = tl.program_id(0)
    n = tl.where(row < M, K, 0)  # a padding row reads nothing
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        h = _swiglu_h(a_ptr, b_ptr, row, offs, offs < n, stride_a, stride_b, ROUND_TO)
        amax = tl.maximum(tl.max(tl.abs(h), axis=0), 1e-12)
        q = tl.clamp(h * (448.0 / amax), -448.0, 448.0)
        tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv), mask=offs < K)
    else:
        acc = tl.zeros([CHUNK], dtype=tl.float32)
        for c in range(0, K, CHUNK):
            offs = c + tl.arange(0, CHUNK)
            acc = tl.maximum(acc, tl.abs(_swiglu_h(a_ptr, b_ptr, row, offs, offs < n, stride_a, stride_b,
                                                   ROUND_TO)))
        amax = tl.maximum(tl.max(acc, axis=0), 1e-12)
        for c in range(0, K, CHUNK):
            offs = c + tl.arange(0, CHUNK)
            h = _swiglu_h(a_ptr, b_ptr, row, offs, offs < n, stride_a, stride_b, ROUND_TO)
            q = tl.clamp(h * (448.0 / amax), -448.0, 448.0)
            tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv), mask=offs < K)
    tl.store(s_ptr + row, tl.where(row < M, amax / 448.0, 1.0))


@triton.jit
def swiglu_backward_kernel(a_ptr, b_ptr, dh_ptr, N, BLOCK: tl.constexpr):
    # In place, as Liger's SwiGLU backward: a <- dL/da, b <- dL/db (a and b are this
    # node's own saved tensors, read once here).
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    a = tl.load(a_ptr + i, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + i, mask=m, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + i, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    tl.store(b_ptr + i, (dh * silu).to(b_ptr.dtype.element_ty), mask=m)
    tl.store(a_ptr + i, (dh * b * (sig + silu * (1.0 - sig))).to(a_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_grads(a_ptr, b_ptr, dh_ptr, row, offs, m, stride_a, stride_b, stride_dh, ROUND_TO: tl.constexpr):
    # (dL/da, dL/db), rounded to the compute dtype as `swiglu_backward_kernel` stores them
    a = tl.load(a_ptr + row * stride_a + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * stride_b + offs, mask=m, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + row * stride_dh + offs, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    db = (dh * silu).to(ROUND_TO).to(tl.float32)
    da = (dh * b * (sig + silu * (1.0 - sig))).to(ROUND_TO).to(tl.float32)
    return da, db


@triton.jit(do_not_specialize=["M"])  # as fp8.rows_kernel
def swiglu_backward_rows_kernel(a_ptr, b_ptr, dh_ptr, qa_ptr, sa_ptr, qb_ptr, sb_ptr, M, K,
                                stride_a, stride_b, stride_dh, ROUND_TO: tl.constexpr, BLOCK: tl.constexpr,
                                ONE_PASS: tl.constexpr, CHUNK: tl.constexpr):
    # dL/da and dL/db of one row straight to their e4m3 rows (`rows_kernel`'s recipe),
    # each with its own scale: for a frozen gate / up whose only use of them is the FP8
    # input gradient. ONE_PASS and CHUNK as in `swiglu_rows_kernel`.
    row = tl.program_id(0)
    n = tl.where(row < M, K, 0)  # a padding row reads nothing
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        da, db = _swiglu_grads(a_ptr, b_ptr, dh_ptr, row, offs, offs < n, stride_a, stride_b, stride_dh,
                               ROUND_TO)
        amax_a = tl.maximum(tl.max(tl.abs(da), axis=0), 1e-12)
        amax_b = tl.maximum(tl.max(tl.abs(db), axis=0), 1e-12)
        out = offs < K
        tl.store(qa_ptr + row * K + offs, tl.clamp(da * (448.0 / amax_a), -448.0, 448.0).to(tl.float8e4nv),
                 mask=out)
        tl.store(qb_ptr + row * K + offs, tl.clamp(db * (448.0 / amax_b), -448.0, 448.0).to(tl.float8e4nv),
                 mask=out)
    else:
        acc_a = tl.zeros([CHUNK], dtype=tl.float32)
        acc_b = tl.zeros([CHUNK], dtype=tl.float32)
        for c in range(0, K, CHUNK):
            offs = c + tl.arange(0, CHUNK)
            da, db = _swiglu_grads(a_ptr, b_ptr, dh_ptr, row, offs, offs < n, stride_a, stride_b, stride_dh,
                                   ROUND_TO)
            acc_a = tl.maximum(acc_a, tl.abs(da))
            acc_b = tl.maximum(acc_b, tl.abs(db))
        amax_a = tl.maximum(tl.max(acc_a, axis=0), 1e-12)
        amax_b = tl.maximum(tl.max(acc_b, axis=0), 1e-12)
        for c in range(0, K, CHUNK):
            offs = c + tl.arange(0, CHUNK)
            da, db = _swiglu_grads(a_ptr, b_ptr, dh_ptr, row, offs, offs < n, stride_a, stride_b, stride_dh,
                                   ROUND_TO)
            out = offs < K
            tl.store(qa_ptr + row * K + offs,
                     tl.clamp(da * (448.0 / amax_a), -448.0, 448.0).to(tl.float8e4nv), mask=out)
            tl.store(qb_ptr + row * K + offs,
                     tl.clamp(db * (448.0 / amax_b), -448.0, 448.0).to(tl.float8e4nv), mask=out)
    tl.store(sa_ptr + row, tl.where(row < M, amax_a / 448.0, 1.0))
    tl.store(sb_ptr + row, tl.where(row < M, amax_b / 448.0, 1.0))
