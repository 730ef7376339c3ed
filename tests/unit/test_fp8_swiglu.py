"""The SwiGLU product quantised where it is made (trainer/fp8.py `swiglu_rows`,
`swiglu_backward_`): their Triton kernels run by Triton's interpreter on the CPU against
the unfused arithmetic (silu(gate) * up in the compute dtype, then `quantize_rows`; torch's
autograd for the gradients). The interpreter's e4m3 cast differs from the GPU's in known
ways (test_fp8_nf4 `same_codes`); bench/check_fp8.py compares the codes exactly on a GPU."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script in the child
from interpreted import main, run_check  # noqa: E402

CHECKS = ("rows_bf16", "rows_fp16_odd", "backward", "backward_rows", "frozen_mlp_alias")


@pytest.mark.parametrize("check", CHECKS)
def test_swiglu_kernels_match_the_unfused_arithmetic(check):
    run_check(__file__, check)


def _toward_zero(x, dtype):
    """fp32 `x` in `dtype` (bf16 or fp16), rounded toward zero."""
    import torch

    near = x.to(dtype)
    over = near.float().abs() > x.abs()
    return torch.where(over, torch.nextafter(near, torch.zeros_like(near)), near)


def _rows(m, k, dtype_name):
    import torch

    from kubetune.trainer import fp8
    from test_fp8_nf4 import same_codes

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(m + k)
    a = (torch.randn(m, k) * 3).to(dtype)
    b = (torch.randn(m, k) * torch.logspace(-2, 1, m)[:, None]).to(dtype)  # rows three decades apart
    # The interpreter rounds fp32 to bf16 toward zero (the GPU: to nearest even), so the
    # reference rounds the two products (silu, then times b) the interpreter's way.
    silu = _toward_zero(torch.nn.functional.silu(a.float()), dtype)
    ref_q, ref_s = fp8.quantize_rows(_toward_zero(silu.float() * b.float(), dtype))
    q, s = fp8.swiglu_rows_kernel(a, b)
    assert q.shape == ref_q.shape == (-(-m // 16) * 16, k) and s.shape == ref_s.shape
    # The same row maxima: the same rounded product (bf16: rounded as the reference rounds it;
    # fp16 the interpreter rounds its own way again: within two fp16 roundings).
    torch.testing.assert_close(s, ref_s, rtol=1e-6 if dtype == torch.bfloat16 else 2**-9, atol=0)
    # The interpreter's e4m3 cast is not the GPU's: each code within one e4m3 step of torch's,
    # few off at all (`same_codes`). A wrong row, column or scale is off by far more.
    same_codes(q.float(), ref_q.float(), either_way=True)
    assert bool((q[m:].float() == 0).all()) and bool((s[m:] == 1).all())  # the padding rows


def check_rows_bf16():
    _rows(37, 256, "bfloat16")


def check_rows_fp16_odd():
    _rows(5, 320, "float16")  # a row narrower than its block; fp16 rounding


def check_backward():
    import torch

    from kubetune.trainer import fp8

    torch.manual_seed(0)
    a, b, dh = (torch.randn(7, 4100) * 2).bfloat16(), torch.randn(7, 4100).bfloat16(), torch.randn(7, 4100).bfloat16()
    af, bf = a.float().requires_grad_(), b.float().requires_grad_()
    (torch.nn.functional.silu(af) * bf).backward(dh.float())
    da, db = fp8.swiglu_backward_kernel_(a.clone(), b.clone(), dh)
    for got, ref in ((da, af.grad), (db, bf.grad)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref, rtol=8e-3, atol=1e-5)


def check_frozen_mlp_alias():
    """The frozen FP8 MLP node with an alias of its input for up's product (`rms_norm.Readers`):
    the same output, and the two input gradients returned apart (gate's to x, up's to the
    alias), which sum to the gradient the node returns summed itself."""
    import torch

    from kubetune.trainer import lora_kernels

    torch.manual_seed(2)
    gate, up, down = (torch.nn.Linear(i, o, bias=False).bfloat16().requires_grad_(False)
                      for i, o in ((64, 128), (64, 128), (128, 64)))
    x = torch.randn(2, 21, 64).bfloat16()
    one, apart = x.clone().requires_grad_(), x.clone().requires_grad_()
    alias = apart.detach().requires_grad_()  # the same storage, its own gradient
    y_one = lora_kernels.frozen_swiglu_mlp_fp8(one, gate, up, down)
    y_apart = lora_kernels.frozen_swiglu_mlp_fp8(apart, gate, up, down, alias)
    assert torch.equal(y_one, y_apart)
    dh = torch.randn(y_one.shape).bfloat16()
    y_one.backward(dh)
    y_apart.backward(dh)
    assert not torch.equal(apart.grad, one.grad) and not torch.equal(alias.grad, one.grad)
    torch.testing.assert_close((apart.grad.float() + alias.grad.float()).bfloat16(), one.grad, rtol=2**-7, atol=1e-6)


def check_backward_rows():
    # The backward's gradients straight to e4m3 rows: each row's scale is that of the
    # gradient rounded to bf16 (toward zero, the interpreter's way), the codes within one step.
    import torch

    from kubetune.trainer import fp8
    from test_fp8_nf4 import same_codes

    torch.manual_seed(1)
    m, k = 19, 300
    a = (torch.randn(m, k) * 2).bfloat16()
    b = (torch.randn(m, k) * torch.logspace(-2, 1, m)[:, None]).bfloat16()
    dh = torch.randn(m, k).bfloat16()
    af, bf, dhf = a.float(), b.float(), dh.float()
    sig = torch.sigmoid(af)
    silu = af * sig
    refs = (_toward_zero(dhf * bf * (sig + silu * (1 - sig)), torch.bfloat16), _toward_zero(dhf * silu, torch.bfloat16))
    got = fp8.swiglu_backward_rows_kernel(a, b, dh)
    for (q, s), ref in zip(got, refs):
        rq, rs = fp8.quantize_rows(ref)
        assert q.shape == rq.shape == (32, k)
        torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
        same_codes(q.float(), rq.float(), either_way=True)
        assert bool((q[m:].float() == 0).all()) and bool((s[m:] == 1).all())


if __name__ == "__main__":
    main(globals())
