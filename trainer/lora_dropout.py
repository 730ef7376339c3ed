"""LoRA dropout inside the adapter's own products: no dropped copy of the input.

Why: LoRA applies dropout to the layer input before the rank-r product A,
so PEFT (and `lora_kernels` before this) writes a dropped copy of x (16k x 4096
bf16 = 128 MiB per projection on an 8B micro-batch), a mask, reads both again
in the product, and in the backward writes (dy B) A, its masked copy and the sum
into dx: about 42 ms of dropout kernels and half of 35 ms of element-wise adds
in a 1.05 s step (bench/RESULTS.md, the FP8 profile), for four projections a
layer. Here the keep-mask is drawn inside the kernels from a seed (Philox,
counter = element index), so it never exists in memory, and the same seed
regenerates it in the backward:

- forward:  xa = (x * keep / (1-p)) @ A^T                      one read of x
- backward: dx += ((dy B s) @ A) * keep / (1-p)                 one read-modify-write of dx
            dA  = (dy B s)^T @ (x * keep / (1-p))              one read of x

The seed comes from the CPU generator, which gradient checkpointing restores
before the recompute (`preserve_rng_state`), so the recomputed forward draws
the same mask as the first one. The mask differs from `torch.nn.Dropout`'s
stream but has its law: each element kept with probability 1-p, independently.

`usable` says when the kernels apply (CUDA, or Triton's interpreter in tests;
rank <= 128; fewer than 2^31 elements, Philox's 32-bit counter); otherwise the
caller keeps the dropped-copy path.
"""

from __future__ import annotations

import functools
import os

MAX_RANK = 128
_COUNTER_LIMIT = 2**31


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def usable(x2, rank: int) -> bool:
    """x2 (M, K) row-major in the compute dtype, an adapter of `rank`."""
    return ((x2.is_cuda or _interpreting()) and rank <= MAX_RANK and x2.numel() < _COUNTER_LIMIT
            and x2.stride(1) == 1 and x2.stride(0) == x2.shape[1])


def new_seed() -> int:
    """A seed from the CPU generator (no device sync; restored by checkpointing)."""
    import torch

    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _rank_block(rank: int) -> int:
    # tl.dot wants every dimension >= 16.
    return max(16, 1 << (rank - 1).bit_length())


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    # Each kernel draws keep = rand(seed, row * K + col) >= p inline (the same expression
    # everywhere: the mask is that expression). Not a shared @triton.jit helper: kernels built
    # in this function see no other jit function by name, on the GPU or in the interpreter.

    @triton.jit
    def forward_kernel(x_ptr, a_ptr, out_ptr, seed, M, K, R, p, scale,
                       BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        ranks = tl.arange(0, BR)
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            inside = (rows[:, None] < M) & (cols[None, :] < K)
            x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            keep = tl.rand(seed, rows[:, None] * K + cols[None, :]) >= p
            xd = tl.where(keep, x * scale, 0.0).to(x_ptr.dtype.element_ty)
            a = tl.load(a_ptr + ranks[None, :] * K + cols[:, None], mask=(ranks[None, :] < R) & (cols[:, None] < K),
                        other=0.0)
            acc += tl.dot(xd, a)
        tl.store(out_ptr + rows[:, None] * R + ranks[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (ranks[None, :] < R))

    @triton.jit
    def input_grad_kernel(dx_ptr, dxa_ptr, a_ptr, seed, M, K, R, p, scale,
                          BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        ranks = tl.arange(0, BR)
        dxa = tl.load(dxa_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < M) & (ranks[None, :] < R),
                      other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K),
                    other=0.0)
        t = tl.dot(dxa, a)
        keep = tl.rand(seed, rows[:, None] * K + cols[None, :]) >= p
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        ptrs = dx_ptr + rows[:, None] * K + cols[None, :]
        dx = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
        dx += tl.where(keep, t * scale, 0.0)
        tl.store(ptrs, dx.to(dx_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def a_grad_kernel(part_ptr, dxa_ptr, x_ptr, seed, M, K, R, p, scale, rows_per_split,
                      BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        cols = tl.program_id(0) * BK + tl.arange(0, BK)
        split = tl.program_id(1)
        ranks = tl.arange(0, BR)
        acc = tl.zeros((BR, BK), dtype=tl.float32)
        start = split * rows_per_split
        for m0 in range(start, start + rows_per_split, BM):
            rows = m0 + tl.arange(0, BM)
            inside = (rows[:, None] < M) & (cols[None, :] < K)
            x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            keep = tl.rand(seed, rows[:, None] * K + cols[None, :]) >= p
            xd = tl.where(keep, x * scale, 0.0).to(x_ptr.dtype.element_ty)
            dxa_t = tl.load(dxa_ptr + rows[None, :] * R + ranks[:, None],
                            mask=(rows[None, :] < M) & (ranks[:, None] < R), other=0.0)
            acc += tl.dot(dxa_t, xd)
        tl.store(part_ptr + split * R * K + ranks[:, None] * K + cols[None, :], acc,
                 mask=(ranks[:, None] < R) & (cols[None, :] < K))

    @triton.jit
    def mask_kernel(out_ptr, seed, M, K, p, BM: tl.constexpr, BK: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        keep = tl.rand(seed, rows[:, None] * K + cols[None, :]) >= p
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < M) & (cols[None, :] < K))

    return triton, forward_kernel, input_grad_kernel, a_grad_kernel, mask_kernel


_BM, _BK = 64, 64


def lora_a_forward(x2, a, seed: int, p: float):
    """(dropout(x2) @ a^T) for x2 (M, K), a (R, K) in x2's dtype: (M, R)."""
    import torch

    triton, fwd, _, _, _ = _kernels()
    m, k = x2.shape
    r = a.shape[0]
    out = torch.empty((m, r), dtype=x2.dtype, device=x2.device)
    fwd[(triton.cdiv(m, _BM),)](x2, a.contiguous(), out, seed, m, k, r, p, 1.0 / (1.0 - p),
                                BM=_BM, BK=_BK, BR=_rank_block(r))
    return out


def add_input_grad(dx, dxa, a, seed: int, p: float) -> None:
    """dx += ((dxa @ a) * keep / (1-p)), in place; dx (M, K), dxa (M, R), a (R, K)."""
    triton, _, bwd_x, _, _ = _kernels()
    m, k = dx.shape
    r = a.shape[0]
    bwd_x[(triton.cdiv(m, _BM), triton.cdiv(k, _BK))](dx, dxa.contiguous(), a.contiguous(), seed, m, k, r, p,
                                                    1.0 / (1.0 - p), BM=_BM, BK=_BK, BR=_rank_block(r))


def a_grad(dxa, x2, seed: int, p: float, splits: int = 0):
    """dxa^T @ dropout(x2) in fp32: (R, K). The rows are split over `splits`
    programs per column block (partial sums added by torch: deterministic)."""
    import torch

    triton, _, _, bwd_a, _ = _kernels()
    m, k = x2.shape
    r = dxa.shape[1]
    col_blocks = triton.cdiv(k, _BK)
    if splits <= 0:  # about 1,000 programs: several waves on 132 SMs, partials of a few MiB
        splits = max(1, min(triton.cdiv(m, _BM), 1024 // col_blocks))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), _BM) * _BM
    splits = triton.cdiv(m, rows_per_split)
    part = torch.empty((splits, r, k), dtype=torch.float32, device=x2.device)
    bwd_a[(col_blocks, splits)](part, dxa.contiguous(), x2, seed, m, k, r, p, 1.0 / (1.0 - p), rows_per_split,
                                BM=_BM, BK=_BK, BR=_rank_block(r))
    return part.sum(dim=0)


def keep_mask(seed: int, m: int, k: int, p: float, device):
    """The (m, k) keep-mask the kernels draw for `seed`, as bool: for checks."""
    import torch

    triton, _, _, _, mask = _kernels()
    out = torch.empty((m, k), dtype=torch.int8, device=device)
    mask[(triton.cdiv(m, _BM), triton.cdiv(k, _BK))](out, seed, m, k, p, BM=_BM, BK=_BK)
    return out.bool()
