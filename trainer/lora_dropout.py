"""LoRA dropout inside the adapter's own products: no dropped copy of the input.

Why: LoRA applies dropout to the layer input before the rank-r product A,
so PEFT (and `lora_kernels` before this) writes a dropped copy of x (16k x 4096
bf16 = 128 MiB per projection on an 8B micro-batch), a mask, reads both again
in the product, and in the backward writes (dy B) A, its masked copy and the sum
into dx: about 42 ms of dropout kernels and half of 35 ms of element-wise adds
in a 1.05 s step (bench/RESULTS.md, the FP8 profile), for four projections a
layer. Here the keep-mask is drawn inside the kernels from a seed (Philox,
one call per 8 elements: `lora_dropout_kernels`), so it never exists in
memory, and the same seed regenerates it in the backward:

- forward:  xa = (x * keep / (1-p)) @ A^T                      one read of x
- backward: dx += ((dy B s) @ A) * keep / (1-p)                 one read-modify-write of dx
            dA  = (dy B s)^T @ (x * keep / (1-p))              one read of x

The seed comes from the CPU generator, which gradient checkpointing restores
before the recompute (`preserve_rng_state`), so the recomputed forward draws
the same mask as the first one. The mask differs from `torch.nn.Dropout`'s
stream but has its law: each element kept with probability 1-p, independently.

`usable` says when the kernels apply (CUDA, or Triton's interpreter in tests;
rank <= 128; rows a multiple of 8 wide; fewer than 2^31 elements, the kernels'
32-bit offsets); otherwise the caller keeps the dropped-copy path.
"""

from __future__ import annotations

import functools
import os
import weakref

MAX_RANK = 128
_COUNTER_LIMIT = 2**31


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def usable(x2, rank: int) -> bool:
    """x2 (M, K) row-major in the compute dtype, an adapter of `rank`."""
    return ((x2.is_cuda or _interpreting()) and rank <= MAX_RANK and x2.numel() < _COUNTER_LIMIT
            and x2.shape[1] % 8 == 0 and x2.stride(1) == 1 and x2.stride(0) == x2.shape[1])


def new_seed() -> int:
    """A seed from the CPU generator (no device sync; restored by checkpointing)."""
    import torch

    return int(torch.randint(0, 2**31 - 1, (1,)).item())


class KeptProducts:
    """Each product xa = dropout(x) @ A^T from its first forward to its recompute.

    Why: under gradient checkpointing the backward runs each layer's forward again, and
    the recompute draws the same seed (checkpointing restores the CPU generator), so it
    would make the same xa from the same input: on 8B, 128 forward kernels a step at 0.08
    ms each, half of it drawing the mask (bench/probe_dropout_rounds_h200.json). Kept
    instead: tokens x rank values (512 KiB at 16k tokens, rank 16; `memory_plan` counts
    them), until the recompute takes the product or the node that made it is freed (after
    its backward, or with its graph: a forward without a backward keeps nothing).

    A product is found by its adapter, two draws of the generator (the kernel's seed and
    one more: 62 bits, so that two products never meet by chance) and its row count, and
    only in a recompute (inside a backward), where the forward it repeats had stored it."""

    def __init__(self) -> None:
        self._entries: dict = {}

    @staticmethod
    def _in_backward() -> bool:
        import torch

        current = getattr(torch._C, "_current_graph_task_id", None)
        return current is not None and current() != -1

    def product(self, ctx, lora_a, x2, a, seed: int, p: float):
        """xa for this node (`ctx`): the kept one in a recompute, else made (and kept
        for the recompute when this is a first forward)."""
        key = (id(lora_a), seed, new_seed(), x2.shape[0])
        if self._in_backward():
            kept = self._entries.pop(key, None)  # its shape is in the key (the adapter's rank, the rows)
            return kept if kept is not None else lora_a_forward(x2, a, seed, p)
        xa = lora_a_forward(x2, a, seed, p)
        self._entries[key] = xa
        weakref.finalize(ctx, self._entries.pop, key, None)
        return xa

    def __len__(self) -> int:
        return len(self._entries)


kept_products = KeptProducts()


def _rank_block(rank: int) -> int:
    # tl.dot wants every dimension >= 16.
    return max(16, 1 << (rank - 1).bit_length())


def threshold_and_scale(p: float) -> tuple[int, float]:
    """The 16-bit threshold of the keep test (u >= threshold keeps, u uniform on
    0..65535) and the scale of a kept element: 1 / (1 - p) with p the probability
    the threshold gives (within 2^-17 of the one asked for), so that the dropped
    input's expectation is x exactly."""
    threshold = min(65535, max(0, round(p * 65536)))
    return threshold, 65536.0 / (65536 - threshold)


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton

    from kubetune.trainer import lora_dropout_kernels as k

    return triton, k


# Tiles and launch options of each kernel. `tiles` arguments override them (the sweep of
# bench/tune_lora_dropout.py); the mask does not depend on them (it is a function of the
# element's row and column group), only the products' summation order does.
# forward: BM rows x BK columns per step of the K loop, one program per BM rows;
# input gradient: one BM x BK tile of dx per program (read-modify-write);
# A gradient: BK columns per program over a split of the rows, about `programs` programs,
# partial sums added by torch (deterministic, unlike atomics).
# The fastest of bench/tune_lora_dropout.py's grid on an H200 at 16k tokens x 4096, rank 16
# (record: bench/tune_lora_dropout_h200.json): forward 0.0732 ms against 0.0761 for the
# earlier 32 x 128 / 4 warps, input gradient 0.0935 against 0.1060 (64 x 128 / 8 warps), A
# gradient 0.0786 against 0.0861 (64 x 128 / 8 warps); each also faster at 14336 columns.
FORWARD = {"BM": 64, "BK": 128, "num_warps": 4, "num_stages": 4}
INPUT_GRAD = {"BM": 32, "BK": 128, "num_warps": 4, "num_stages": 3}
A_GRAD = {"BM": 64, "BK": 64, "num_warps": 4, "num_stages": 3, "programs": 1024}


# Rounds of Philox-4x32 per draw: Triton's default, the generator's standard form.
# (`tiles` may set "ROUNDS" for `bench/tune_lora_dropout.py --rounds` timings only: a product's
# forward and backward must draw with the same rounds to see the same mask.)
PHILOX_ROUNDS = 10


def _launch(t: dict) -> dict:
    return {"BM": t["BM"], "BK": t["BK"], "num_warps": t["num_warps"], "num_stages": t["num_stages"],
            "ROUNDS": t.get("ROUNDS", PHILOX_ROUNDS)}


def lora_a_forward(x2, a, seed: int, p: float, tiles: dict | None = None):
    """(dropout(x2) @ a^T) for x2 (M, K), a (R, K) in x2's dtype: (M, R)."""
    import torch

    triton, k = _kernels()
    t = tiles or FORWARD
    m, kk = x2.shape
    r = a.shape[0]
    thr, scale = threshold_and_scale(p)
    out = torch.empty((m, r), dtype=x2.dtype, device=x2.device)
    k.forward_kernel[(triton.cdiv(m, t["BM"]),)](x2, a.contiguous(), out, seed, m, kk, r, thr, scale,
                                                 BR=_rank_block(r), **_launch(t))
    return out


def add_input_grad(dx, dxa, a, seed: int, p: float, tiles: dict | None = None) -> None:
    """dx += ((dxa @ a) * keep / (1-p)), in place; dx (M, K), dxa (M, R), a (R, K)."""
    triton, k = _kernels()
    t = tiles or INPUT_GRAD
    m, kk = dx.shape
    r = a.shape[0]
    thr, scale = threshold_and_scale(p)
    k.input_grad_kernel[(triton.cdiv(m, t["BM"]), triton.cdiv(kk, t["BK"]))](
        dx, dxa.contiguous(), a.contiguous(), seed, m, kk, r, thr, scale, BR=_rank_block(r), **_launch(t))


def add_product(out, xa, b, scaling: float, tiles: dict | None = None) -> bool:
    """out += scaling * (xa @ b^T), in place, by `input_grad_kernel` without the mask: the
    adapter's B product added into the base output (LoraLinearFn's forward) in one
    read-modify-write of out. cuBLAS's addmm_ with beta 1 at rank 16 took 0.10 ms at 16k x 4096
    on an H200 (a profile of an 8B step: 124 calls, 12.8 ms), for what is one pass over out.
    out (M, N) contiguous, xa (M, R), b (N, R). False (nothing done) where the kernel does not
    apply (`usable`'s conditions on out); the caller then adds by addmm_."""
    if not (usable(out, xa.shape[1]) and out.is_contiguous()):
        return False
    triton, k = _kernels()
    t = tiles or INPUT_GRAD  # the same kernel, without its mask
    m, n = out.shape
    r = xa.shape[1]
    k.input_grad_kernel[(triton.cdiv(m, t["BM"]), triton.cdiv(n, t["BK"]))](
        out, xa.contiguous(), b.t().contiguous(), 0, m, n, r, 0, float(scaling), BR=_rank_block(r), DROP=False,
        **_launch(t))
    return True


def a_grad(dxa, x2, seed: int, p: float, splits: int = 0, tiles: dict | None = None):
    """dxa^T @ dropout(x2) in fp32: (R, K). The rows are split over `splits`
    programs per column block (partial sums added by torch: deterministic)."""
    import torch

    triton, k = _kernels()
    t = tiles or A_GRAD
    bm = t["BM"]
    m, kk = x2.shape
    r = dxa.shape[1]
    thr, scale = threshold_and_scale(p)
    col_blocks = triton.cdiv(kk, t["BK"])
    if splits <= 0:
        splits = max(1, min(triton.cdiv(m, bm), t["programs"] // col_blocks))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), bm) * bm
    splits = triton.cdiv(m, rows_per_split)
    part = torch.empty((splits, r, kk), dtype=torch.float32, device=x2.device)
    k.a_grad_kernel[(col_blocks, splits)](part, dxa.contiguous(), x2, seed, m, kk, r, thr, scale, rows_per_split,
                                          BR=_rank_block(r), **_launch(t))
    return part[0] if splits == 1 else part.sum(dim=0)


def keep_mask(seed: int, m: int, k: int, p: float, device, rounds: int = PHILOX_ROUNDS):
    """The (m, k) keep-mask the kernels draw for `seed`, as bool: for checks."""
    import torch

    triton, kern = _kernels()
    thr, _ = threshold_and_scale(p)
    out = torch.empty((m, k), dtype=torch.int8, device=device)
    kern.mask_kernel[(triton.cdiv(m, 64), triton.cdiv(k, 128))](out, seed, m, k, thr, BM=64, BK=128, ROUNDS=rounds)
    return out.bool()
