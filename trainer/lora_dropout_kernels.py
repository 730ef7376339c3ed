"""The Triton kernels of `lora_dropout` (imported only when first used: this
module imports triton).

The keep-mask of element (row, col) of an (M, K) input: Philox-4x32 with the
run's seed and counter row * K/8 + col/8 gives four 32-bit words, cut into eight
16-bit numbers u, one per column of that group of 8; the element is kept when
u >= threshold (threshold = round(p * 65536)). One Philox call per 8 elements
instead of one per element: drawing the mask costs a few microseconds per
projection rather than being the kernels' bound. `keep_tile` is the one place
that says this; every kernel calls it.

The seed (a fresh random number per product) and the row count M (the tokens of a
packed micro-batch) are not specialised on: Triton would otherwise compile each
kernel again for a seed or a count that happens to be a multiple of 16, in the
middle of a run (a second each), and a warm-up (`kernel_warmup`) could not know
which variant a run needs.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Arguments that change from call to call (module docstring).
RUN_VARYING = ("seed", "M")


@triton.jit
def keep_tile(seed, rows, k0, KG, threshold, BM: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr):
    """Keep-mask of rows x columns [k0, k0 + BK) (k0 and BK multiples of 8), from Philox
    with ROUNDS rounds."""
    G: tl.constexpr = BK // 8
    groups = rows[:, None] * KG + (k0 // 8 + tl.arange(0, G))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, groups, ROUNDS)
    a = tl.join(r0 & 0xFFFF, r0 >> 16)
    b = tl.join(r1 & 0xFFFF, r1 >> 16)
    c = tl.join(r2 & 0xFFFF, r2 >> 16)
    d = tl.join(r3 & 0xFFFF, r3 >> 16)
    u = tl.reshape(tl.join(tl.join(a, b), tl.join(c, d)), (BM, BK))
    return u >= threshold


@triton.jit
def dropped_tile(x_ptr, rows, k0, M, K, seed, threshold, scale, BM: tl.constexpr, BK: tl.constexpr,
                 ROUNDS: tl.constexpr):
    """x[rows, k0:k0+BK] * keep * scale in x's dtype (zero outside the matrix)."""
    cols = k0 + tl.arange(0, BK)
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
    keep = keep_tile(seed, rows, k0, K // 8, threshold, BM, BK, ROUNDS)
    return tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x_ptr.dtype.element_ty)


@triton.jit(do_not_specialize=RUN_VARYING)
def forward_kernel(x_ptr, a_ptr, out_ptr, seed, M, K, R, threshold, scale,
                   BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, ROUNDS: tl.constexpr):
    """out (M, R) = (x * keep * scale) @ a^T, for x (M, K), a (R, K)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ranks = tl.arange(0, BR)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        xd = dropped_tile(x_ptr, rows, k0, M, K, seed, threshold, scale, BM, BK, ROUNDS)
        a = tl.load(a_ptr + ranks[None, :] * K + cols[:, None], mask=(ranks[None, :] < R) & (cols[:, None] < K),
                    other=0.0)
        acc += tl.dot(xd, a)
    tl.store(out_ptr + rows[:, None] * R + ranks[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (ranks[None, :] < R))


@triton.jit(do_not_specialize=RUN_VARYING)
def input_grad_kernel(dx_ptr, dxa_ptr, a_ptr, seed, M, K, R, threshold, scale,
                      BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, ROUNDS: tl.constexpr,
                      DROP: tl.constexpr = True):
    """dx (M, K) += ((dxa @ a) * keep * scale), dxa (M, R), a (R, K); without DROP no mask
    (dx += (dxa @ a) * scale: the forward's B product added into the base output)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    k0 = tl.program_id(1) * BK
    cols = k0 + tl.arange(0, BK)
    ranks = tl.arange(0, BR)
    dxa = tl.load(dxa_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < M) & (ranks[None, :] < R),
                  other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K),
                other=0.0)
    t = tl.dot(dxa, a) * scale
    if DROP:
        t = tl.where(keep_tile(seed, rows, k0, K // 8, threshold, BM, BK, ROUNDS), t, 0.0)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    ptrs = dx_ptr + rows[:, None] * K + cols[None, :]
    dx = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32) + t
    tl.store(ptrs, dx.to(dx_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=RUN_VARYING)
def a_grad_kernel(part_ptr, dxa_ptr, x_ptr, seed, M, K, R, threshold, scale, rows_per_split,
                  BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, ROUNDS: tl.constexpr):
    """part[split] (R, K) = dxa[rows]^T @ (x[rows] * keep * scale) over this split's rows."""
    k0 = tl.program_id(0) * BK
    cols = k0 + tl.arange(0, BK)
    split = tl.program_id(1)
    ranks = tl.arange(0, BR)
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    start = split * rows_per_split
    for m0 in range(start, start + rows_per_split, BM):
        rows = m0 + tl.arange(0, BM)
        xd = dropped_tile(x_ptr, rows, k0, M, K, seed, threshold, scale, BM, BK, ROUNDS)
        dxa_t = tl.load(dxa_ptr + rows[None, :] * R + ranks[:, None], mask=(rows[None, :] < M) & (ranks[:, None] < R),
                        other=0.0)
        acc += tl.dot(dxa_t, xd)
    tl.store(part_ptr + split * R * K + ranks[:, None] * K + cols[None, :], acc,
             mask=(ranks[:, None] < R) & (cols[None, :] < K))


@triton.jit(do_not_specialize=RUN_VARYING)
def mask_kernel(out_ptr, seed, M, K, threshold, BM: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr):
    """The keep-mask itself, as int8 (for checks)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    k0 = tl.program_id(1) * BK
    cols = k0 + tl.arange(0, BK)
    keep = keep_tile(seed, rows, k0, K // 8, threshold, BM, BK, ROUNDS)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < M) & (cols[None, :] < K))
