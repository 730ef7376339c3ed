"""CPU tests of the trainer's fast paths (trainer/kernels.py).

The GPU kernels themselves are checked on the GPU machine by
bench/check_attention.py; here: the pure parts (sample boundaries, memory
planning), the fused LoRA autograd node against PEFT's own forward, and the
transformers integration of the varlen attention with a per-sample reference
kernel standing in for the CUDA one.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from kubetune.trainer import kernels

GIB = 2**30
LLAMA8B = kernels.ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)


# ---------------------------------------------------------------- boundaries

def test_cu_seqlens_one_packed_row():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, max_len = kernels.cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 3, 5, 9]
    assert cu.dtype == torch.int32
    assert max_len == 4


def test_cu_seqlens_rows_are_separate_samples():
    # the second row continues 3, 4 but a row start is always a boundary
    pos = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 1]])
    cu, max_len = kernels.cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 4, 6, 8]
    assert max_len == 4


def test_cu_seqlens_1d_and_single_tokens():
    cu, max_len = kernels.cu_seqlens_from_position_ids(torch.tensor([0, 0, 0, 1]))
    assert cu.tolist() == [0, 1, 2, 4]
    assert max_len == 2


def test_cu_seqlens_non_zero_start_is_one_sample():
    # a sample need not start at 0 (e.g. a continuation); only a break of +1 splits
    cu, _ = kernels.cu_seqlens_from_position_ids(torch.tensor([[5, 6, 7, 2, 3]]))
    assert cu.tolist() == [0, 3, 5]


@pytest.mark.parametrize("bad", [torch.zeros(2, 2, 2, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long)])
def test_cu_seqlens_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match="position_ids"):
        kernels.cu_seqlens_from_position_ids(bad)


def test_boundary_cache_recomputes_after_in_place_change():
    cache = kernels._BoundaryCache()
    pos = torch.tensor([[0, 1, 2, 3]])
    first = cache.get(pos, 1)
    assert cache.get(pos, 1) is first  # same tensor: no recomputation
    pos[0, 2:] = torch.tensor([0, 1])  # in-place edit bumps the version counter
    cu, _ = cache.get(pos, 1)
    assert cu.tolist() == [0, 2, 4]
    other = torch.tensor([[0, 0, 0, 0]])
    assert cache.get(other, 1)[0].tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- kernel options

def test_kernel_options_new_signature():
    params = frozenset({"window_size", "scale", "enable_gqa"})
    kw, repeat = kernels._kernel_options(params, 32, 8, 128**-0.5, 128)
    assert kw == {"window_size": (-1, 0), "enable_gqa": True}
    assert repeat is False


def test_kernel_options_old_signature_repeats_kv_heads():
    params = frozenset({"is_causal", "return_aux"})
    kw, repeat = kernels._kernel_options(params, 32, 8, None, 128)
    assert kw == {"is_causal": True}
    assert repeat is True


def test_kernel_options_custom_scale_needs_scale_argument():
    with pytest.raises(RuntimeError, match="scaling=0.5"):
        kernels._kernel_options(frozenset({"is_causal"}), 8, 8, 0.5, 64)
    kw, _ = kernels._kernel_options(frozenset({"window_size", "scale"}), 8, 8, 0.5, 64)
    assert kw["scale"] == 0.5


# ---------------------------------------------------------------- memory planning

def test_plan_prefers_no_checkpointing_when_it_fits():
    plan = kernels.plan_micro_batch(LLAMA8B, max_length=2048, budget_bytes=400 * GIB, fixed_bytes=6 * GIB, fused_loss=True)
    assert plan.checkpointing is False
    assert plan.tokens == kernels.MAX_AUTO_TOKENS


def test_plan_checkpoints_on_a_16_gib_budget():
    plan = kernels.plan_micro_batch(LLAMA8B, max_length=2048, budget_bytes=int(15.6 * GIB), fixed_bytes=int(5.5 * GIB),
                                    fused_loss=True)
    assert plan.checkpointing is True
    assert 1 <= plan.rows <= kernels.MAX_AUTO_TOKENS // 2048
    assert plan.fixed_bytes + plan.tokens * plan.bytes_per_token <= plan.budget_bytes


def test_plan_grows_with_budget_and_shrinks_with_unfused_loss():
    small = kernels.plan_micro_batch(LLAMA8B, max_length=1024, budget_bytes=10 * GIB, fixed_bytes=6 * GIB, fused_loss=True)
    large = kernels.plan_micro_batch(LLAMA8B, max_length=1024, budget_bytes=14 * GIB, fixed_bytes=6 * GIB, fused_loss=True)
    unfused = kernels.plan_micro_batch(LLAMA8B, max_length=1024, budget_bytes=14 * GIB, fixed_bytes=6 * GIB, fused_loss=False)
    assert small.rows < large.rows
    assert unfused.rows < large.rows


def test_plan_leaves_layers_uncheckpointed_only_when_memory_is_left():
    tight = kernels.plan_micro_batch(LLAMA8B, max_length=2048, budget_bytes=int(15.6 * GIB), fixed_bytes=int(5.5 * GIB),
                                     fused_loss=True)
    roomy = kernels.plan_micro_batch(LLAMA8B, max_length=2048, budget_bytes=72 * GIB, fixed_bytes=int(5.5 * GIB),
                                     fused_loss=True)
    assert tight.uncheckpointed_layers == 0
    assert roomy.checkpointing and roomy.rows == tight.rows and 0 < roomy.uncheckpointed_layers < LLAMA8B.layers
    per_layer = (kernels.layer_activation_bytes_per_token(LLAMA8B) - LLAMA8B.hidden * 2) * 5 // 4  # with the margin
    planned = roomy.fixed_bytes + roomy.tokens * (roomy.bytes_per_token + roomy.uncheckpointed_layers * per_layer)
    assert planned <= roomy.budget_bytes < planned + roomy.tokens * per_layer  # as many as fit, not one more
    none_allowed = kernels.plan_micro_batch(LLAMA8B, max_length=2048, budget_bytes=72 * GIB, fixed_bytes=int(5.5 * GIB),
                                            fused_loss=True, allow_no_checkpointing=False)
    assert none_allowed.uncheckpointed_layers == 0


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
        assert kernels.uncheckpoint_last_layers(model, n) == n
        flags = [layer.gradient_checkpointing for layer in kernels.decoder_layers(model)]
        assert flags == [True] * (4 - n) + [False] * n
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert kernels.uncheckpoint_last_layers(model, 99) == 4


def test_plan_that_cannot_fit_one_row_names_the_numbers():
    with pytest.raises(MemoryError, match="maxLength"):
        kernels.plan_micro_batch(LLAMA8B, max_length=8192, budget_bytes=7 * GIB, fixed_bytes=6 * GIB, fused_loss=True)


def test_checkpointing_keeps_far_less_per_token():
    with_gc = kernels.activation_bytes_per_token(LLAMA8B, checkpointing=True, fused_loss=True)
    without = kernels.activation_bytes_per_token(LLAMA8B, checkpointing=False, fused_loss=True)
    assert 5 * with_gc < without


def test_memory_budget_env(monkeypatch):
    monkeypatch.delenv(kernels.ENV_MEMORY_BUDGET, raising=False)
    assert kernels.memory_budget_bytes(80 * GIB) == int(72 * GIB)
    monkeypatch.setenv(kernels.ENV_MEMORY_BUDGET, "15.6")
    assert kernels.memory_budget_bytes(80 * GIB) == int(15.6 * GIB)
    monkeypatch.setenv(kernels.ENV_MEMORY_BUDGET, "lots")
    with pytest.raises(ValueError, match=kernels.ENV_MEMORY_BUDGET):
        kernels.memory_budget_bytes(80 * GIB)


# ---------------------------------------------------------------- CPU behaviour

def test_cpu_uses_sdpa_and_env_override(monkeypatch):
    monkeypatch.delenv(kernels.ENV_ATTENTION, raising=False)
    if not torch.cuda.is_available():
        assert kernels.attention_implementation(None) == "sdpa"
    monkeypatch.setenv(kernels.ENV_ATTENTION, "eager")
    assert kernels.attention_implementation(None) == "eager"


def test_downcast_frozen_fp32_keeps_trainable_fp32():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    m[0].requires_grad_(False)
    n = kernels.downcast_frozen_fp32(m, torch.bfloat16)
    assert n == 20
    assert m[0].weight.dtype == torch.bfloat16 and m[1].weight.dtype == torch.float32


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
    n = kernels.fuse_lora_layers(model)
    assert n == 2 * 7  # q k v o gate up down in each of 2 layers
    assert kernels.fuse_lora_layers(model) == n  # idempotent
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * n  # lora_A and lora_B of each layer
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_lora_respects_disabled_adapter():
    model = _lora(_tiny_llama(), dropout=0.0)
    ids = torch.randint(3, 256, (1, 16))
    kernels.fuse_lora_layers(model)
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
    y = kernels.lora_linear(x, a, b, base, 0.5, p=0.3)
    g = torch.randn_like(y)
    dx, da, db = torch.autograd.grad(y, (x, a, b), g)
    torch.set_rng_state(state)
    _, keep = kernels.dropout_with_mask(x.detach(), 0.3)
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
    assert torch.autograd.gradcheck(lambda x, a, b: kernels.lora_linear(x, a, b, base, 2.0), (x, a, b))


# ---------------------------------------------------------------- varlen integration (CPU stand-in kernel)

def _per_sample_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    """What varlen_attn computes, one sample at a time with sdpa."""
    assert window_size == (-1, 0), "the trainer must ask for causal attention"
    assert torch.equal(cu_q, cu_k) and int((cu_q[1:] - cu_q[:-1]).max()) == max_q
    out = []
    for i in range(len(cu_q) - 1):
        s, e = int(cu_q[i]), int(cu_q[i + 1])
        qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(out)


@pytest.fixture
def cpu_varlen(monkeypatch):
    monkeypatch.setattr(kernels, "_varlen_kernel",
                        lambda: (_per_sample_kernel, frozenset(inspect.signature(_per_sample_kernel).parameters)))
    monkeypatch.setattr(kernels, "varlen_available", lambda: True)
    monkeypatch.delenv(kernels.ENV_ATTENTION, raising=False)
    return kernels.attention_implementation(None)


def test_varlen_packed_forward_equals_per_sample(cpu_varlen):
    assert cpu_varlen == kernels.VARLEN_ATTENTION
    model = _tiny_llama().eval()
    lens = [5, 30, 1, 70, 42]
    ids = torch.randint(3, 256, (1, sum(lens)))
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    with torch.no_grad():
        ref = torch.cat([model(input_ids=chunk, use_cache=False).logits for chunk in ids.split(lens, dim=1)], dim=1)
        model.set_attn_implementation(cpu_varlen)
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        unpacked_pos = model(input_ids=ids, use_cache=False).logits  # no position_ids: one long sample
    torch.testing.assert_close(packed, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unpacked_pos, ref, atol=1e-3)


def test_varlen_generation_with_padding_falls_back_to_sdpa(cpu_varlen):
    model = _tiny_llama().eval()
    prompt = torch.randint(3, 256, (2, 12))
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0  # left padding: needs a real mask
    out = {}
    for impl in ("sdpa", cpu_varlen):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out["sdpa"], out[cpu_varlen])


def test_varlen_mask_function():
    assert kernels.varlen_mask(2, 16, 16, attention_mask=None) is None
    assert kernels.varlen_mask(1, 4, 4, attention_mask=torch.ones(1, 4, dtype=torch.bool)) is None
    padded = torch.tensor([[False, True, True, True]])
    m = kernels.varlen_mask(1, 4, 4, attention_mask=padded)
    assert m is not None and m.shape == (1, 1, 4, 4) and not bool(m[0, 0, :, 0].any())


@pytest.mark.parametrize("env, strategy, expected_skip", [
    (None, "ddp", 5),
    ("0", "ddp", 0),  # KUBETUNE_SELECTIVE_CHECKPOINTING=0: every layer checkpointed
    (None, "deepspeed-zero3", 0),  # partitioned weights: the measured memory says nothing
])
def test_tune_sft_arguments_applies_the_plan(monkeypatch, env, strategy, expected_skip):
    from kubetune.trainer.config import parse_config

    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    if env is None:
        monkeypatch.delenv(kernels.ENV_SELECTIVE, raising=False)
    else:
        monkeypatch.setenv(kernels.ENV_SELECTIVE, env)
    plan = kernels.MicroBatchPlan(rows=6, tokens=6 * 2048, checkpointing=True, bytes_per_token=1, budget_bytes=2,
                                  fixed_bytes=1, uncheckpointed_layers=5)
    monkeypatch.setattr(kernels, "auto_micro_batch", lambda model, cfg, max_length: plan)
    cfg = parse_config({"baseModel": {"uri": "/m"}, "dataset": {"uri": "/d.jsonl", "maxLength": 2048},
                        "output": {"uri": "/o"}, "training": {"strategy": strategy}})
    out, skip = kernels.tune_sft_arguments({"per_device_train_batch_size": 8}, object(), cfg)
    assert out["per_device_train_batch_size"] == 6 and out["gradient_checkpointing"] is True
    assert out["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert skip == expected_skip
    fixed, skip = kernels.tune_sft_arguments({"per_device_train_batch_size": 3},
                                             object(), parse_config({**cfg.to_dict(), "training": {"batchSize": 3}}))
    assert fixed["per_device_train_batch_size"] == 3 and skip == 0  # an explicit batch size is the user's
