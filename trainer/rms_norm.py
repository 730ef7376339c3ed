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


def normalize(x2, w, eps: float, rows: bool = False, add=None):
    """(y, rstd, y's rows) of Llama's RMSNorm of x2 (M, K) with weight w (K,): y in x2's
    dtype, rstd fp32 (M,); with `rows` also y's `fp8.quantize_rows` (q, scale) from the same
    kernel (y is not read back for them), else None. With `add`, a tensor (M, K) of x2's
    dtype: the norm is of x2 + add (rounded as autograd's add rounds it), a sum the kernel
    also writes to a new tensor, returned fourth: (y, rstd, rows, the sum)."""
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
    total = x2 if add is None else torch.empty_like(x2)
    r = x2 if add is None else add
    if grid:
        k.forward_kernel[(grid,)](x2, y, w, rstd, q if rows else y, s if rows else rstd, m, kk, x2.stride(0),
                                  y.stride(0), float(eps), r, total, r.stride(0), total.stride(0), BLOCK=block,
                                  ROWS=rows, ADD_IN=add is not None, num_warps=_warps(block))
    out = (y, rstd, ((q, s) if rows else None))
    return out if add is None else (*out, total)


def normalize_backward(dy2, x2, w, rstd, out=None, residual=None, more=()):
    """dx (M, K) of the frozen-weight norm from dy2 and its saved x2 (M, K) and rstd (M,);
    written into `out` (dy2 itself for in place), else a new tensor. With `residual` (M, K),
    the gradient x2 also gets from elsewhere, added in the same pass. `more`: up to two
    further output gradients (M, K), of the output's other readers, added to dy2 in the pass."""
    import torch

    triton, k = _kernels()
    m, kk = x2.shape
    dx = torch.empty_like(dy2) if out is None else out
    block = triton.next_power_of_2(kk)
    if len(more) > 2:
        raise ValueError(f"at most 3 output gradients, got {1 + len(more)}")
    if m:
        res = dy2 if residual is None else residual
        dy2b, dy3 = (*more, dy2, dy2)[:2]
        k.backward_kernel[(m,)](dy2, dx, x2, w, rstd, res, kk, dy2.stride(0), dx.stride(0), x2.stride(0), res.stride(0),
                                dy2b, dy3, dy2b.stride(0), dy3.stride(0), BLOCK=block, ADD_RES=residual is not None,
                                N_DY=1 + len(more), num_warps=_warps(block))
    return dx


def _input_grad(ctx, dy, d_pass=None, more=()):
    """x's gradient from the norm output's `dy` (written over it) and its other readers'
    gradients `more` (aliases of the output, `frozen_skip_rms_norm`'s readers), plus `d_pass`,
    the gradient x gets along the residual stream, where there is one."""
    x2, w, rstd = ctx.saved_tensors
    dy2 = dy.contiguous().view(-1, x2.shape[1])
    res = None if d_pass is None else d_pass.contiguous().view(-1, x2.shape[1])
    more = tuple(d.contiguous().view(-1, x2.shape[1]) for d in more)
    return normalize_backward(dy2, x2, w, rstd, out=dy2, residual=res, more=more).view(ctx.shape)


def _skip_input_grad(ctx, d_pass, dys):
    """The input gradient of the skip nodes: the stream's `d_pass` plus the norm's from its
    readers' gradients `dys` (None where a reader sent none; gradients are not materialised)."""
    dys = [d for d in dys if d is not None]
    if not dys:
        return d_pass
    return _input_grad(ctx, dys[0], d_pass, tuple(dys[1:]))


def _aliases(y, readers: int) -> tuple:
    # One more output per further reader, each y's storage: autograd hands the node each
    # reader's gradient apart, and the norm's kernel sums them (`normalize_backward`'s more).
    # Detached, not views: autograd would send a view's gradient through y's (and add them).
    return tuple(y.detach() for _ in range(readers - 1))


def _norm_forward(ctx, x, w, eps: float, offer_rows: bool, add=None):
    """The norm nodes' shared forward: (norm of x, x) or, with `add`, (norm of x + add, the
    sum), in x's shape. Saves what `_input_grad` reads (the normalised input, w, rstd) and
    offers the output's e4m3 rows where asked (`fp8.shared_rows`)."""
    from kubetune.trainer import fp8

    x2 = x.contiguous().view(-1, x.shape[-1])
    made = normalize(x2, w, eps, rows=offer_rows, add=None if add is None else add.contiguous().view(x2.shape))
    y, rstd, rows = made[:3]
    normalised = x2 if add is None else made[3]
    ctx.save_for_backward(normalised, w, rstd)
    ctx.shape = x.shape
    out = y.view(x.shape)
    if rows is not None:
        fp8.shared_rows.offer(out, rows)
    return out, normalised.view(x.shape)


@functools.lru_cache(maxsize=None)
def _function():
    import torch

    class FrozenRMSNormFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, eps: float, offer_rows: bool):
            return _norm_forward(ctx, x, w, eps, offer_rows)[0]

        @staticmethod
        def backward(ctx, dy):
            return _input_grad(ctx, dy), None, None, None

    class FrozenSkipRMSNormFn(torch.autograd.Function):
        """(x, norm(x)) as one node: x goes on along the residual stream, and the backward
        adds the stream's gradient into the norm's own (`normalize_backward`'s residual)
        instead of autograd adding the two in a pass of its own."""

        @staticmethod
        def forward(ctx, x, w, eps: float, offer_rows: bool, readers: int):
            y = FrozenRMSNormFn.forward(ctx, x, w, eps, offer_rows)
            ctx.set_materialize_grads(False)
            return x.view_as(x), y, *_aliases(y, readers)

        @staticmethod
        def backward(ctx, d_pass, *dys):
            return _skip_input_grad(ctx, d_pass, dys), None, None, None, None

    class FrozenAddSkipRMSNormFn(torch.autograd.Function):
        """(a + b, norm(a + b)) as one node: the residual stream's add and the norm that reads
        its result in one kernel, which reads a and b and writes the sum and the norm, instead
        of the add writing the sum and the norm reading it back. The backward is
        FrozenSkipRMSNormFn's; both summands get the sum's gradient."""

        @staticmethod
        def forward(ctx, a, b, w, eps: float, offer_rows: bool, readers: int):
            out, total = _norm_forward(ctx, a, w, eps, offer_rows, add=b)
            ctx.set_materialize_grads(False)
            return total, out, *_aliases(out, readers)

        @staticmethod
        def backward(ctx, d_pass, *dys):
            d = _skip_input_grad(ctx, d_pass, dys)
            return d, d, None, None, None, None

    return FrozenRMSNormFn, FrozenSkipRMSNormFn, FrozenAddSkipRMSNormFn


def frozen_rms_norm(x, w, eps: float, offer_rows: bool = False):
    """Llama's RMSNorm of x with the frozen weight w (`normalize`, `normalize_backward`).
    `offer_rows`: the output's e4m3 rows, made by the norm's own kernel, are left in
    `fp8.shared_rows` for the FP8 projections that read the output next (the attention's
    q/k/v, the MLP's gate/up): one pass over a 16k x 4096 activation less per norm."""
    return _function()[0].apply(x, w, float(eps), bool(offer_rows))


def frozen_skip_rms_norm(x, w, eps: float, offer_rows: bool = False, readers: int = 1):
    """(x, `frozen_rms_norm` of x) for a tensor of the residual stream that a norm reads:
    one autograd node for both readers, whose backward adds their gradients in the norm's
    own pass (`normalize_backward`'s residual). The sum is rounded as autograd's would be.
    `readers` (1-3): the norm's output comes as that many tensors (the output and aliases
    of it), one per module reading it (`Readers`); their gradients are summed in the same pass."""
    return _function()[1].apply(x, w, float(eps), bool(offer_rows), _readers(readers))


def _readers(n) -> int:
    if not 1 <= int(n) <= 3:
        raise ValueError(f"readers must be 1, 2 or 3, got {n}")
    return int(n)


def frozen_add_skip_rms_norm(a, b, w, eps: float, offer_rows: bool = False, readers: int = 1):
    """(a + b, `frozen_rms_norm` of a + b) for the residual stream's add and the norm that
    reads its result: one kernel writes both (`normalize`'s add), and the backward is
    `frozen_skip_rms_norm`'s (`readers` as there). The sum is rounded as autograd's add would
    round it. Summands of two dtypes or shapes (which autograd's add would promote or
    broadcast) take that add."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return frozen_skip_rms_norm(a + b, w, eps, offer_rows, readers)
    return _function()[2].apply(a, b, w, float(eps), bool(offer_rows), _readers(readers))


class Readers:
    """Which module reads which alias of a norm's output (`frozen_skip_rms_norm`'s readers),
    for the span of one call of the block that reads it. A module's forward (`fast_paths`'
    wrappers) asks `take` for its input: the alias offered to it when that input is the
    offered output itself, else the input unchanged; so a module called elsewhere, or a
    block that calls its modules on some other tensor, reads what it was given."""

    def __init__(self) -> None:
        self._out = None
        self._aliases: dict = {}

    def offer(self, out, aliases: dict) -> None:
        self._out, self._aliases = out, dict(aliases)

    def take(self, module, x):
        if x is self._out and module in self._aliases:
            return self._aliases.pop(module)
        return x

    def clear(self) -> None:
        self._out, self._aliases = None, {}


readers = Readers()


def _alias_takers(layer) -> tuple[list, list]:
    """The modules of a decoder layer that take an alias of their norm's output (`Readers`)
    besides the one reading the output itself: the attention's k_proj and v_proj (q_proj
    reads the output); for the MLP, the whole MLP where it is the frozen FP8 node (it reads
    its input once for gate and once for up), else up_proj."""
    attn, mlp = layer.self_attn, layer.mlp
    attention = [m for m in (getattr(attn, "k_proj", None), getattr(attn, "v_proj", None)) if takes_alias(m)]
    if takes_alias(mlp):
        return attention, [mlp]
    up = getattr(mlp, "up_proj", None)
    return attention, [up] if takes_alias(up) else []


def takes_alias(module) -> bool:
    """Whether a module's forward asks `readers.take` for its input (`fast_paths` marks them)."""
    return module is not None and getattr(getattr(module, "forward", None), "_kubetune_takes_alias", False)


def routed(norm) -> bool:
    """Whether a norm module takes the frozen-weight node now (`use_frozen_backward`, weight frozen)."""
    return getattr(norm, "_kubetune_frozen_norm", False) and not norm.weight.requires_grad


# Decoder layers whose forward is the pre-norm block
#   h = x + attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h))
# (transformers 5.x; checked against each family's own forward by tests/unit/test_rms_norm.py).
SKIP_NORM_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def use_skip_norms(layer) -> bool:
    """Give a pre-norm decoder layer (SKIP_NORM_LAYERS) a forward in which each of its two
    norms reads the residual stream through `frozen_skip_rms_norm`, while both norms are
    routed (`routed`, checked at each call; otherwise the layer's own forward runs).

    Why: the residual stream's tensor before each norm has two readers (the norm and the
    residual add), so autograd adds their two gradients in a pass of its own: on an 8B step
    of 16k tokens, 64 such adds a step, 0.09 ms each (bench/RESULTS.md, issue 16, tenth
    round). Here the norm's backward kernel adds the stream's gradient as it writes its own.
    True if patched; idempotent."""
    if getattr(layer, "_kubetune_skip_norms", False):
        return True
    if type(layer).__name__ not in SKIP_NORM_LAYERS or not all(
            hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")):
        return False
    own = layer.forward

    def forward(hidden_states, *args, **kwargs):
        first, second = layer.input_layernorm, layer.post_attention_layernorm
        if args or not (routed(first) and routed(second)):
            return own(hidden_states, *args, **kwargs)
        attention_takers, mlp_takers = _alias_takers(layer)
        residual, h, *aliases = frozen_skip_rms_norm(hidden_states, first.weight, first.variance_epsilon,
                                                   getattr(first, "_kubetune_offer_rows", False),
                                                   1 + len(attention_takers))
        readers.offer(h, zip(attention_takers, aliases))
        try:
            h, _ = layer.self_attn(hidden_states=h, **kwargs)
        finally:
            readers.clear()
        residual, h, *aliases = frozen_add_skip_rms_norm(residual, h, second.weight, second.variance_epsilon,
                                                       getattr(second, "_kubetune_offer_rows", False),
                                                       1 + len(mlp_takers))
        readers.offer(h, zip(mlp_takers, aliases))
        try:
            return residual + layer.mlp(h)
        finally:
            readers.clear()

    layer.forward = forward
    layer._kubetune_skip_norms = True
    return True


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
