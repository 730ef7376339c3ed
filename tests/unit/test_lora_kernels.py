"""CPU tests of the fused LoRA node (trainer/lora_kernels.py) and of the wiring
that puts it and the other fast paths into a model (trainer/fast_paths.py):
against PEFT's own forward, with dropout, under gradcheck; DoRA layers keep
PEFT's forward; the dtype clean-up; layers left uncheckpointed."""

from __future__ import annotations

import pytest
import torch

from kubetune.trainer import fast_paths, lora_kernels


def test_downcast_frozen_fp32_keeps_trainable_fp32():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    m[0].requires_grad_(False)
    n = fast_paths.downcast_frozen_fp32(m, torch.bfloat16)
    assert n == 20
    assert m[0].weight.dtype == torch.bfloat16 and m[1].weight.dtype == torch.float32



# ---------------------------------------------------------------- checkpointing per layer

def test_uncheckpointed_layers_train_the_same():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2)
    ids = torch.randint(0, 128, (2, 24))
    grads = []
    for n in (0, 3):
        torch.manual_seed(1)
        model = LlamaForCausalLM(cfg)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        assert fast_paths.uncheckpoint_last_layers(model, n) == n
        flags = [layer.gradient_checkpointing for layer in fast_paths.decoder_layers(model)]
        assert flags == [True] * (4 - n) + [False] * n
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert fast_paths.uncheckpoint_last_layers(model, 99) == 4



# ---------------------------------------------------------------- fused LoRA

def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


def _lora(model, dropout):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_lora_matches_peft_forward_and_grads():
    model = _lora(_tiny_llama(), dropout=0.0)
    ids = torch.randint(3, 256, (2, 24))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    n = fast_paths.fuse_lora_layers(model)
    assert n == 2 * 7  # q k v o gate up down in each of 2 layers
    assert fast_paths.fuse_lora_layers(model) == n  # idempotent
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * n  # lora_A and lora_B of each layer
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_lora_respects_disabled_adapter():
    model = _lora(_tiny_llama(), dropout=0.0)
    ids = torch.randint(3, 256, (1, 16))
    fast_paths.fuse_lora_layers(model)
    with model.disable_adapter():
        off = model(input_ids=ids, use_cache=False).logits
    on = model(input_ids=ids, use_cache=False).logits
    base = _tiny_llama()(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(off, base)
    assert not torch.allclose(on, base)


def test_lora_linear_with_dropout_uses_one_mask_for_value_and_grads():
    torch.manual_seed(1)
    base = torch.nn.Linear(8, 6, dtype=torch.float64)
    base.requires_grad_(False)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    state = torch.get_rng_state()
    y = lora_kernels.lora_linear(x, a, b, base, 0.5, p=0.3)
    g = torch.randn_like(y)
    dx, da, db = torch.autograd.grad(y, (x, a, b), g)
    torch.set_rng_state(state)
    _, keep = lora_kernels.dropout_with_mask(x.detach(), 0.3)
    assert keep.dtype == torch.bool and 0 < int((~keep).sum()) < keep.numel()
    mask = keep.to(x.dtype) / 0.7
    x2 = x.detach().clone().requires_grad_(True)
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    ref = base(x2) + 0.5 * ((x2 * mask) @ a2.t()) @ b2.t()
    rdx, rda, rdb = torch.autograd.grad(ref, (x2, a2, b2), g)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(dx, rdx)
    torch.testing.assert_close(da, rda)
    torch.testing.assert_close(db, rdb)


def test_lora_linear_gradcheck():
    base = torch.nn.Linear(5, 4, dtype=torch.float64)
    base.requires_grad_(False)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: lora_kernels.lora_linear(x, a, b, base, 2.0), (x, a, b))


def test_dora_layers_keep_pefts_forward():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                     use_dora=True, task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(3, 256, (2, 24))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    # the fused node has no magnitude vector: every DoRA layer stays with PEFT
    assert fast_paths.fuse_lora_layers(model) == 0
    assert not any(getattr(m.forward, "_kubetune_fused", False) for m in model.modules())
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss)
    assert any("magnitude" in n for n in grads)  # DoRA's own parameters train
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def _resolved(**switches):
    from kubetune.trainer.performance import Resolved

    base = dict(attention="sdpa", liger=False, fused_lora=False, fp8=False, compile=False,
                selective_checkpointing=False, memory_budget_gib=None)
    return Resolved(**{**base, **switches})


def test_apply_fast_paths_does_what_the_resolved_settings_say(monkeypatch):
    # The paths run only on a CUDA model; the flags, not the environment, decide which.
    monkeypatch.setattr(fast_paths, "_model_device_is_cuda", lambda model: True)
    monkeypatch.setenv("KUBETUNE_FUSED_LORA", "0")  # read by performance.resolve only, never here
    off = _lora(_tiny_llama(), dropout=0.0)
    fast_paths.apply_fast_paths(off, _resolved())
    assert not any(getattr(m.forward, "_kubetune_fused", False) for m in off.modules())
    on = _lora(_tiny_llama(), dropout=0.0)
    fast_paths.apply_fast_paths(on, _resolved(fused_lora=True, fp8=True))
    assert sum(getattr(m.forward, "_kubetune_fused", False) for m in on.modules()) == 2 * 7
    assert sum(getattr(m, "_kubetune_fp8", False) for m in on.modules()) == 2 * 7


@pytest.mark.parametrize("switches, skip", [({"fused_lora": True}, True),
                                           ({"fused_lora": False}, False),  # as under ZeRO-3
                                           ({"fused_lora": True, "compile": True}, False)])
def test_the_decoder_layers_take_the_skip_norms_where_their_weights_are_read_directly(monkeypatch, switches, skip):
    monkeypatch.setattr(fast_paths, "_model_device_is_cuda", lambda model: True)
    model = _lora(_tiny_llama(), dropout=0.0)
    base = model.get_base_model()
    base._kubetune_liger = True  # Liger applied already (it runs on a GPU): its norms' attributes
    for m in base.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.casting_mode, m.offset = "llama", 0.0
    fast_paths.apply_fast_paths(model, _resolved(liger=True, **switches))
    layers = fast_paths.decoder_layers(model)
    assert len(layers) == 2 and all(getattr(m, "_kubetune_frozen_norm", False) for m in
                                    (layers[0].input_layernorm, layers[1].post_attention_layernorm))
    assert [getattr(layer, "_kubetune_skip_norms", False) for layer in layers] == [skip, skip]


def test_apply_fast_paths_leaves_a_cpu_model_alone():
    model = _lora(_tiny_llama(), dropout=0.0)
    fast_paths.apply_fast_paths(model, _resolved(fused_lora=True, fp8=True))
    assert not any(getattr(m.forward, "_kubetune_fused", False) for m in model.modules())
