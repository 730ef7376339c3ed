"""The LoRA-dropout kernels (trainer/lora_dropout.py), run by Triton's
interpreter on the CPU: the same Triton programs the GPU compiles, against plain
PyTorch arithmetic over the mask they draw. The interpreter must be chosen
before Triton is imported, so the checks run in a child process
and each test here names one check (tests/unit/interpreted.py). bench/check_lora.py runs the same comparisons on a GPU."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script in the child
from interpreted import main, run_check  # noqa: E402

CHECKS = ("mask_law", "forward", "backward", "add_product", "tiles", "lora_linear", "recompute", "kept_products")


@pytest.mark.parametrize("check", CHECKS)
def test_lora_dropout_kernels(check):
    run_check(__file__, check)


# ---------------------------------------------------------------- the checks (child process)

def _inputs(m=70, k=96, r=8, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(r, k, generator=g) / 4


def check_mask_law():
    from kubetune.trainer import lora_dropout as ld

    p = 0.1
    mask = ld.keep_mask(7, 200, 256, p, "cpu")
    kept = mask.float().mean().item()
    assert abs(kept - (1 - p)) < 0.01, kept  # 51,200 draws: 4.5 standard deviations
    assert (ld.keep_mask(7, 200, 256, p, "cpu") == mask).all()  # same seed, same mask
    other = ld.keep_mask(8, 200, 256, p, "cpu")
    assert (other != mask).float().mean().item() > 0.1  # another seed, another mask
    rows, cols = mask.float().mean(dim=1), mask.float().mean(dim=0)
    assert rows.min() > 0.75 and cols.min() > 0.75  # no row or column dropped as a block
    for slot in range(8):  # each of the 8 numbers cut from one Philox call is unbiased
        rate = mask[:, slot::8].float().mean().item()
        assert abs(rate - (1 - p)) < 0.02, (slot, rate)
    threshold, scale = ld.threshold_and_scale(p)
    assert threshold == 6554 and abs(scale * (1 - threshold / 65536) - 1) < 1e-12


def check_forward():
    from kubetune.trainer import lora_dropout as ld

    x, a = _inputs()
    p, seed = 0.2, 1234
    keep = ld.keep_mask(seed, *x.shape, p, "cpu") * ld.threshold_and_scale(p)[1]
    ref = (x * keep) @ a.t()
    got = ld.lora_a_forward(x, a, seed, p)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4, (got - ref).abs().max().item()


def check_backward():
    import torch

    from kubetune.trainer import lora_dropout as ld

    x, a = _inputs(m=150, k=80, r=5)  # rank 5: padded to 16 inside the kernels
    p, seed = 0.3, 99
    keep = ld.keep_mask(seed, *x.shape, p, "cpu") * ld.threshold_and_scale(p)[1]
    dxa = torch.randn(150, 5, generator=torch.Generator().manual_seed(3))
    dx0 = torch.randn(150, 80)
    dx = dx0.clone()
    ld.add_input_grad(dx, dxa, a, seed, p)
    ref_dx = dx0 + (dxa @ a) * keep
    assert (dx - ref_dx).abs().max().item() < 1e-4
    ref_da = dxa.t() @ (x * keep)
    for splits in (0, 1, 2, 7):  # uneven splits of the rows sum to the same
        got = ld.a_grad(dxa, x, seed, p, splits=splits)
        assert (got - ref_da).abs().max().item() < 1e-3, splits


def check_add_product():
    """The forward's B product added into the base output: out += s * xa @ b^T, every
    element (no mask), at any tiles; an output the kernel cannot take is left alone."""
    import torch

    from kubetune.trainer import lora_dropout as ld

    g = torch.Generator().manual_seed(5)
    xa, b, out0 = torch.randn(150, 5, generator=g), torch.randn(80, 5, generator=g), torch.randn(150, 80, generator=g)
    ref = out0 + 1.7 * (xa @ b.t())
    for t in (None, {"BM": 64, "BK": 32, "num_warps": 4, "num_stages": 2}):
        out = out0.clone()
        assert ld.add_product(out, xa, b, 1.7, tiles=t)
        assert (out - ref).abs().max().item() < 1e-4, t
    wide = out0.repeat(1, 2)[:, :80]  # a view whose rows are not contiguous
    assert not ld.add_product(wide, xa, b, 1.7) and torch.equal(wide, out0)


def check_tiles():
    """Other tiles (bench/tune_lora_dropout.py sweeps them) draw the same mask and compute
    the same products; only the summation order may differ."""
    import torch

    from kubetune.trainer import lora_dropout as ld

    x, a = _inputs(m=150, k=256, r=5)
    p, seed = 0.3, 7
    dxa = torch.randn(150, 5, generator=torch.Generator().manual_seed(4))
    dx0 = torch.randn(150, 256)
    base = (ld.lora_a_forward(x, a, seed, p), ld.a_grad(dxa, x, seed, p))
    dx_base = dx0.clone()
    ld.add_input_grad(dx_base, dxa, a, seed, p)
    for bm, bk in ((16, 64), (128, 256), (64, 32)):
        t = {"BM": bm, "BK": bk, "num_warps": 4, "num_stages": 2, "programs": 3}
        assert (ld.lora_a_forward(x, a, seed, p, tiles=t) - base[0]).abs().max().item() < 1e-4, t
        assert (ld.a_grad(dxa, x, seed, p, tiles=t) - base[1]).abs().max().item() < 1e-3, t
        dx = dx0.clone()
        ld.add_input_grad(dx, dxa, a, seed, p, tiles=t)
        assert (dx - dx_base).abs().max().item() < 1e-4, t


def _lora_layer(seed=0):
    import torch

    torch.manual_seed(seed)
    base = torch.nn.Linear(96, 48)
    base.requires_grad_(False)
    a = (torch.randn(8, 96) / 8).requires_grad_()
    b = (torch.randn(48, 8) / 8).requires_grad_()
    return base, a, b


def check_lora_linear():
    """The fused node with the kernels = PEFT's formula over the same mask."""
    import torch

    from kubetune.trainer import lora_dropout as ld
    from kubetune.trainer import lora_kernels

    base, a, b = _lora_layer()
    p, s = 0.25, 2.0
    x = torch.randn(3, 40, 96, requires_grad=True)
    seeds = []
    real = ld.new_seed
    ld.new_seed = lambda: seeds.append(real()) or seeds[-1]
    added = []
    add = ld.add_product
    ld.add_product = lambda *args: added.append(add(*args)) or added[-1]
    y = lora_kernels.lora_linear(x, a, b, base, s, p)
    assert len(seeds) == 2, "the kernel path must be taken"  # the kernel's seed, then the kept product's key
    assert added == [True], "the B product must be added by its kernel"
    dy = torch.randn_like(y)
    y.backward(dy)
    got = (y.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone())
    keep = ld.keep_mask(seeds[0], 120, 96, p, "cpu").reshape(3, 40, 96) * ld.threshold_and_scale(p)[1]
    x.grad = a.grad = b.grad = None
    ref = base(x) + ((x * keep) @ a.t() @ b.t()) * s
    ref.backward(dy)
    for g, r in zip(got, (ref.detach(), x.grad, a.grad, b.grad)):
        assert (g - r).abs().max().item() < 1e-4 * max(1.0, r.abs().max().item())


def check_recompute():
    """Under gradient checkpointing the recomputed forward draws the same mask:
    the gradients equal those of the run without checkpointing."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from kubetune.trainer import lora_kernels

    base, a, b = _lora_layer()
    x = torch.randn(2, 33, 96)

    def layer(t):
        return lora_kernels.lora_linear(t, a, b, base, 2.0, 0.5).tanh()

    out = {}
    for ckpt in (False, True):
        torch.manual_seed(5)
        xi = x.clone().requires_grad_()
        y = checkpoint(layer, xi, use_reentrant=False) if ckpt else layer(xi)
        y.pow(2).sum().backward()
        out[ckpt] = (y.detach(), xi.grad, a.grad.clone(), b.grad.clone())
        a.grad = b.grad = None
    for g, r in zip(out[True], out[False]):
        assert torch.equal(g, r)
    torch.manual_seed(6)  # and another seed really drops other elements
    assert not torch.equal(layer(x), out[False][0])


def check_kept_products():
    """The recompute takes the product its first forward made (one forward kernel per
    product, not two), with the same gradients as without checkpointing; nothing stays kept
    after the backward, after a forward whose output is dropped, or under no_grad."""
    import gc

    import torch
    from torch.utils.checkpoint import checkpoint

    from kubetune.trainer import lora_dropout as ld
    from kubetune.trainer import lora_kernels

    base, a, b = _lora_layer()
    x = torch.randn(2, 33, 96)
    made = []
    real = ld.lora_a_forward
    ld.lora_a_forward = lambda *args, **kw: made.append(1) or real(*args, **kw)

    def layers(t):  # the same adapter twice, on two inputs: two products that must not meet
        return lora_kernels.lora_linear(lora_kernels.lora_linear(t, a, b, base, 2.0, 0.5).tanh() @ base.weight, a, b,
                                        base, 2.0, 0.5).tanh()

    out = {}
    for ckpt in (False, True):
        torch.manual_seed(5)
        made.clear()
        xi = x.clone().requires_grad_()
        y = checkpoint(layers, xi, use_reentrant=False) if ckpt else layers(xi)
        assert len(ld.kept_products) == 2  # kept from the forward until the backward
        y.pow(2).sum().backward()
        out[ckpt] = (y.detach(), xi.grad, a.grad.clone(), b.grad.clone(), len(made))
        a.grad = b.grad = None
        del y
        gc.collect()
        assert len(ld.kept_products) == 0, "kept past the backward"
    for g, r in zip(out[True][:4], out[False][:4]):
        assert torch.equal(g, r)
    assert out[False][4] == 2 and out[True][4] == 2  # the recompute made no product of its own

    y = layers(x.clone().requires_grad_())  # a forward without a backward
    assert len(ld.kept_products) == 2
    del y
    gc.collect()
    assert len(ld.kept_products) == 0, "kept after its graph was freed"
    with torch.no_grad():
        layers(x)
    gc.collect()
    assert len(ld.kept_products) == 0, "kept under no_grad"


if __name__ == "__main__":
    main(globals())
