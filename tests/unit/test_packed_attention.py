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


def test_varlen_forward_skips_transformers_packed_scan_sdpa_keeps_it(cpu_varlen, monkeypatch):
    """The scan for packed rows ends in a host wait on a GPU; varlen never uses what it
    finds, sdpa does (its block-diagonal mask). Both see the same samples."""
    import transformers.masking_utils as masking_utils

    scans, scan = [], masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda p: scans.append(1) or scan(p))
    model = _tiny_llama().eval()
    lens = [7, 20, 13]
    ids = torch.randint(3, 256, (1, sum(lens)))
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert scans
        scans.clear()
        model.set_attn_implementation(cpu_varlen)
        varlen = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert scans == []
    torch.testing.assert_close(varlen, sdpa, rtol=1e-4, atol=1e-5)
    assert pa.without_packed_scan(masking_utils._preprocess_mask_arguments) is masking_utils._preprocess_mask_arguments
    # KUBETUNE_AVOID_HOST_WAITS=0: the scan is back, for varlen too
    pa.attention_implementation("varlen", skip_packed_scan=False)
    try:
        with torch.no_grad():
            model(input_ids=ids, position_ids=pos, use_cache=False)
        assert scans
    finally:
        pa.attention_implementation("varlen")


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


# ---------------------------------------------------------------- kept attention outputs (issue 16)

def _segments_attention(q, k, v, cu, scale):
    """Causal attention per packed sample with grouped-query heads, and the log-sum-exp:
    what ATen's flash kernels return, in plain PyTorch."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    outs, lses = [], []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        logits = torch.einsum("qhd,khd->hqk", q[s:e].float(), k[s:e].float()) * scale
        causal = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
        lses.append(torch.logsumexp(logits, dim=-1))
        outs.append(torch.einsum("hqk,khd->qhd", logits.softmax(-1), v[s:e].float()).to(q.dtype))
    return torch.cat(outs), torch.cat(lses, dim=1)


@pytest.fixture
def cpu_flash(monkeypatch):
    """ATen's flash forward/backward replaced by the reference above (the kernels are CUDA-only);
    counts the forward calls."""
    calls = []

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, scale=None):
        calls.append(1)
        out, lse = _segments_attention(q, k, v, cu_q, scale)
        return out, lse, torch.zeros(2, dtype=torch.int64), torch.zeros(1), torch.empty(0)

    def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout, causal, rng, unused, scale=None):
        with torch.enable_grad():
            qkv = [t.detach().requires_grad_() for t in (q, k, v)]
            ref, _ = _segments_attention(*qkv, cu_q, scale)
            return torch.autograd.grad(ref, qkv, dout)

    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", forward)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_backward", backward)
    return calls


def test_kept_attention_output_serves_the_recompute(cpu_flash):
    """Under non-reentrant checkpointing the recompute takes the first forward's output
    instead of running the kernel again; gradients equal those without keeping."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(24, h, 16, generator=g) for h in (4, 2, 2))
    w = torch.randn(24, 4, 16, generator=g)
    cu = torch.tensor([0, 5, 17, 24], dtype=torch.int32)

    def run(kept):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))

        def layer(q, k, v):
            return (pa.flash_varlen_gqa(q.tanh(), k, v, cu, 12, 0.25, kept) * w).sum()

        checkpoint(layer, q, k, v, use_reentrant=False).backward()
        return [t.grad for t in (q, k, v)]

    cpu_flash.clear()
    plain = run(None)
    assert len(cpu_flash) == 2  # the forward and its recompute
    cpu_flash.clear()
    slot = pa.KeptAttention()
    kept = run(slot)
    assert len(cpu_flash) == 1  # the recompute reused the kept output
    for a, b in zip(kept, plain):
        torch.testing.assert_close(a, b)
    assert slot.take(cu) is None  # the recompute emptied the slot: nothing held past the backward


def test_kept_attention_is_dropped_for_another_batch():
    slot = pa.KeptAttention()
    cu, other = torch.tensor([0, 4]), torch.tensor([0, 4])
    slot.keep(cu, "out")
    assert slot.take(other) is None  # equal values, another batch's tensor: not reused
    assert slot.take(cu) is None  # and the stale value is gone
    slot.keep(cu, "out")
    assert slot.take(cu) == "out"


def test_keep_attention_outputs_picks_checkpointed_layers_nearest_the_end():
    from kubetune.trainer import fast_paths

    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert fast_paths.keep_attention_outputs(model, 2, uncheckpointed=1) == 2
    slots = [getattr(layer.self_attn, pa.KEPT_ATTR) for layer in fast_paths.decoder_layers(model)]
    assert [s is not None for s in slots] == [False, False, False, True, True, False]
    assert fast_paths.keep_attention_outputs(model, 99) == 6  # never more than there are
    assert fast_paths.keep_attention_outputs(model, 0) == 0
    assert all(getattr(layer.self_attn, pa.KEPT_ATTR) is None for layer in fast_paths.decoder_layers(model))
    # on the host: one chain, each slot fetching the layer before it, sharing one copier
    assert fast_paths.keep_attention_outputs(model, 3, uncheckpointed=1, on_host=True) == 3
    slots = [getattr(layer.self_attn, pa.KEPT_ATTR) for layer in fast_paths.decoder_layers(model)]
    chain = slots[2:5]
    assert all(isinstance(s, pa.HostKeptAttention) for s in chain) and slots[:2] == [None, None] and slots[5] is None
    assert [s.previous for s in chain] == [None, chain[0], chain[1]]
    assert len({id(s.copies) for s in chain}) == 1


def test_output_projection_kept_beside_the_attention_is_not_recomputed(cpu_flash, monkeypatch):
    """The output projection's node (the fused LoRA one, with a bias) keeps its output in its
    layer's host slot in the first forward and takes it back in the recompute: its base
    product runs in the forward and the backward only, and every gradient equals the one
    without kept values."""
    from torch.utils.checkpoint import checkpoint

    from kubetune.trainer import lora_kernels

    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(24, 4, 16, generator=g)
    k0, v0 = torch.randn(24, 2, 16, generator=g), torch.randn(24, 2, 16, generator=g)
    a0, b0 = torch.randn(4, 64, generator=g) * 0.1, torch.randn(64, 4, generator=g) * 0.1
    cu = torch.tensor([0, 7, 20, 24], dtype=torch.int32)
    base = torch.nn.Linear(64, 64)
    base.requires_grad_(False)
    products = []
    dense = lora_kernels.dense_weight
    monkeypatch.setattr(lora_kernels, "dense_weight", lambda b, dtype: products.append(1) or dense(b, dtype))

    def run(slots):
        x, k, v, a, b = (t.clone().requires_grad_() for t in (x0, k0, v0, a0, b0))

        def layer(h, k, v, a, b, slot):
            o = pa.flash_varlen_gqa(h.tanh(), k, v, cu, 13, 0.25, slot)
            return h + lora_kernels.lora_linear(o.reshape(24, 64), a, b, base, 0.5, kept=slot).view(24, 4, 16)

        h = x
        for slot in slots:
            h = checkpoint(layer, h, k, v, a, b, slot, use_reentrant=False)
        (h * h).sum().backward()
        return [t.grad for t in (x, k, v, a, b)]

    products.clear()
    plain = run([None, None])
    assert len(products) == 6  # two forwards, two recomputes, two backwards
    copies = pa.HostCopies()
    first = pa.HostKeptAttention(copies)
    chain = [first, pa.HostKeptAttention(copies, first)]
    products.clear()
    cpu_flash.clear()
    kept = run(chain)
    assert len(products) == 4 and len(cpu_flash) == 2  # no product, no attention in the recompute
    for got, want in zip(kept, plain):
        torch.testing.assert_close(got, want)
    assert all(s.take_output() is None for s in chain)  # each taken once, nothing left


def test_host_slot_keeps_the_output_projections_output_only_beside_an_attention_output():
    copies = pa.HostCopies()
    slot = pa.HostKeptAttention(copies)
    cu, other = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
    slot.keep_output(torch.ones(3, 4))  # no attention output kept in this forward: nothing
    assert slot._value is None
    out, lse, y = torch.zeros(3, 2), torch.ones(2, 3), torch.full((3, 4), 5.0)
    slot.keep(cu, (out, lse, "rng"))
    slot.keep_output(y)
    slot.keep_output(torch.zeros(3, 4))  # one per forward: the first stays
    assert slot.take_output() is None  # before the recompute's attention: nothing to give
    back = slot.take(cu)
    assert torch.equal(back[0], out) and torch.equal(back[1], lse) and back[2] == "rng"
    assert torch.equal(slot.take_output(), y) and slot.take_output() is None
    slot.keep(cu, (out, lse, "rng"))
    slot.keep_output(y)
    assert slot.take(other) is None and slot.take_output() is None  # another batch: dropped with it
    plain = pa.KeptAttention()  # on the GPU: the attention's output only
    plain.keep(cu, (out, lse))
    plain.keep_output(y)
    assert plain.take(cu) == (out, lse) and plain.take_output() is None


def test_host_buffers_pinned_ahead_are_claimed_in_order_and_reused():
    """`HostCopies.reserve` makes the buffer sets on a thread; each layer's first keep claims
    the next set and copies into it; a set too small, or one that failed, is replaced by the
    layer's own; once all are claimed, later layers make their own."""
    copies = pa.HostCopies()
    copies.reserve(2, [(6, torch.float32), (4, torch.float32)], pin=False)
    first, second, third = (pa.HostKeptAttention(copies) for _ in range(3))
    cu = torch.tensor([0, 3], dtype=torch.int32)
    out, lse = torch.arange(6.0).view(3, 2), torch.ones(2, 2)
    first.keep(cu, (out, lse, "rng"))
    reserved = first._bufs[:2]
    assert [b.numel() for b in reserved] == [6, 4] and first._bufs[2] is None  # no output projection's here
    back, back_lse, _ = first.take(cu)
    assert torch.equal(back, out) and torch.equal(back_lse, lse)
    first.keep(cu, (out * 2, lse, "rng"))  # the next step: the same buffers again
    assert all(a is b for a, b in zip(first._bufs, reserved))
    assert torch.equal(first.take(cu)[0], out * 2)
    big = torch.zeros(4, 2)  # more tokens than reserved for: a buffer of its own, the reserved lse kept
    second.keep(cu, (big, lse, "rng"))
    assert second._bufs[0].numel() == 8 and second._bufs[1].numel() == 4
    third.keep(cu, (out, lse, "rng"))  # nothing left reserved: its own, the sizes it needs
    assert [b.numel() for b in third._bufs[:2]] == [6, 4] and copies.claim() is None
    # an allocation that fails leaves its set to the layer
    failing = pa.HostCopies()
    failing.reserve(1, [(-1, torch.float32)], pin=False)
    assert failing.claim() is None
    slot = pa.HostKeptAttention(failing)
    slot.keep(cu, (out, lse, "rng"))
    assert torch.equal(slot.take(cu)[0], out)


def test_host_copies_pinned_ahead_fit_the_models_outputs():
    from kubetune.trainer import fast_paths

    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)).to(torch.bfloat16)
    copies = fast_paths.host_copies_pinned_ahead(model, 2, 24)
    sets = [copies.claim() for _ in range(2)]
    assert copies.claim() is None
    for bufs in sets:  # 24 tokens x 4 heads x head_dim 16 in the activations' dtype; fp32 per head and
        # token; the output projection's output, 24 x hidden 32
        assert [(b.numel(), b.dtype) for b in bufs] == [(24 * 4 * 16, torch.bfloat16), (4 * 24, torch.float32),
                                                        (24 * 32, torch.bfloat16)]
    alone = fast_paths.host_copies_pinned_ahead(model, 1, 24, with_output=False)
    assert len(alone.claim()) == 2
    assert fast_paths.keep_attention_outputs(model, 2, uncheckpointed=1, on_host=True, copies=copies) == 2
    slots = [getattr(layer.self_attn, pa.KEPT_ATTR) for layer in fast_paths.decoder_layers(model)]
    assert slots[0].copies is copies and slots[1].copies is copies and slots[2] is None


def test_fused_output_projections_get_their_layers_slot_with_output_kept_on_the_host():
    from kubetune.trainer import fast_paths
    from tests.unit.test_lora_kernels import _lora

    model = _lora(_tiny_llama(), 0.0)
    assert fast_paths.fuse_lora_layers(model) > 0
    layers = fast_paths.decoder_layers(model)

    def slots(attr):
        return [getattr(layer.self_attn.o_proj if attr == pa.KEPT_OUTPUT_ATTR else layer.self_attn, attr, None)
                for layer in layers]

    fast_paths.keep_attention_outputs(model, 1, uncheckpointed=1, on_host=True, with_output=True)
    assert slots(pa.KEPT_OUTPUT_ATTR) == slots(pa.KEPT_ATTR) and slots(pa.KEPT_ATTR)[0] is not None
    assert slots(pa.KEPT_ATTR)[1] is None  # the uncheckpointed layer keeps nothing
    for on_host, with_output in ((True, False), (False, True)):  # the output goes to the host only, when asked
        fast_paths.keep_attention_outputs(model, 1, uncheckpointed=1, on_host=on_host, with_output=with_output)
        assert slots(pa.KEPT_OUTPUT_ATTR) == [None, None] and slots(pa.KEPT_ATTR)[0] is not None


def test_selective_checkpointing_gives_host_slots_once_their_buffers_are_pinned():
    """The callback applies the plan's choices: the uncheckpointed layers at the start, the host
    slots only after the first step, once the buffers pinned on a thread are all there; slots
    on the GPU at the start."""
    import types

    from kubetune.trainer import fast_paths
    from kubetune.trainer.callbacks import SelectiveCheckpointing
    from kubetune.trainer.memory_plan import LayerChoices
    from tests.unit.test_lora_kernels import _lora

    model = _lora(_tiny_llama(), 0.0)
    fast_paths.fuse_lora_layers(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = fast_paths.decoder_layers(model)
    args = types.SimpleNamespace(gradient_checkpointing=True)

    def slots():
        return [getattr(layer.self_attn, pa.KEPT_ATTR, None) for layer in layers]

    cb = SelectiveCheckpointing(LayerChoices(1, 1, True, True), tokens=24)
    cb.on_train_begin(args, None, None, model=model)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False] and slots() == [None, None]
    cb.on_step_end(args, None, None, model=model)  # after the first step: the pinning starts
    assert cb.copies is not None and cb.copies.pinned(timeout=30)
    cb.on_step_end(args, None, None, model=model)
    kept = slots()[0]
    assert isinstance(kept, pa.HostKeptAttention) and kept.copies is cb.copies and slots()[1] is None
    assert getattr(layers[0].self_attn.o_proj, pa.KEPT_OUTPUT_ATTR) is kept
    assert [b.numel() for b in cb.copies.claim()] == [24 * 64, 4 * 24, 24 * 64]  # pinned for this model's shape
    cb.on_step_end(args, None, None, model=model)  # given once
    assert slots()[0] is kept
    on_gpu = SelectiveCheckpointing(LayerChoices(1, 1, False, False), tokens=24)
    on_gpu.on_train_begin(args, None, None, model=model)
    assert type(slots()[0]) is pa.KeptAttention and on_gpu.copies is None


def test_host_kept_attention_serves_each_recompute_and_fetches_the_next(cpu_flash):
    """Three checkpointed layers keep their outputs on the host: each recompute takes its
    own (no second kernel call), taking one fetches the layer before it, gradients equal
    those without keeping, and the kept copies do not alias the outputs."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(24, 4, 16, generator=g)
    k0, v0 = torch.randn(24, 2, 16, generator=g), torch.randn(24, 2, 16, generator=g)
    cu = torch.tensor([0, 7, 20, 24], dtype=torch.int32)

    def run(slots):
        x, k, v = (t.clone().requires_grad_() for t in (x0, k0, v0))
        h = x
        for slot in slots:
            h = checkpoint(lambda h, k, v, slot=slot: pa.flash_varlen_gqa(h.tanh(), k, v, cu, 13, 0.25, slot) * 1.5,
                           h, k, v, use_reentrant=False)
        (h * h).sum().backward()
        return [t.grad for t in (x, k, v)]

    cpu_flash.clear()
    plain = run([None] * 3)
    assert len(cpu_flash) == 6  # three forwards and three recomputes
    copies, chain = pa.HostCopies(), []
    for _ in range(3):
        chain.append(pa.HostKeptAttention(copies, chain[-1] if chain else None))
    fetched = []
    for slot in chain:
        slot.prefetch = (lambda s: (lambda: (fetched.append(chain.index(s)), pa.HostKeptAttention.prefetch(s))))(slot)
    cpu_flash.clear()
    kept = run(chain)
    assert len(cpu_flash) == 3  # every recompute took its kept output
    assert fetched == [1, 0]  # the backward's order: the last layer's take fetches the middle one's, and so on
    for a, b in zip(kept, plain):
        torch.testing.assert_close(a, b)
    assert all(s.take(cu) is None for s in chain)  # nothing left held past the backward

    slot = pa.HostKeptAttention(copies)
    out, lse = torch.ones(3, 2), torch.zeros(2, 3)
    slot.keep(cu, (out, lse, "rng"))
    out.fill_(7.0)  # the output's memory reused after the copy: the kept value is the copy's
    back, back_lse, rng = slot.take(cu)
    assert torch.equal(back, torch.ones(3, 2)) and torch.equal(back_lse, lse) and rng == "rng"
