"""The NF4 -> e4m3 kernel (trainer/fp8.py `quantize_nf4`), run by Triton's
interpreter on the CPU against the path it replaces: bitsandbytes' own
dequantisation, then `quantize_tensor`. The interpreter casts to e4m3 its own
way (see `_compare`), so codes are compared up to that here; bench/check_fp8.py
compares them exactly on a GPU."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script in the child
from interpreted import main, run_check  # noqa: E402

CHECKS = ("nested", "plain_absmax", "odd_shape")


@pytest.mark.parametrize("check", CHECKS)
def test_nf4_to_e4m3_in_one_kernel(check):
    pytest.importorskip("bitsandbytes")
    run_check(__file__, check)


def same_codes(g, r, either_way: bool = False):
    """e4m3 codes `g` from the interpreter equal `r` up to the interpreter's own cast: it
    truncates toward zero where the GPU rounds to nearest even, and loses the carry into the
    exponent (a value rounding up to 2^e comes out 2^(e-1)). Exactly those, nothing else.
    `either_way`: one e4m3 step off in either direction is allowed too (values at or a float32
    ulp under a tie, which the interpreter rounds away from zero, and the smallest subnormals)."""
    import torch

    if either_way:
        big = torch.maximum(g.abs(), r.abs()).clamp_min(2.0**-6)
        close = (g - r).abs() <= torch.exp2(torch.floor(torch.log2(big)) - 3)  # one e4m3 step
    else:
        step = torch.exp2(torch.floor(torch.log2(g.abs().clamp_min(2.0**-6))) - 3)  # one e4m3 step at |g|
        close = (g == r) | ((g.sign() == r.sign()) & (g.abs() < r.abs()) & (r.abs() - g.abs() <= step))
    carry_lost = (r != 0) & (torch.frexp(r)[0].abs() == 0.5) & (g == r / 2)
    assert bool((close | carry_lost).all()), (g - r).abs().max()
    assert (g != r).float().mean().item() < 0.1


def _compare(n, k, nested, dtype_name="bfloat16"):
    import logging

    logging.disable(logging.WARNING)  # bitsandbytes' note about its optional CPU kernels
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch

    from kubetune.trainer import fp8

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(n * 7 + k)
    w = (torch.randn(n, k) * torch.logspace(-2, 1, k)).to(dtype)  # columns three decades apart
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=nested, blocksize=64,
                          quant_storage=torch.uint8)._quantize("cpu")
    dense = bnbf.dequantize_4bit(p.data, p.quant_state)
    amax = fp8.weight_amax(dense)
    for transpose in (False, True):
        ref, scale = fp8.quantize_tensor(dense, transpose=transpose, amax=amax)
        got = fp8.quantize_nf4(p, amax, transpose=transpose)
        assert got.shape == ref.shape and got.dtype == torch.float8_e4m3fn and got.is_contiguous()
        g, r = got.float(), ref.float()
        same_codes(g, r)
        assert ((g * scale - dense.float().t() if transpose else g * scale - dense.float()).norm()
                / dense.float().norm()).item() < 0.1  # a wrong layout or scale is ~1.4
        # Other tiles (bench/tune_fp8_kernels.py's sweep) give the same codes, bit for bit.
        for tiles in ({"BN": 16, "num_warps": 4}, {"BN": 128, "num_warps": 8}):
            assert torch.equal(fp8.quantize_nf4(p, amax, transpose=transpose, tiles=tiles).view(torch.uint8),
                               got.view(torch.uint8)), tiles


def check_nested():
    _compare(96, 256, nested=True)


def check_plain_absmax():
    _compare(64, 192, nested=False)


def check_odd_shape():
    _compare(40, 320, nested=True, dtype_name="float16")  # tiles cut at the edges; fp16 rounding


if __name__ == "__main__":
    main(globals())
