"""CPU tests of the packed attention (trainer/packed_attention.py).

The CUDA kernel itself is checked on the GPU machine by bench/check_attention.py;
here: the sample boundaries, the kernel's options, the transformers integration
with a per-sample reference kernel standing in for the CUDA one, and which model
families the fast path may serve (the others fall back to the library's own
attention, with equal logits).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from kubetune.trainer import packed_attention as pa
from tests.unit.test_lora_kernels import _tiny_llama


# ---------------------------------------------------------------- boundaries

def test_cu_seqlens_one_packed_row():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, max_len = pa.cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 3, 5, 9]
    assert cu.dtype == torch.int32
    assert max_len == 4


def test_cu_seqlens_rows_are_separate_samples():
    # the second row continues 3, 4 but a row start is always a boundary
    pos = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 1]])
    cu, max_len = pa.cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 4, 6, 8]
    assert max_len == 4


def test_cu_seqlens_1d_and_single_tokens():
    cu, max_len = pa.cu_seqlens_from_position_ids(torch.tensor([0, 0, 0, 1]))
    assert cu.tolist() == [0, 1, 2, 4]
    assert max_len == 2


def test_cu_seqlens_non_zero_start_is_one_sample():
    # a sample need not start at 0 (e.g. a continuation); only a break of +1 splits
    cu, _ = pa.cu_seqlens_from_position_ids(torch.tensor([[5, 6, 7, 2, 3]]))
    assert cu.tolist() == [0, 3, 5]


@pytest.mark.parametrize("bad", [torch.zeros(2, 2, 2, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long)])
def test_cu_seqlens_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match="position_ids"):
        pa.cu_seqlens_from_position_ids(bad)


def test_boundary_cache_recomputes_after_in_place_change():
    cache = pa._BoundaryCache()
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
    kw, repeat = pa._kernel_options(params, 32, 8, 128**-0.5, 128)
    assert kw == {"window_size": (-1, 0), "enable_gqa": True}
    assert repeat is False


def test_kernel_options_old_signature_repeats_kv_heads():
    params = frozenset({"is_causal", "return_aux"})
    kw, repeat = pa._kernel_options(params, 32, 8, None, 128)
    assert kw == {"is_causal": True}
    assert repeat is True


def test_kernel_options_custom_scale_needs_scale_argument():
    with pytest.raises(RuntimeError, match="scaling=0.5"):
        pa._kernel_options(frozenset({"is_causal"}), 8, 8, 0.5, 64)
    kw, _ = pa._kernel_options(frozenset({"window_size", "scale"}), 8, 8, 0.5, 64)
    assert kw["scale"] == 0.5


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
    monkeypatch.setattr(pa, "_varlen_kernel",
                        lambda: (_per_sample_kernel, frozenset(inspect.signature(_per_sample_kernel).parameters)))
    # The per-sample stand-in, registered with transformers exactly as the CUDA kernel is.
    return pa.attention_implementation("varlen")


def test_varlen_packed_forward_equals_per_sample(cpu_varlen):
    assert cpu_varlen == pa.VARLEN_ATTENTION
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
    assert pa.varlen_mask(2, 16, 16, attention_mask=None) is None
    assert pa.varlen_mask(1, 4, 4, attention_mask=torch.ones(1, 4, dtype=torch.bool)) is None
    padded = torch.tensor([[False, True, True, True]])
    m = pa.varlen_mask(1, 4, 4, attention_mask=padded)
    assert m is not None and m.shape == (1, 1, 4, 4) and not bool(m[0, 0, :, 0].any())


# ---------------------------------------------------------------- families the kernel cannot reproduce (issue 15)

def _tiny_gemma(kind):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    small = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                 max_position_embeddings=256)
    torch.manual_seed(0)
    if kind == "gemma2":  # soft-capped logits, a window on every other layer
        return Gemma2ForCausalLM(Gemma2Config(**small)).eval()
    return Gemma3ForCausalLM(Gemma3TextConfig(**small)).eval()  # windows, no soft-cap


@pytest.mark.parametrize("kind, fallback", [("gemma2", "eager"), ("gemma3", "sdpa")])
def test_families_varlen_cannot_reproduce_fall_back_with_equal_logits(cpu_varlen, monkeypatch, kind, fallback):
    from kubetune.contract.recipe import MethodSpec, PerformanceSpec
    from kubetune.trainer.performance import resolve

    model = _tiny_gemma(kind)
    max_length = 32
    assert pa.varlen_unfit(model.config, max_length) is not None
    # What the trainer decides on a GPU where the kernel runs, with attention: auto.
    perf = resolve(PerformanceSpec(), method=MethodSpec(type="lora"), strategy="ddp", cuda=True, varlen_capable=True,
                   model_config=model.config, max_length=max_length, env={})
    assert perf.attention == fallback
    lens = [5, 30, 1, 20]  # samples longer than the 8-token window, packed in one row
    ids = torch.randint(3, 256, (1, sum(lens)))
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    with torch.no_grad():
        model.set_attn_implementation("eager")  # the library's reference: each sample on its own
        ref = torch.cat([model(input_ids=chunk, use_cache=False).logits for chunk in ids.split(lens, dim=1)], dim=1)
        model.set_attn_implementation(pa.attention_implementation(perf.attention))
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(packed, ref, rtol=1e-4, atol=1e-5)

    # What the fallback avoids: the kernel would drop the window (and Gemma 2's soft-cap).
    # Reached anyway (a forced KUBETUNE_ATTENTION, a family not yet known), it refuses ...
    model.set_attn_implementation(cpu_varlen)
    with torch.no_grad(), pytest.raises(RuntimeError, match="kubetune varlen attention"):
        model(input_ids=ids, position_ids=pos, use_cache=False)
    # ... because without that guard the logits would be wrong.
    monkeypatch.setattr(pa, "_refuse_what_varlen_cannot_do", lambda kwargs, max_len: None)
    with torch.no_grad():
        dropped = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert not torch.allclose(dropped, ref, atol=1e-3)


def test_a_window_no_sample_reaches_past_keeps_varlen(cpu_varlen):
    # Samples no longer than the window: the window masks nothing and varlen gives the same logits.
    model = _tiny_gemma("gemma3")
    assert pa.varlen_unfit(model.config, 8) is None
    lens = [5, 8, 1, 7]
    ids = torch.randint(3, 256, (1, sum(lens)))
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = torch.cat([model(input_ids=chunk, use_cache=False).logits for chunk in ids.split(lens, dim=1)], dim=1)
        model.set_attn_implementation(cpu_varlen)
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(packed, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, max_len, message", [
    ({"softcap": 50.0}, 4, "soft-cap"),
    ({"s_aux": torch.zeros(2)}, 4, "sinks"),
    ({"sliding_window": 8}, 9, "sliding window"),
])
def test_the_kernel_refuses_what_it_cannot_compute(kwargs, max_len, message):
    with pytest.raises(RuntimeError, match=message):
        pa._refuse_what_varlen_cannot_do(kwargs, max_len)


def test_what_the_kernel_computes_passes_the_guard():
    pa._refuse_what_varlen_cannot_do({"sliding_window": 8, "softcap": None, "s_aux": None}, 8)
    pa._refuse_what_varlen_cannot_do({}, 4096)


def test_library_attention_of_a_family():
    assert pa.library_attention(None) == "sdpa"
    assert pa.library_attention(_tiny_gemma("gemma2").config) == "eager"  # transformers refuses sdpa for Gemma 2
    assert pa.library_attention(_tiny_gemma("gemma3").config) == "sdpa"
