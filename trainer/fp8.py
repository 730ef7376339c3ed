"""FP8 matrix products for the frozen base weights of LoRA / QLoRA.

Why: on an 8B model three quarters of a QLoRA step are the bf16 matrix
products of the frozen base (forward, the recompute under checkpointing, and
the input gradients), already at the GPU's bf16 ceiling (bench/RESULTS.md).
The H100/H200 tensor cores run e4m3 FP8 at twice that rate. Only the frozen
base products go to FP8; the adapter's own products, its gradients, the
attention, the norms and the loss stay in bf16/fp32, so the trainable
weights see the same optimizer.

Scaling (the "rowwise" recipe of float8 training):
- activations and output gradients: one fp32 scale per row (token), amax of
  the row mapped to the e4m3 maximum, so a token's outlier does not crush the
  resolution of the others;
- the weight: one scale for the whole matrix, so that the same e4m3 copy
  serves the forward (W^T) and the input gradient (W, transposed copy). A
  dequantised NF4 weight spans a few hundred x between its smallest and
  largest non-zero value, well inside e4m3's 2^15 normal range, and e4m3's
  rounding (1/16 relative) is finer than NF4's own grid.

The adapter is later merged into, and served on, the bf16 base weights, as
any QLoRA adapter is (it trained against the NF4 ones).

Pure functions of tensors; the CUDA path uses Triton kernels for the
quantisation (one read, one write) and `torch._scaled_mm`; elsewhere
(CPU tests) the same arithmetic in plain PyTorch. Whether a run uses FP8 is
decided with the other speed switches (`performance.resolve`,
training.performance.fp8); `fast_paths.fp8_base_products` routes the layers.
"""

from __future__ import annotations

import functools

E4M3_MAX = 448.0
# cuBLASLt's FP8 products want the inner and output dimensions in multiples of 16.
ALIGN = 16


def supported(device) -> bool:
    """A CUDA device with FP8 tensor cores (compute capability 8.9 or newer) and
    a PyTorch with `_scaled_mm`."""
    import torch

    if getattr(device, "type", device) != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


# No size threshold: in isolation a 4096 x 4096 product at 16k tokens took 0.87 ms in FP8
# against 0.71 ms in bf16 (check_fp8.py), but that clock includes the host's launch cost of
# the quantisers, which a training step hides behind the GPU work already queued. In the
# step, FP8 for every base product (k/v's 4096 x 1024 included) gave 15,757 tokens/s, FP8
# for the MLP only 15,007 (bench/RESULTS.md).
def pays(in_features: int, out_features: int) -> bool:
    """FP8 for a frozen (out x in) weight: dimensions on cuBLASLt's grid of 16."""
    return in_features % ALIGN == 0 and out_features % ALIGN == 0


@functools.lru_cache(maxsize=1)
def _triton_kernels():
    import triton
    import triton.language as tl

    # M, the rows of a packed micro-batch, changes from step to step: not specialised on, so
    # that one compiled variant serves every count (lora_dropout_kernels says why).
    @triton.jit(do_not_specialize=["M"])
    def rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, BLOCK: tl.constexpr):
        # Rows M.. (the padding up to the grid of 16) get zeros and scale 1 here rather
        # than by two more launches per product.
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=m & (row < M), other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
        q = tl.clamp(x * (448.0 / amax), -448.0, 448.0)
        tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv), mask=m)
        tl.store(s_ptr + row, tl.where(row < M, amax / 448.0, 1.0))

    @triton.jit
    def scaled_cast_kernel(x_ptr, q_ptr, amax_ptr, R, C, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr):
        # q[r, c] = x[r, c] / scale as e4m3, q contiguous (R, C); x may be a transposed view.
        pr, pc = tl.program_id(0), tl.program_id(1)
        r = pr * BR + tl.arange(0, BR)[:, None]
        c = pc * BC + tl.arange(0, BC)[None, :]
        m = (r < R) & (c < C)
        amax = tl.maximum(tl.load(amax_ptr).to(tl.float32), 1e-12)
        x = tl.load(x_ptr + r * stride_r + c * stride_c, mask=m, other=0.0).to(tl.float32)
        q = tl.clamp(x * (448.0 / amax), -448.0, 448.0)
        tl.store(q_ptr + r * C + c, q.to(tl.float8e4nv), mask=m)

    @triton.jit
    def nf4_cast_kernel(data_ptr, nf4_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, amax_ptr, q_ptr,
                        N, K, BLOCKSIZE2, NESTED: tl.constexpr, TRANSPOSE: tl.constexpr,
                        ROUND_TO: tl.constexpr, BN: tl.constexpr):
        # One bitsandbytes NF4 weight (N, K) straight to e4m3, or its transpose (K, N). A
        # program takes BN rows x one 64-element quantisation block: 32 bytes a row (the high
        # nibble is the even element), one block scale a row (double quantisation: itself an
        # 8-bit code), w = nf4[code] * scale rounded to the weight's dtype as bitsandbytes'
        # dequantisation does (so the codes equal dequantise-then-cast), then scaled and cast:
        # 1.5 bytes of traffic per element instead of 5.5.
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        k0 = tl.program_id(1) * 64
        j = tl.arange(0, 32)
        rows_in = n < N
        first = n * K + k0  # flat index of each row's first element of the block
        byte = tl.load(data_ptr + first[:, None] // 2 + j[None, :], mask=rows_in[:, None], other=0)
        hi = tl.load(nf4_ptr + (byte >> 4).to(tl.int32))
        lo = tl.load(nf4_ptr + (byte & 15).to(tl.int32))
        block = first // 64
        if NESTED:
            am = tl.load(code2_ptr + tl.load(absmax_ptr + block, mask=rows_in, other=0).to(tl.int32))
            am = am * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=rows_in, other=0.0) + tl.load(offset_ptr)
        else:
            am = tl.load(absmax_ptr + block, mask=rows_in, other=0.0)
        w = (tl.interleave(hi, lo) * am[:, None]).to(ROUND_TO).to(tl.float32)
        amax = tl.maximum(tl.load(amax_ptr).to(tl.float32), 1e-12)
        q = tl.clamp(w * (448.0 / amax), -448.0, 448.0).to(tl.float8e4nv)
        k = k0 + tl.arange(0, 64)
        if TRANSPOSE:
            tl.store(q_ptr + k[:, None] * N + n[None, :], tl.trans(q), mask=rows_in[None, :])
        else:
            tl.store(q_ptr + n[:, None] * K + k[None, :], q, mask=rows_in[:, None])

    return triton, rows_kernel, scaled_cast_kernel, nf4_cast_kernel


@functools.lru_cache(maxsize=1)
def _swiglu_kernels():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M"])  # as rows_kernel
    def swiglu_rows_kernel(a_ptr, b_ptr, q_ptr, s_ptr, M, K, stride_a, stride_b, ROUND_TO: tl.constexpr,
                           BLOCK: tl.constexpr):
        # h = silu(a) * b rounded as the unfused path rounds it (silu to the compute dtype,
        # then the product), and h's row straight to e4m3 as `rows_kernel` does: h is never
        # written. Rows M.. (the padding) get zeros and scale 1.
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < tl.where(row < M, K, 0)  # a padding row reads nothing
        a = tl.load(a_ptr + row * stride_a + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row * stride_b + offs, mask=m, other=0.0).to(tl.float32)
        silu = (a * tl.sigmoid(a)).to(ROUND_TO).to(tl.float32)
        h = (silu * b).to(ROUND_TO).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(h), axis=0), 1e-12)
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

    @triton.jit(do_not_specialize=["M"])  # as rows_kernel
    def swiglu_backward_rows_kernel(a_ptr, b_ptr, dh_ptr, qa_ptr, sa_ptr, qb_ptr, sb_ptr, M, K,
                                    stride_a, stride_b, stride_dh, ROUND_TO: tl.constexpr, BLOCK: tl.constexpr):
        # dL/da and dL/db of one row, rounded to the compute dtype as `swiglu_backward_kernel`
        # stores them, straight to their e4m3 rows (`rows_kernel`'s recipe), each with its own
        # scale: for a frozen gate / up whose only use of them is the FP8 input gradient.
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < tl.where(row < M, K, 0)  # a padding row reads nothing
        a = tl.load(a_ptr + row * stride_a + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row * stride_b + offs, mask=m, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + row * stride_dh + offs, mask=m, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        silu = a * sig
        db = (dh * silu).to(ROUND_TO).to(tl.float32)
        da = (dh * b * (sig + silu * (1.0 - sig))).to(ROUND_TO).to(tl.float32)
        amax_a = tl.maximum(tl.max(tl.abs(da), axis=0), 1e-12)
        amax_b = tl.maximum(tl.max(tl.abs(db), axis=0), 1e-12)
        out = offs < K
        tl.store(qa_ptr + row * K + offs, tl.clamp(da * (448.0 / amax_a), -448.0, 448.0).to(tl.float8e4nv), mask=out)
        tl.store(qb_ptr + row * K + offs, tl.clamp(db * (448.0 / amax_b), -448.0, 448.0).to(tl.float8e4nv), mask=out)
        tl.store(sa_ptr + row, tl.where(row < M, amax_a / 448.0, 1.0))
        tl.store(sb_ptr + row, tl.where(row < M, amax_b / 448.0, 1.0))

    return triton, swiglu_rows_kernel, swiglu_backward_kernel, swiglu_backward_rows_kernel


def swiglu_rows(a2, b2):
    """`quantize_rows` of silu(a2) * b2 (both (M, K), the MLP's gate and up outputs), in one
    kernel on a GPU (`swiglu_rows_kernel`): the product, rounded to a2's dtype as the
    unfused path rounds it, is quantised where it is computed instead of being written and
    read back (two passes over the MLP's widest tensor). Same (q, scale) as
    `quantize_rows(silu(a2) * b2)`."""
    import torch

    if a2.is_cuda:
        return swiglu_rows_kernel(a2, b2)
    return quantize_rows(torch.nn.functional.silu(a2.float()).to(a2.dtype) * b2)


# Warps of the two SwiGLU row kernels at rows of 8,192 and wider (narrower rows take
# `_launch_rows`'s default). Measured on an H200 at 16,384 x 14,336 (`bench/tune_fp8_kernels.py`,
# bench/tune_fp8_kernels_h200.json): the rows kernel 0.318 -> 0.288 ms with 8 warps instead of 16,
# the backward 0.651 -> 0.578 ms with 32 (its five fp32 values a row element need the registers of
# 1,024 threads). About 4 ms a step. The same sweep (at commit 1501636) ran both in two passes over
# pieces of a row too: slower at every piece width, so they keep the whole row in one pass.
SWIGLU_ROWS_WARPS = 8
SWIGLU_BACKWARD_ROWS_WARPS = 32


def _row_warps(triton, k: int, warps: int | None, tuned: int) -> int | None:
    """`warps`, else `tuned` for rows as wide as it was measured at (8,192 and over), else None
    (`_launch_rows`'s default)."""
    return warps or (tuned if triton.next_power_of_2(k) >= 8192 else None)


def swiglu_rows_kernel(a2, b2, warps: int | None = None):
    """`swiglu_rows` by its Triton kernel (on a GPU, or in Triton's interpreter); `warps` (the
    sweep's) replaces SWIGLU_ROWS_WARPS."""
    import torch

    m, k = a2.shape
    triton, kernel, _, _ = _swiglu_kernels()
    a2 = a2 if a2.stride(1) == 1 else a2.contiguous()
    b2 = b2 if b2.stride(1) == 1 else b2.contiguous()
    tl = triton.language
    round_to = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(a2.dtype, tl.float32)
    return _launch_rows(triton, kernel, m, k, [a2, b2], ROUND_TO=round_to,
                        num_warps=_row_warps(triton, k, warps, SWIGLU_ROWS_WARPS))


def _launch_rows(triton, kernel, m: int, k: int, inputs: list, outputs: int = 1, num_warps: int | None = None,
                 **constexprs):
    """(q, scale) of M' x K e4m3 rows (M rounded up to the grid of 16, the padding written by
    the kernel) from a row kernel taking (*inputs, q, s, M, K, *their row strides): one
    program per row, the whole row in one block (`rows_kernel`, `swiglu_rows_kernel`). A
    kernel writing several such outputs takes (q, s) pairs in turn; a list of them returns."""
    import torch

    device = inputs[0].device
    mp = padded_rows(m)
    pairs = [(torch.empty((mp, k), dtype=torch.float8_e4m3fn, device=device),
              torch.empty((mp, 1), dtype=torch.float32, device=device)) for _ in range(outputs)]
    if mp:
        block = triton.next_power_of_2(k)
        kernel[(mp,)](*inputs, *(t for pair in pairs for t in pair), m, k, *(t.stride(0) for t in inputs),
                      BLOCK=block, num_warps=num_warps or (16 if block >= 8192 else 8), **constexprs)
    return pairs[0] if outputs == 1 else pairs


def swiglu_backward_(a, b, dh):
    """dL/da and dL/db of h = silu(a) * b from dL/dh, written over a and b (contiguous,
    same shape as dh); returns them. On a GPU one kernel (`swiglu_backward_kernel_`)."""
    import torch

    if a.is_cuda:
        return swiglu_backward_kernel_(a, b, dh)
    af, dhf = a.float(), dh.float()
    sig = torch.sigmoid(af)
    silu = af * sig
    da = dhf * b.float() * (sig + silu * (1 - sig))
    b.copy_(dhf * silu)
    a.copy_(da)
    return a, b


def swiglu_backward_kernel_(a, b, dh):
    """`swiglu_backward_` by its Triton kernel (on a GPU, or in Triton's interpreter)."""
    _, _, kernel, _ = _swiglu_kernels()
    dh = dh.contiguous()
    n = a.numel()
    kernel[(-(-n // 4096),)](a, b, dh, n, BLOCK=4096, num_warps=8)
    return a, b


def swiglu_backward_rows(a2, b2, dh2):
    """[`quantize_rows` of dL/da, of dL/db] for h = silu(a2) * b2 (all (M, K)), the gradients
    rounded to a2's dtype first, as `swiglu_backward_` would store them: for a frozen gate
    and up whose only use of their output gradients is the FP8 input gradient. On a GPU one
    kernel (`swiglu_backward_rows_kernel`), which never writes them in the compute dtype;
    a2 and b2 are left as they are."""
    if a2.is_cuda:
        return swiglu_backward_rows_kernel(a2, b2, dh2)
    da, db = swiglu_backward_(a2.clone(), b2.clone(), dh2)
    return [quantize_rows(da), quantize_rows(db)]


def swiglu_backward_rows_kernel(a2, b2, dh2, warps: int | None = None):
    """`swiglu_backward_rows` by its Triton kernel (on a GPU, or in Triton's interpreter);
    `warps` (the sweep's) replaces SWIGLU_BACKWARD_ROWS_WARPS."""
    import torch

    m, k = a2.shape
    triton, _, _, kernel = _swiglu_kernels()
    a2, b2, dh2 = (t if t.stride(1) == 1 else t.contiguous() for t in (a2, b2, dh2))
    tl = triton.language
    round_to = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(a2.dtype, tl.float32)
    return _launch_rows(triton, kernel, m, k, [a2, b2, dh2], outputs=2, ROUND_TO=round_to,
                        num_warps=_row_warps(triton, k, warps, SWIGLU_BACKWARD_ROWS_WARPS))


def padded_rows(m: int) -> int:
    # The token count of a packed micro-batch is arbitrary (16,382 here); zero rows up to the
    # grid keep every operand 16-aligned for cuBLASLt, at the cost of a tiny fill.
    return -(-m // ALIGN) * ALIGN


def quantize_rows(x2):
    """(q, scale) with x2 ~= q.float() * scale: q e4m3 of shape (M', K) with M'
    the rows rounded up to a multiple of 16 (zero rows, scale 1), scale fp32 (M', 1)."""
    import torch

    m, k = x2.shape
    mp = padded_rows(m)
    if x2.is_cuda:
        triton, rows_kernel, _, _ = _triton_kernels()
        x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
        return _launch_rows(triton, rows_kernel, m, k, [x2])
    xf = x2.float()
    amax = xf.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    q = (xf * (E4M3_MAX / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    s = amax / E4M3_MAX
    if mp > m:
        q = torch.cat([q, torch.zeros((mp - m, k), dtype=q.dtype)])
        s = torch.cat([s, torch.ones((mp - m, 1))])
    return q, s


def weight_amax(w):
    """max |w| as a 1-element fp32 tensor on w's device (exact in any dtype: a max;
    no host sync)."""
    import torch

    return torch.linalg.vector_norm(w, ord=float("inf")).float().reshape(1)


class WeightScale:
    """The FP8 scale of one weight (N, K) and its per-column forms for `_scaled_mm`
    (which wants row-wise scales on both sides: the one scale repeated), made
    once for a frozen weight instead of four small launches per product."""

    def __init__(self, amax, n: int, k: int):
        self.amax = amax
        self.scale = amax.clamp_min(1e-12) / E4M3_MAX
        self.out_row = self.scale.expand(1, n).contiguous()  # forward: x @ w^T, N columns
        self.in_row = self.scale.expand(1, k).contiguous()  # input gradient: dy @ w, K columns

    @classmethod
    def of(cls, w) -> "WeightScale":
        return cls(weight_amax(w), w.shape[0], w.shape[1])


def cast_weight(w, amax, transpose: bool = False):
    """w (or w^T with transpose=True) as a contiguous e4m3 matrix scaled by
    `amax` (448 / amax), the amax on the device (no host sync)."""
    import torch

    src = w.t() if transpose else w
    if w.is_cuda:
        _, _, cast_kernel, _ = _triton_kernels()
        r, c = src.shape
        q = torch.empty((r, c), dtype=torch.float8_e4m3fn, device=w.device)
        br, bc = 32, 128
        cast_kernel[(-(-r // br), -(-c // bc))](src, q, amax, r, c, src.stride(0), src.stride(1), BR=br, BC=bc,
                                                num_warps=4)
        return q
    amax = amax.clamp_min(1e-12)
    return (src.float() * (E4M3_MAX / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).contiguous()


def quantize_tensor(w, transpose: bool = False, amax=None):
    """(q, scale): w (or w^T with transpose=True) as a contiguous e4m3 matrix
    and one fp32 scale, w ~= q.float() * scale. The amax stays on the device
    (no host sync); a caller holding it passes it (`cast_weight` when the scale
    is kept elsewhere, as `WeightScale` does)."""
    amax = weight_amax(w) if amax is None else amax
    return cast_weight(w, amax, transpose), amax.clamp_min(1e-12) / E4M3_MAX


def nf4_fits(weight) -> bool:
    """A bitsandbytes NF4 weight on a GPU that `quantize_nf4` reads directly:
    quantisation blocks of 64 that tile its rows."""
    qs = getattr(weight, "quant_state", None)
    return (qs is not None and weight.is_cuda and getattr(qs, "quant_type", None) == "nf4" and qs.blocksize == 64
            and qs.shape is not None and len(qs.shape) == 2 and qs.shape[1] % 64 == 0
            and qs.shape[0] * qs.shape[1] < 2**31)


def _nf4_args(weight) -> tuple:
    """The kernel's arguments read off the weight's quant state once (its offset stays a
    device tensor: reading it as a number would wait for the GPU on every product)."""
    cached = getattr(weight, "_kubetune_nf4_args", None)
    if cached is not None and cached[0] is weight.quant_state:
        return cached[1]
    import torch
    import triton.language as tl

    qs = weight.quant_state
    nested = bool(getattr(qs, "nested", False))
    if nested:
        second = (qs.state2.code, qs.state2.absmax, torch.as_tensor(qs.offset, dtype=torch.float32,
                                                                    device=weight.device).reshape(1),
                  qs.state2.blocksize)
    else:
        second = (qs.code, qs.absmax, qs.absmax, 1)  # unused by the kernel
    round_to = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(qs.dtype, tl.float32)
    args = (weight.data, qs.code, qs.absmax, *second, qs.shape[0], qs.shape[1], nested, round_to)
    weight._kubetune_nf4_args = (qs, args)
    return args


# The NF4 cast's tiles (`nf4_cast_kernel`: rows a program, warps), forward layout and
# transposed (the input gradient's). `bench/tune_fp8_kernels.py` swept 18 of each on an H200
# (bench/tune_fp8_kernels_h200.json, at commit 1501636, whose kernel also took several
# quantisation blocks a program): none beat these over a layer's casts, and that wider kernel
# (one block scale loaded per byte instead of per row) made an 8B step's casts 10% slower at
# these tiles (18.5 -> 20.3 ms, issue16-round10-3's profiles), so it was taken back.
NF4_TILES = {"BN": 64, "num_warps": 4}
NF4_TILES_T = {"BN": 64, "num_warps": 4}


def quantize_nf4(weight, amax, transpose: bool = False, tiles: dict | None = None):
    """A bitsandbytes NF4 weight (N, K) (`nf4_fits`), or its transpose, as a
    contiguous e4m3 matrix with the scale of `amax`: the same codes as
    `quantize_tensor` of its dequantised weight, in one pass over the 4-bit data.
    `tiles` (the sweep's) replaces NF4_TILES / NF4_TILES_T."""
    import torch

    triton, _, _, kernel = _triton_kernels()
    data, code, absmax, code2, absmax2, offset, bs2, n, k, nested, round_to = _nf4_args(weight)
    q = torch.empty((k, n) if transpose else (n, k), dtype=torch.float8_e4m3fn, device=data.device)
    t = tiles or (NF4_TILES_T if transpose else NF4_TILES)
    kernel[(triton.cdiv(n, t["BN"]), k // 64)](data, code, absmax, code2, absmax2, offset, amax, q, n, k, bs2,
                                               NESTED=nested, TRANSPOSE=transpose, ROUND_TO=round_to, BN=t["BN"],
                                               num_warps=t["num_warps"])
    return q


# Hopper's FP8 tensor cores accumulate a product in fewer than fp32's bits; by default cuBLASLt
# promotes the partial sums to fp32 registers every few K-blocks, which costs throughput.
# "Fast accumulation" skips the promotion. torchao's float8 training recipe takes it for the
# forward product only; here the input gradients take it too, as measured on an 8B QLoRA run
# (bench/RESULTS.md, issue 16, sixth round: +1.5% tokens/s in the same invocation, the loss
# within 0.58% of bf16 products over 100 steps, against 0.48% with the promotion kept there in
# the fifth round). The run says which
# (`performance.Resolved.fp8_fast_accum` for the forward products and their recompute,
# `fp8_fast_accum_grad` for the input gradients; `fast_paths.apply_fast_paths` sets both). On
# an H200 the 8B forward products ran 6-13% faster (check_fp8.py); the error against the same
# e4m3 operands' fp32 product rose from 0.17% to 0.21-0.33%, against 3.75% for the e4m3
# rounding itself.
_fast_accum = {"forward": False, "grad": False}


def set_fast_accum(forward: bool, grad: bool = False) -> None:
    """Whether `linear` (the forward products) and `linear_input_grad` (the input gradients)
    use cuBLASLt's fast FP8 accumulation."""
    _fast_accum.update(forward=bool(forward), grad=bool(grad))


def _mm(aq, a_scale, b_colmajor, b_scale_row, out_dtype, fast_accum: bool = False):
    """aq (M, K) row-major times b (K, N) column-major, both e4m3, scaled per
    row of a and per column of b."""
    import torch

    return torch._scaled_mm(aq, b_colmajor, scale_a=a_scale, scale_b=b_scale_row, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def linear(x2, w, out_dtype, w_scale: "WeightScale | None" = None, x_rows=None, wq=None):
    """x2 @ w^T for x2 (M, K), w (N, K) (the frozen weight in its compute
    dtype), both rounded to e4m3 with the scaling above; output (M, N) in out_dtype.
    `w_scale`: the weight's `WeightScale` when the caller keeps it; `x_rows`:
    x2's `quantize_rows` and `wq` w's e4m3 copy when the caller has them already
    (`SharedRows`, `quantize_nf4`); w is then not read and may be None."""
    m = x2.shape[0]
    ws = WeightScale.of(w) if w_scale is None else w_scale
    xq, xs = quantize_rows(x2) if x_rows is None else x_rows
    if wq is None:
        wq = cast_weight(w, ws.amax)
    y = _mm(xq, xs, wq.t(), ws.out_row, out_dtype, fast_accum=_fast_accum["forward"])
    return y[:m]


def linear_input_grad(dy2, w, out_dtype, w_scale: "WeightScale | None" = None, wtq=None, dy_rows=None):
    """dy2 @ w for dy2 (M, N), w (N, K): the input gradient of `linear`, with
    the output gradient rounded to e4m3 per row (same recipe); `wtq`: w^T's
    e4m3 copy (K, N) when the caller has it; `dy_rows`: dy2's `quantize_rows` when the
    caller made them (dy2 is then read for its row count only)."""
    m = dy2.shape[0]
    ws = WeightScale.of(w) if w_scale is None else w_scale
    gq, gs = quantize_rows(dy2) if dy_rows is None else dy_rows
    if wtq is None:
        wtq = cast_weight(w, ws.amax, transpose=True)  # (K, N) contiguous: w column-major
    dx = _mm(gq, gs, wtq.t(), ws.in_row, out_dtype, fast_accum=_fast_accum["grad"])
    return dx[:m]


# Sibling projections read the same input: q/k/v the attention's normed hidden state,
# gate/up the MLP's. Their forwards (and the recompute under checkpointing) quantise
# it once instead of three / two times (`fast_paths.mark_fp8_siblings` says which
# call opens, uses and closes the entry).
OPEN, USE, CLOSE = "open", "use", "close"


class SharedRows:
    """One entry: the input tensor and its `quantize_rows`. The entry holds the
    input alive, so its storage cannot be reused while the key names it; a key
    that does not match (another input, an in-place edit) quantises afresh, so
    a wrong order of calls costs speed, never correctness. The last sibling
    drops the entry, so it lives only between the first and the last call."""

    def __init__(self) -> None:
        self._ref = None
        self._key = None
        self._rows = None

    @staticmethod
    def _key_of(x):
        return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x._version)

    def rows(self, x, x2, role):
        key = self._key_of(x)
        rows = self._rows if self._ref is not None and self._key == key else quantize_rows(x2)
        if role == OPEN:
            self._ref, self._key, self._rows = x, key, rows
        elif role == CLOSE:
            self.clear()
        return rows

    def offer(self, x, rows) -> None:
        """Leave x's rows, made where x was (`rms_norm`'s kernel), for the projection that
        opens (or, alone, closes) the entry next."""
        self._ref, self._key, self._rows = x, self._key_of(x), rows

    def clear(self) -> None:
        self._ref = self._key = self._rows = None


shared_rows = SharedRows()
