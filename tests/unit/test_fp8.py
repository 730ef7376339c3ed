"""CPU tests of the FP8 base products (trainer/fp8.py, the nodes of
trainer/lora_kernels.py and their wiring in trainer/fast_paths.py). The Triton
kernels run only on a GPU; bench/check_fp8.py checks them there against the same
arithmetic that these tests pin down. Whether a run uses FP8
(training.performance.fp8) is tested with the other switches in test_performance.py."""

from __future__ import annotations

import pytest
import torch

from kubetune.trainer import fast_paths, fp8, lora_kernels
from tests.unit.test_lora_kernels import _lora, _loss_and_grads, _tiny_llama


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantize_rows_scales_each_row_to_the_e4m3_range():
    x = torch.randn(21, 64) * torch.logspace(-3, 3, 21).unsqueeze(1)  # rows six decades apart
    q, s = fp8.quantize_rows(x.to(torch.bfloat16))
    assert q.dtype == torch.float8_e4m3fn and q.shape == (32, 64)  # rows padded to 16
    assert s.shape == (32, 1) and s.dtype == torch.float32
    assert torch.all(q[21:].float() == 0) and torch.all(s[21:] == 1)
    # the largest element of every row lands on the e4m3 maximum: no row loses its range
    assert torch.allclose(q[:21].float().abs().amax(dim=1), torch.full((21,), fp8.E4M3_MAX))
    back = q[:21].float() * s[:21]
    for i in range(21):  # 3 mantissa bits: at most 1/16 relative error per element, per row
        assert _rel(back[i], x[i]) < 0.04, i


def test_quantize_tensor_and_its_transpose_are_the_same_numbers():
    w = torch.randn(48, 32, dtype=torch.bfloat16)
    q, s = fp8.quantize_tensor(w)
    qt, st = fp8.quantize_tensor(w, transpose=True)
    assert q.shape == (48, 32) and qt.shape == (32, 48) and qt.is_contiguous()
    assert torch.equal(qt.float(), q.float().t()) and torch.equal(s, st)
    assert _rel(q.float() * s, w) < 0.04
    assert q.float().abs().max() == fp8.E4M3_MAX


def test_zero_rows_and_zero_weights_stay_finite():
    q, s = fp8.quantize_rows(torch.zeros(4, 16))
    assert torch.all(q.float() == 0) and torch.all(torch.isfinite(s))
    y = fp8.linear(torch.zeros(3, 16), torch.zeros(16, 16), torch.float32)
    assert torch.all(y == 0)


def test_linear_and_input_grad_match_the_exact_products():
    torch.manual_seed(0)
    x, w, dy = torch.randn(40, 64), torch.randn(32, 64) / 8, torch.randn(40, 32)
    y = fp8.linear(x, w, torch.float32)
    dx = fp8.linear_input_grad(dy, w, torch.float32)
    assert y.shape == (40, 32) and dx.shape == (40, 64)
    # two e4m3 roundings per product: a few percent, far from a wrong product (~100%)
    assert _rel(y, x @ w.t()) < 0.05
    assert _rel(dx, dy @ w) < 0.05


def test_fast_accumulation_reaches_each_product_only_when_asked(monkeypatch):
    # The switches reach cuBLASLt only through _scaled_mm's flag: the forward product takes it
    # when the run asks for it there (torchao's recipe), the input gradient only when the run
    # asks for it there too.
    seen = []
    real = torch._scaled_mm

    def spy(*args, use_fast_accum=False, **kwargs):
        seen.append(use_fast_accum)
        return real(*args, use_fast_accum=use_fast_accum, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    x, w, dy = torch.randn(40, 64), torch.randn(32, 64) / 8, torch.randn(40, 32)
    try:
        for forward, grad in ((False, False), (True, False), (False, True), (True, True)):
            fp8.set_fast_accum(forward, grad)
            fp8.linear(x, w, torch.float32)
            fp8.linear_input_grad(dy, w, torch.float32)
    finally:
        fp8.set_fast_accum(False, False)
    assert seen == [False, False, True, False, False, True, True, True]


def test_fp8_lora_linear_matches_bf16_within_fp8_rounding():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=True)
    base.requires_grad_(False)
    a = (torch.randn(4, 64) / 8).requires_grad_()
    b = (torch.randn(48, 4) / 8).requires_grad_()
    out = {}
    for use_fp8 in (False, True):
        x = torch.randn(30, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        y = lora_kernels.lora_linear(x, a, b, base, 2.0, 0.0, use_fp8)
        y.pow(2).sum().backward()
        out[use_fp8] = (y.detach(), x.grad, a.grad.clone(), b.grad.clone())
        a.grad = b.grad = None
    for got, ref in zip(out[True], out[False]):
        assert got.shape == ref.shape
        assert 0 < _rel(got, ref) < 0.06  # rounded (not silently the bf16 path), and close


def test_fp8_base_products_patch_the_decoder_layers_and_train_alike():
    model = _lora(_tiny_llama(), dropout=0.0)
    ids = torch.randint(3, 256, (2, 24))
    fast_paths.fuse_lora_layers(model)
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    n = fast_paths.fp8_base_products(model)
    assert n == 2 * 7  # every adapted projection of both layers (all-linear: nothing left unadapted)
    assert fast_paths.fp8_base_products(model) == n  # idempotent
    loss, grads = _loss_and_grads(model, ids)
    assert abs(loss.item() - ref_loss.item()) < 0.01 * ref_loss.item()
    for name in grads:  # every adapter gradient keeps its direction and size (the update the optimizer sees)
        got, ref = grads[name].flatten(), ref_grads[name].flatten()
        assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.99, name
        assert 0.95 < (got.norm() / ref.norm()).item() < 1.05, name


def test_fp8_reaches_the_frozen_mlp_when_only_attention_is_adapted():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     task_type="CAUSAL_LM"))
    fast_paths.fuse_lora_layers(model)
    assert fast_paths.fp8_base_products(model) == 2 * 7  # q, v fused + k, o, gate, up, down frozen
    mlp = model.get_base_model().model.layers[0].mlp
    assert getattr(mlp.down_proj.forward, "_kubetune_fp8", False)
    lm_head = model.get_base_model().lm_head
    assert not getattr(lm_head.forward, "_kubetune_fp8", False)  # the loss stays bf16
    ids = torch.randint(3, 256, (1, 16))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.grad is not None


@pytest.mark.parametrize("targets, whole_mlp", [
    (["q_proj", "v_proj"], True),  # gate, up and down frozen: the MLP is one node
    (["q_proj", "v_proj", "gate_proj", "up_proj"], False),  # down alone frozen: down(swiglu)
])
def test_swiglu_fused_mlp_matches_the_unfused_fp8_path(monkeypatch, targets, whole_mlp):
    """An MLP whose down_proj is a frozen FP8 linear, fused with its SwiGLU product
    (`fuse_swiglu`): the loss and every adapter gradient are those of the unfused FP8 path
    (the same arithmetic on the CPU), and the gradient reaches the MLP's input (the first
    layer's adapters see it). With gate and up frozen too, the backward takes their output
    gradients straight to e4m3 rows (`swiglu_backward_rows`)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                     task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(3, 256, (2, 24))
    fast_paths.fuse_lora_layers(model)
    n = fast_paths.fp8_base_products(model)
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    layers = model.get_base_model().model.layers
    assert not any(getattr(layer.mlp.forward, "_kubetune_swiglu_fp8", False) for layer in layers)
    assert fast_paths.fp8_base_products(model, fuse_swiglu=True) == n
    assert all(getattr(layer.mlp.forward, "_kubetune_swiglu_fp8", False) for layer in layers)
    assert fast_paths.fuse_swiglu_down(layers[0]) == 1  # idempotent
    calls = _count_calls(monkeypatch, fp8, "swiglu_rows")
    backward_rows = _count_calls(monkeypatch, fp8, "swiglu_backward_rows")
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7)
    assert len(calls) == 2  # the fused node ran, once per layer
    assert len(backward_rows) == (2 if whole_mlp else 0)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "v_proj", "gate_proj", "up_proj"]])
def test_checkpointing_does_not_recompute_the_fused_down_product(monkeypatch, targets):
    """Under (non-reentrant) checkpointing the recompute stops once the saved tensors are
    back: the fused MLP's down product, whose node saves nothing, runs once per layer and
    step, as the unfused path's does; gradients as without checkpointing."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                     task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    fast_paths.fuse_lora_layers(model)
    fast_paths.fp8_base_products(model, fuse_swiglu=True)
    ids = torch.randint(3, 256, (2, 24))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    products = []
    real = lora_kernels._frozen_product
    monkeypatch.setattr(lora_kernels, "_frozen_product",
                        lambda base, *a, **k: products.append((base.in_features, base.out_features))
                        or real(base, *a, **k))
    loss, grads = _loss_and_grads(model, ids)
    hidden, ffn = 64, 128  # _tiny_llama's
    assert products.count((ffn, hidden)) == 2  # down: once per layer, not again in the recompute
    if "gate_proj" not in targets:
        assert products.count((hidden, ffn)) == 2 * 2 * 2  # gate and up: forward and recompute, 2 layers
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("targets, node", [
    (["q_proj", "v_proj"], lora_kernels._frozen_gate_up_rows_fn),
    (["q_proj", "v_proj", "gate_proj", "up_proj"], lora_kernels._swiglu_rows_fn),
])
def test_the_rows_node_is_not_handed_zero_gradients_for_its_rows(monkeypatch, targets, node):
    """The e4m3 rows (q, scale) carry no gradient: the rows node's backward gets None for
    them, not a zero tensor of q's shape written in every layer's backward (autograd's
    default for an output that reached no loss)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                     task_type="CAUSAL_LM"))
    fast_paths.fuse_lora_layers(model)
    fast_paths.fp8_base_products(model, fuse_swiglu=True)
    cls, seen = node(), []
    real = cls.backward
    monkeypatch.setattr(cls, "backward", staticmethod(
        lambda ctx, dh, dq, ds: seen.append((dh, dq, ds)) or real(ctx, dh, dq, ds)))
    _loss_and_grads(model, torch.randint(3, 256, (2, 24)))
    assert len(seen) == 2  # one backward per layer
    for dh, dq, ds in seen:
        assert dh is not None and dh.shape == (2 * 24, 128) and dh.abs().sum() > 0
        assert dq is None and ds is None


def test_swiglu_backward_rows_are_the_rows_of_the_stored_gradients():
    g = torch.Generator().manual_seed(4)
    a, b, dh = ((torch.randn(21, 48, generator=g) * 2).bfloat16() for _ in range(3))
    a0, b0 = a.clone(), b.clone()
    (qa, sa), (qb, sb) = fp8.swiglu_backward_rows(a, b, dh)
    da, db = fp8.swiglu_backward_(a0.clone(), b0.clone(), dh)
    for (q, s), ref in (((qa, sa), da), ((qb, sb), db)):
        rq, rs = fp8.quantize_rows(ref)
        assert q.shape == rq.shape == (32, 48)  # padded to the grid of 16
        assert torch.equal(q.float(), rq.float()) and torch.equal(s, rs)
    assert torch.equal(a, a0) and torch.equal(b, b0)  # the saved outputs are left as they were


def test_an_adapted_down_proj_keeps_its_own_mlp_forward():
    model = _lora(_tiny_llama(), dropout=0.0)  # all-linear: down_proj is a LoRA layer
    fast_paths.fuse_lora_layers(model)
    fast_paths.fp8_base_products(model, fuse_swiglu=True)
    assert not any(getattr(layer.mlp.forward, "_kubetune_swiglu_fp8", False)
                   for layer in model.get_base_model().model.layers)


def test_swiglu_backward_matches_autograd():
    g = torch.Generator().manual_seed(3)
    a, b, dh = (torch.randn(5, 48, generator=g) * 2 for _ in range(3))
    af, bf = a.clone().requires_grad_(), b.clone().requires_grad_()
    (torch.nn.functional.silu(af) * bf).backward(dh)
    da, db = fp8.swiglu_backward_(a, b, dh)
    assert da is a and db is b  # written over the saved tensors, as Liger's backward does
    torch.testing.assert_close(da, af.grad)
    torch.testing.assert_close(db, bf.grad)


def test_only_weights_on_the_16_grid_go_fp8():
    assert fp8.pays(4096, 14336) and fp8.pays(4096, 1024) and fp8.pays(64, 48)
    assert not fp8.pays(64, 40) and not fp8.pays(40, 64)  # off cuBLASLt's grid of 16


def test_fp8_needs_a_cuda_device():
    assert not fp8.supported(torch.device("cpu"))
    assert not fp8.supported("cpu")


def _count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_sibling_projections_quantise_their_shared_input_once(monkeypatch):
    """q/k/v (and gate/up) read the same hidden state: one quantisation per group
    and pass, the same numbers as quantising it per projection, and no entry
    left behind holding the input alive."""
    torch.manual_seed(0)
    model = _lora(_tiny_llama(), dropout=0.0)
    fast_paths.fuse_lora_layers(model)
    fast_paths.fp8_base_products(model)
    attn = model.get_base_model().model.layers[0].self_attn
    mlp = model.get_base_model().model.layers[0].mlp
    roles = [getattr(m, "_kubetune_fp8_share", None) for m in
             (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    assert roles == [fp8.OPEN, fp8.USE, fp8.CLOSE, None, fp8.OPEN, fp8.CLOSE, None]
    ids = torch.randint(3, 256, (2, 24))
    calls = _count_calls(monkeypatch, fp8, "quantize_rows")
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert len(calls) == 2 * 4  # 2 layers x (q/k/v 1 + o 1 + gate/up 1 + down 1)
    shared_loss, shared_grads = _loss_and_grads(model, ids)
    assert fp8.shared_rows._ref is None  # the closing sibling dropped the entry
    for block in fast_paths.decoder_layers(model):  # the same run without sharing
        for m in block.modules():
            if hasattr(m, "_kubetune_fp8_share"):
                del m._kubetune_fp8_share
    calls.clear()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert len(calls) == 2 * 7
    loss, grads = _loss_and_grads(model, ids)
    assert torch.equal(loss, shared_loss)
    for name in grads:
        assert torch.equal(grads[name], shared_grads[name]), name


def test_a_mismatched_input_is_quantised_afresh():
    """A sibling called with another tensor (or after an in-place edit) must not
    reuse the first one's numbers."""
    rows = fp8.SharedRows()
    x = torch.randn(8, 32)
    first = rows.rows(x, x, fp8.OPEN)
    other = torch.randn(8, 32)
    got = rows.rows(other, other, fp8.USE)
    assert not torch.equal(got[0].float(), first[0].float())
    assert rows.rows(x, x, fp8.USE) is first  # the opened entry is still there
    x.mul_(2)  # bumps the version counter
    again = rows.rows(x, x, fp8.CLOSE)
    assert again is not first and torch.equal(again[1][:8], first[1][:8] * 2)  # rows past 8: padding
    assert rows._ref is None


def test_the_frozen_weight_scale_is_computed_once_and_follows_edits(monkeypatch):
    base = torch.nn.Linear(64, 48, bias=False)
    base.requires_grad_(False)
    calls = _count_calls(monkeypatch, fp8, "weight_amax")
    x = torch.randn(5, 64)
    y1 = lora_kernels.frozen_linear_fp8(x, base)
    y2 = lora_kernels.frozen_linear_fp8(x, base)
    assert len(calls) == 1 and torch.equal(y1, y2)
    with torch.no_grad():
        base.weight.mul_(4)  # a changed weight gets a new scale
    y3 = lora_kernels.frozen_linear_fp8(x, base)
    assert len(calls) == 2
    assert _rel(y3, 4 * y1) < 1e-6
