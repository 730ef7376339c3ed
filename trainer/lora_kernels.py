"""Each LoRA linear as one autograd node, and a frozen linear with its product in FP8.

Why: PEFT computes a LoRA layer as base(x).clone() + lora_B(lora_A(dropout(x))) * s.
On an 8B model with 16k-token micro-batches, the clone, the scaling and the
add are three full passes over every projection's output in the forward
(twice with gradient checkpointing) and more in the backward, about a quarter
of the step time in a profile. Here the LoRA product is accumulated into the
base output by the matrix multiply itself (addmm with beta=1) and the backward
adds its input gradient the same way; dropout happens inside the adapter's
own products (`lora_dropout`), or, where those kernels do not apply, is one
fused kernel with a one-byte mask.

The frozen base weight is used in the compute dtype (a bitsandbytes 4-bit
weight is dequantised in the forward and again in the backward, as
bitsandbytes does), and the adapter's fp32 master weights get fp32 gradients,
as under autocast. With `use_fp8` the base product (forward and input
gradient) runs in FP8 (`fp8.py`).

These are the nodes only; `fast_paths.py` decides which layers use them.
torch (and bitsandbytes, for 4-bit weights) are imported when first called.
"""

from __future__ import annotations

import functools

from kubetune.trainer import fp8, lora_dropout


def dense_weight(base, dtype):
    """The frozen weight of a plain or bitsandbytes-4-bit linear in `dtype`."""
    w = base.weight
    quant_state = getattr(w, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, quant_state).to(dtype)
    return w.to(dtype)


def frozen_scale(base, cdt):
    """The FP8 scale of a frozen base weight (`fp8.WeightScale`), made once: every
    forward, recompute and backward after the first skips a reduction over the
    whole dequantised weight (18 ms of a 1.05 s 8B step) and the scale's small
    launches. Keyed on the stored weight's address and version counter, so an
    in-place change of the weight is seen."""
    stored = base.weight
    key = (stored.data_ptr(), stored._version)
    cached = getattr(base, "_kubetune_fp8_scale", None)
    if cached is None or cached[0] != key:
        cached = (key, fp8.WeightScale.of(dense_weight(base, cdt)))
        base._kubetune_fp8_scale = cached
    return cached[1]


def fp8_weight(base, cdt, transpose: bool = False):
    """(the frozen weight, or its transpose, as contiguous e4m3; its WeightScale).
    A bitsandbytes NF4 weight goes to e4m3 in one kernel (`fp8.quantize_nf4`),
    without the bf16 copy in between."""
    scale = frozen_scale(base, cdt)
    if fp8.nf4_fits(base.weight):
        return fp8.quantize_nf4(base.weight, scale.amax, transpose), scale
    return fp8.cast_weight(dense_weight(base, cdt), scale.amax, transpose), scale


def _fp8_rows(x, x2, share):
    return fp8.shared_rows.rows(x, x2, share) if share else None


def dropout_with_mask(x, p: float):
    """(dropout(x), keep-mask as bool) from one fused kernel: one pass over x
    instead of the five of rand/compare/cast/scale/multiply, and a one-byte
    mask for the backward (a separate function so that tests can regenerate
    the same mask from the same RNG state)."""
    import torch

    return torch.ops.aten.native_dropout(x, p, True)


@functools.lru_cache(maxsize=None)
def _lora_linear_fn():
    import torch

    class LoraLinearFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, lora_a, lora_b, base, scaling: float, p: float, use_fp8: bool, share, kept):
            cdt = compute_dtype_of(x)
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(cdt)
            # A recompute whose layer kept this output (`packed_attention.KeptAttention.keep_output`):
            # the first forward's, adapter included; only what the backward saves is made again.
            given = kept.take_output() if kept is not None else None
            if given is not None:
                y = given.view(x2.shape[0], -1)
            elif use_fp8:
                wq, scale = fp8_weight(base, cdt)
                y = fp8.linear(x2, None, cdt, w_scale=scale, x_rows=_fp8_rows(x, x2, share), wq=wq)
            else:
                y = x2 @ dense_weight(base, cdt).t()
            if given is None and getattr(base, "bias", None) is not None:
                y += base.bias.to(cdt)
            a, b = lora_a.to(cdt), lora_b.to(cdt)
            ctx.seed = None
            if p > 0 and lora_dropout.usable(x2, a.shape[0]):
                # The mask lives in the kernels (`lora_dropout`); x itself is saved (the siblings'
                # input, alive anyway), not a dropped copy.
                ctx.seed = lora_dropout.new_seed()
                xd, mask = x2, None
                xa = lora_dropout.kept_products.product(ctx, lora_a, x2, a, ctx.seed, p)
            else:
                xd, mask = dropout_with_mask(x2, p) if p > 0 else (x2, None)
                xa = xd @ a.t()
            if given is None:
                if not lora_dropout.add_product(y, xa, b, scaling):  # one pass over y (`add_product`)
                    y.addmm_(xa, b.t(), alpha=scaling)
                if kept is not None:
                    kept.keep_output(y)
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
                if ctx.seed is not None:  # xd is x: the kernel drops it again with the same seed
                    d_a = lora_dropout.a_grad(dxa, xd, ctx.seed, ctx.p).to(lora_a.dtype)
                else:
                    d_a = (dxa.t() @ xd).to(lora_a.dtype)
            if ctx.needs_input_grad[0]:
                if ctx.fp8:
                    wtq, scale = fp8_weight(ctx.base, cdt, transpose=True)
                    dx = fp8.linear_input_grad(dy2, None, cdt, w_scale=scale, wtq=wtq)
                else:
                    dx = dy2 @ dense_weight(ctx.base, cdt)
                if ctx.seed is not None:
                    lora_dropout.add_input_grad(dx, dxa, a, ctx.seed, ctx.p)
                elif mask is None:
                    dx.addmm_(dxa, a)
                else:
                    dx.add_(torch.ops.aten.native_dropout_backward(dxa @ a, mask, 1.0 / (1.0 - ctx.p)))
                dx = dx.view(ctx.shape)
            return dx, d_a, d_b, None, None, None, None, None, None

    return LoraLinearFn


def lora_linear(x, lora_a, lora_b, base, scaling: float, p: float = 0.0, use_fp8: bool = False, share=None,
                kept=None):
    """base(x) + scaling * dropout_p(x) @ A^T @ B^T as one autograd node; with
    use_fp8 the base product (forward and input gradient) runs in FP8 (`fp8`),
    and `share` (fp8.OPEN/USE/CLOSE) reuses a sibling projection's quantised input.
    `kept` (a layer's `packed_attention.KeptAttention`, for its output projection): the
    output goes to it in a first forward and comes back from it in the recompute."""
    return _lora_linear_fn().apply(x, lora_a, lora_b, base, float(scaling), float(p), bool(use_fp8), share,
                                   kept if share is None else None)


def compute_dtype_of(x):
    """The dtype the products run in: autocast's when it is on, else x's."""
    import torch

    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


@functools.lru_cache(maxsize=None)
def _frozen_linear_fn():
    import torch

    class FrozenLinearFn(torch.autograd.Function):
        """y = x @ W^T (+ b) of a frozen plain or 4-bit linear with the product in
        FP8; saves nothing (the weight is re-read in the backward, as bitsandbytes does)."""

        @staticmethod
        def forward(ctx, x, base, share, kept):
            cdt = compute_dtype_of(x)
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(cdt)
            given = kept.take_output() if kept is not None else None  # as in LoraLinearFn
            if given is not None:
                y = given.view(x2.shape[0], -1)
            else:
                y = _frozen_product(base, cdt, x2, _fp8_rows(x, x2, share))
                if kept is not None:
                    kept.keep_output(y)
            ctx.base, ctx.cdt, ctx.shape = base, cdt, shape
            return y.view(*shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, dy):
            return _frozen_input_grad(ctx.base, ctx.cdt, dy).view(ctx.shape), None, None, None

    return FrozenLinearFn


def _frozen_product(base, cdt, x2, rows):
    """x2 @ W^T (+ b) of a frozen linear in FP8, x2's e4m3 rows given (FrozenLinearFn, SwiGLUDownFn)."""
    wq, scale = fp8_weight(base, cdt)
    y = fp8.linear(x2, None, cdt, w_scale=scale, x_rows=rows, wq=wq)
    if getattr(base, "bias", None) is not None:
        y += base.bias.to(cdt)
    return y


def _frozen_input_grad(base, cdt, dy, dy_rows=None):
    """dy @ W of a frozen linear in FP8, as (tokens, in_features); `dy_rows` as in
    `fp8.linear_input_grad`."""
    wtq, scale = fp8_weight(base, cdt, transpose=True)
    return fp8.linear_input_grad(dy.reshape(-1, dy.shape[-1]).to(cdt), None, cdt, w_scale=scale, wtq=wtq,
                                 dy_rows=dy_rows)


def frozen_linear_fp8(x, base, share=None, kept=None):
    """A frozen linear layer's forward with its product in FP8 (`fp8`); `share` and `kept`
    as in `lora_linear`."""
    return _frozen_linear_fn().apply(x, base, share, kept if share is None else None)


# The SwiGLU product h = silu(gate) * up never exists in the compute dtype on the fused paths:
# one node makes its e4m3 rows and saves what its backward needs (gate's and up's outputs),
# a second node multiplies the rows with the frozen down_proj and saves nothing. Two nodes,
# not one, because under checkpointing torch's recompute stops once every saved tensor is
# back (non-reentrant early stop): the down product, whose node saves nothing, is then never
# recomputed, as the unfused path's FrozenLinearFn is not (one 16k x 14,336 x 4,096 product
# a layer: measured 45 ms of an 8B step when it was one node). Between the two, h travels as a
# placeholder of its shape (a zero expanded, no memory) that carries dL/dh back, beside the
# rows (q, scale), which carry no gradient. The rows node does not materialise gradients:
# autograd would otherwise hand its backward a zero tensor of q's shape (16k x 14,336 bytes
# in an 8B layer) and of scale's, written for nothing in every layer's backward.


def _h_placeholder(a2):
    return a2.new_zeros(()).expand(a2.shape)


@functools.lru_cache(maxsize=None)
def _swiglu_rows_fn():
    import torch

    class SwiGLURowsFn(torch.autograd.Function):
        """(h, q, scale) of h = silu(gate) * up: h a placeholder, (q, scale) its e4m3 rows
        (`fp8.swiglu_rows`). For an adapted gate / up: the backward writes their output
        gradients over the saved outputs (as Liger's SwiGLU does)."""

        @staticmethod
        def forward(ctx, gate, up):
            cdt = compute_dtype_of(gate)
            a2 = gate.reshape(-1, gate.shape[-1]).to(cdt)
            b2 = up.reshape(-1, up.shape[-1]).to(cdt)
            q, scale = fp8.swiglu_rows(a2, b2)
            ctx.save_for_backward(a2, b2)
            ctx.shape, ctx.dtypes = gate.shape, (gate.dtype, up.dtype)
            ctx.mark_non_differentiable(q, scale)
            ctx.set_materialize_grads(False)
            return _h_placeholder(a2), q, scale

        @staticmethod
        def backward(ctx, dh, _dq, _ds):
            if dh is None:  # h reached no loss (gradients are not materialised)
                return None, None
            a2, b2 = ctx.saved_tensors
            da, db = fp8.swiglu_backward_(a2.contiguous(), b2.contiguous(), dh)
            return da.view(ctx.shape).to(ctx.dtypes[0]), db.view(ctx.shape).to(ctx.dtypes[1])

    return SwiGLURowsFn


@functools.lru_cache(maxsize=None)
def _frozen_gate_up_rows_fn():
    import torch

    class FrozenGateUpRowsFn(torch.autograd.Function):
        """(h, q, scale) as `SwiGLURowsFn` from the MLP's input x, for a frozen gate and up:
        x quantised once for both FP8 products; the backward takes their output gradients
        straight to e4m3 rows (`fp8.swiglu_backward_rows`), never written in the compute
        dtype (nothing but the input gradient reads them)."""

        @staticmethod
        def forward(ctx, x, x_up, gate, up):
            ctx.apart = x_up is not x  # an alias of x for up's product: its gradient goes back apart
            cdt = compute_dtype_of(x)
            x2 = x.reshape(-1, x.shape[-1]).to(cdt)
            rows = fp8.shared_rows.rows(x, x2, fp8.CLOSE)  # the norm's, when it made them (`rms_norm`)
            a2 = _frozen_product(gate, cdt, x2, rows)
            b2 = _frozen_product(up, cdt, x2, rows)
            q, scale = fp8.swiglu_rows(a2, b2)
            ctx.save_for_backward(a2, b2)
            ctx.bases, ctx.cdt, ctx.shape = (gate, up), cdt, x.shape
            ctx.mark_non_differentiable(q, scale)
            ctx.set_materialize_grads(False)
            return _h_placeholder(a2), q, scale

        @staticmethod
        def backward(ctx, dh, _dq, _ds):
            if dh is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
                return None, None, None, None
            a2, b2 = ctx.saved_tensors
            gate, up = ctx.bases
            a_rows, b_rows = fp8.swiglu_backward_rows(a2, b2, dh)
            dx = _frozen_input_grad(gate, ctx.cdt, a2, dy_rows=a_rows)
            dx_up = _frozen_input_grad(up, ctx.cdt, b2, dy_rows=b_rows)
            if ctx.apart:  # summed by the norm's backward (`rms_norm.Readers`)
                return dx.view(ctx.shape), dx_up.view(ctx.shape), None, None
            dx += dx_up
            return dx.view(ctx.shape), None, None, None

    return FrozenGateUpRowsFn


@functools.lru_cache(maxsize=None)
def _frozen_rows_product_fn():
    import torch

    class FrozenRowsProductFn(torch.autograd.Function):
        """h @ W^T of a frozen linear (down_proj) from h's e4m3 rows; h itself is the
        placeholder, which brings dL/dh back. Saves nothing."""

        @staticmethod
        def forward(ctx, h, q, scale, base):
            cdt = compute_dtype_of(h)
            y = _frozen_product(base, cdt, h, (q, scale))
            ctx.base, ctx.cdt, ctx.shape = base, cdt, h.shape
            return y

        @staticmethod
        def backward(ctx, dy):
            return _frozen_input_grad(ctx.base, ctx.cdt, dy).view(ctx.shape), None, None, None

    return FrozenRowsProductFn


def swiglu_down_fp8(gate, up, base):
    """`base`(silu(gate) * up) for a frozen `base` (an MLP's down_proj) in FP8, the SwiGLU
    product quantised where it is made (`SwiGLURowsFn`, `FrozenRowsProductFn`)."""
    h, q, scale = _swiglu_rows_fn().apply(gate, up)
    y = _frozen_rows_product_fn().apply(h, q, scale, base)
    return y.view(*gate.shape[:-1], y.shape[-1])


def frozen_swiglu_mlp_fp8(x, gate, up, down, x_up=None):
    """down(silu(gate(x)) * up(x)) for three frozen linears, every product in FP8
    (`FrozenGateUpRowsFn`, `FrozenRowsProductFn`). `x_up`: an alias of x standing for up's
    input (`rms_norm.Readers`), whose gradient is then returned apart from gate's."""
    h, q, scale = _frozen_gate_up_rows_fn().apply(x, x if x_up is None else x_up, gate, up)
    y = _frozen_rows_product_fn().apply(h, q, scale, down)
    return y.view(*x.shape[:-1], y.shape[-1])


def plain_or_4bit_linear(module) -> bool:
    """An nn.Linear or a bitsandbytes 4-bit linear: the weights `dense_weight` can read."""
    import torch.nn as nn

    is_4bit = type(module).__name__ == "Linear4bit" and hasattr(getattr(module, "weight", None), "quant_state")
    return is_4bit or type(module) is nn.Linear
