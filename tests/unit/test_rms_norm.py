"""The frozen-weight RMSNorm (trainer/rms_norm.py), its Triton kernels run by Triton's
interpreter on the CPU against Llama's RMSNorm in plain PyTorch (forward rounding, and
autograd's gradient in fp32); and which norm modules `use_frozen_backward` routes."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script in the child
from interpreted import main, run_check  # noqa: E402

CHECKS = ("forward", "backward", "rows", "routing", "skip_backward", "add_skip", "reader_aliases", "skip_layers",
          "skip_layers_aliases")


@pytest.mark.parametrize("check", CHECKS)
def test_frozen_rms_norm(check):
    run_check(__file__, check)


def _inputs(m=37, k=96, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, m, k, generator=g) * torch.logspace(-1, 1, m)[None, :, None]).bfloat16()  # rows apart
    w = (1 + torch.randn(k, generator=g) / 4).bfloat16()
    return x, w


def _llama_norm(x, w, eps):
    """transformers' LlamaRMSNorm.forward."""
    import torch

    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def check_forward():
    import torch

    from kubetune.trainer import rms_norm

    x, w = _inputs()
    y = rms_norm.frozen_rms_norm(x, w, 1e-5)
    ref = _llama_norm(x, w, 1e-5)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    # two roundings to bf16 (the interpreter truncates where the GPU rounds): within 2 ulps
    torch.testing.assert_close(y.float(), ref.float(), rtol=2**-6, atol=1e-6)
    _, rstd, _ = rms_norm.normalize(x.view(-1, 96), w, 1e-5)
    ref_rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-5).view(-1)
    torch.testing.assert_close(rstd, ref_rstd, rtol=1e-6, atol=0)


def check_backward():
    import torch

    from kubetune.trainer import rms_norm

    x, w = _inputs(seed=1)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    xr = x.float().requires_grad_()
    h = xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-5)
    (h * w.float()).backward(dy.float())  # the gradient through the fp32 arithmetic
    leaf = x.clone().requires_grad_()
    y = rms_norm.frozen_rms_norm(leaf, w, 1e-5)
    y.backward(dy.clone())  # the backward writes dx over the gradient it is given
    assert leaf.grad.dtype == torch.bfloat16 and leaf.grad.shape == x.shape
    torch.testing.assert_close(leaf.grad.float(), xr.grad, rtol=2**-6, atol=1e-3 * xr.grad.abs().max().item())


def check_rows():
    """The norm's own e4m3 rows of its output are `fp8.quantize_rows` of that output (the same
    scales; the codes up to the interpreter's own e4m3 cast, `same_codes`; padding rows to the
    grid of 16 included), offered to the FP8 projection reading it next and taken once."""
    import torch

    from kubetune.trainer import fp8, rms_norm
    from test_fp8_nf4 import same_codes

    x, w = _inputs(m=21)  # 42 rows: padded to 48
    y, rstd, (q, s) = rms_norm.normalize(x.view(-1, 96), w, 1e-5, rows=True)
    y0, rstd0, none = rms_norm.normalize(x.view(-1, 96), w, 1e-5)
    assert none is None and torch.equal(y, y0) and torch.equal(rstd, rstd0)
    rq, rs = fp8.quantize_rows(y)
    assert q.shape == rq.shape == (48, 96) and torch.equal(s, rs)
    same_codes(q.float(), rq.float(), either_way=True)
    assert bool((q[42:].float() == 0).all()) and bool((s[42:] == 1).all())
    out = rms_norm.frozen_rms_norm(x, w, 1e-5, offer_rows=True)
    taken = fp8.shared_rows.rows(out, out.view(-1, 96), fp8.CLOSE)
    assert torch.equal(taken[0].view(torch.uint8), q.view(torch.uint8))  # the norm's, not made again
    assert fp8.shared_rows._ref is None  # closed: nothing kept after its reader
    other = fp8.shared_rows.rows(out + 1, (out + 1).view(-1, 96), fp8.CLOSE)  # another input: its own rows
    assert not torch.equal(other[1], rs)


def check_routing():
    import torch

    from kubetune.trainer import fast_paths, rms_norm

    class Patched(torch.nn.Module):  # a norm as Liger patches it: attributes and its own forward
        def __init__(self, offset=0.0, mode="llama"):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(96).bfloat16(), requires_grad=False)
            self.variance_epsilon, self.offset, self.casting_mode = 1e-6, offset, mode
            self.forward = lambda h: "liger"

    model = torch.nn.Sequential(Patched(), Patched(offset=1.0, mode="gemma"), torch.nn.Linear(2, 2))
    assert fast_paths.frozen_norms(model) == 1 and fast_paths.frozen_norms(model) == 1  # idempotent
    llama, gemma = model[0], model[1]
    x, _ = _inputs()
    torch.testing.assert_close(llama(x), rms_norm.frozen_rms_norm(x, llama.weight, 1e-6), rtol=0, atol=0)
    assert gemma(x) == "liger"  # an offset weight is not this kernel's
    llama.weight.requires_grad_(True)
    assert llama(x) == "liger"  # a trainable weight goes back to Liger's node

    # The marks: a norm offers rows where the sibling projections reading its output run in FP8.
    class Attn(torch.nn.Module):
        def __init__(self, fp8_routed):
            super().__init__()
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(self, name, torch.nn.Linear(2, 2))
                getattr(self, name)._kubetune_fp8 = fp8_routed

    for routed in (True, False):
        block = torch.nn.Module()
        block.self_attn, block.input_layernorm, block.post_attention_layernorm = Attn(routed), Patched(), Patched()
        assert fast_paths.mark_fp8_siblings(block) == int(routed)
        assert getattr(block.input_layernorm, "_kubetune_offer_rows", False) is routed
        assert not hasattr(block.post_attention_layernorm, "_kubetune_offer_rows")  # no MLP siblings here


def check_skip_backward():
    """x's gradient through (x, norm(x)) as one node, the residual stream's gradient added in
    the norm's backward kernel, against the norm's node and autograd adding the two."""
    import torch

    from kubetune.trainer import rms_norm

    x, w = _inputs(seed=3)
    gen = torch.Generator().manual_seed(4)
    dy, dres = (torch.randn(x.shape, generator=gen).bfloat16() for _ in range(2))
    got, want = x.clone().requires_grad_(), x.clone().requires_grad_()
    passed, y = rms_norm.frozen_skip_rms_norm(got, w, 1e-5)
    assert torch.equal(passed, x) and passed.requires_grad
    torch.testing.assert_close(y, rms_norm.frozen_rms_norm(x, w, 1e-5), rtol=0, atol=0)
    torch.autograd.backward([passed, y], [dres.clone(), dy.clone()])
    torch.autograd.backward([want * 1, rms_norm.frozen_rms_norm(want, w, 1e-5)], [dres.clone(), dy.clone()])
    # the same two roundings (to bf16, then the sum to bf16); the interpreter's casts may
    # truncate where torch's add rounds: within one bf16 ulp of the sum
    torch.testing.assert_close(got.grad.float(), want.grad.float(), rtol=2**-7, atol=1e-6)
    # one reader only: the norm's gradient alone, or the stream's passed through
    only = x.clone().requires_grad_()
    rms_norm.frozen_skip_rms_norm(only, w, 1e-5)[1].backward(dy.clone())
    plain = x.clone().requires_grad_()
    rms_norm.frozen_rms_norm(plain, w, 1e-5).backward(dy.clone())
    assert torch.equal(only.grad, plain.grad)
    stream = x.clone().requires_grad_()
    rms_norm.frozen_skip_rms_norm(stream, w, 1e-5)[0].backward(dres)
    assert torch.equal(stream.grad, dres)


def check_add_skip():
    """(a + b, norm(a + b)) from one kernel: the sum as autograd's add makes it, the norm of
    that sum as the norm's own node makes it (its e4m3 rows too), and both summands' gradients
    as (a + b) through `frozen_skip_rms_norm` gives them; summands autograd's add would promote
    take that add."""
    import torch

    from kubetune.trainer import fp8, rms_norm

    a, w = _inputs(m=21, seed=5)
    b = _inputs(m=21, seed=6)[0]
    gen = torch.Generator().manual_seed(7)
    dy, dres = (torch.randn(a.shape, generator=gen).bfloat16() for _ in range(2))
    ga, gb = a.clone().requires_grad_(), b.clone().requires_grad_()
    total, y = rms_norm.frozen_add_skip_rms_norm(ga, gb, w, 1e-5, offer_rows=True)
    q, s = fp8.shared_rows.rows(y, y.view(-1, 96), fp8.CLOSE)  # the rows the kernel offered
    # the interpreter's cast may truncate where torch's add rounds: within one bf16 ulp
    torch.testing.assert_close(total.float(), (a + b).float(), rtol=2**-7, atol=0)
    torch.testing.assert_close(y, rms_norm.frozen_rms_norm(total.detach(), w, 1e-5), rtol=0, atol=0)
    rq, rs = fp8.quantize_rows(y.view(-1, 96))
    assert q.shape == (48, 96) and torch.equal(s, rs)
    torch.autograd.backward([total, y], [dres.clone(), dy.clone()])
    # the backward from that sum: `frozen_skip_rms_norm`'s, exactly
    want = total.detach().clone().requires_grad_()
    torch.autograd.backward(list(rms_norm.frozen_skip_rms_norm(want, w, 1e-5)), [dres.clone(), dy.clone()])
    assert torch.equal(ga.grad, want.grad) and torch.equal(gb.grad, want.grad)  # to each summand
    # the stream alone, or the norm alone
    sa, sb = a.clone().requires_grad_(), b.clone().requires_grad_()
    rms_norm.frozen_add_skip_rms_norm(sa, sb, w, 1e-5)[0].backward(dres)
    assert torch.equal(sa.grad, dres) and torch.equal(sb.grad, dres)
    na = a.clone().requires_grad_()
    rms_norm.frozen_add_skip_rms_norm(na, b, w, 1e-5)[1].backward(dy.clone())
    plain = total.detach().clone().requires_grad_()
    rms_norm.frozen_rms_norm(plain, w, 1e-5).backward(dy.clone())
    assert torch.equal(na.grad, plain.grad)
    # bf16 + fp32: autograd's add (promoting to fp32) and the skip node
    mixed = rms_norm.frozen_add_skip_rms_norm(a, b.float(), w, 1e-5)[0]
    assert mixed.dtype == torch.float32 and torch.equal(mixed, a + b.float())
    assert "FrozenSkipRMSNormFnBackward" in _graph_nodes(
        rms_norm.frozen_add_skip_rms_norm(a.float().requires_grad_(), b, w.float(), 1e-5)[1].grad_fn)


def check_reader_aliases():
    """The skip nodes with 2 or 3 readers: the norm's output and aliases of it, whose
    gradients the norm's kernel sums (rounded once) where autograd would add them; a reader
    that sends no gradient is left out; `Readers` hands each module its alias only for the
    offered output."""
    import torch

    from kubetune.trainer import rms_norm

    x, w = _inputs(seed=8)
    gen = torch.Generator().manual_seed(9)
    dys = [torch.randn(x.shape, generator=gen).bfloat16() for _ in range(4)]
    for readers, node in ((3, rms_norm.frozen_skip_rms_norm), (2, lambda a, *r, **k: rms_norm.frozen_add_skip_rms_norm(
            a, torch.zeros_like(a), *r, **k))):
        got, want = x.clone().requires_grad_(), x.clone().requires_grad_()
        passed, *ys = node(got, w, 1e-5, readers=readers)
        assert len(ys) == readers and all(torch.equal(y, ys[0]) for y in ys)
        ref_passed, ref_y = node(want, w, 1e-5)
        torch.autograd.backward([passed, *ys], [dys[0].clone(), *(d.clone() for d in dys[1:readers + 1])])
        torch.autograd.backward([ref_passed, *(ref_y for _ in ys)],
                                [dys[0].clone(), *(d.clone() for d in dys[1:readers + 1])])
        # one rounding of the readers' sum where autograd makes one per add: the sum within a
        # bf16 ulp, which moves each input gradient by up to an ulp of the largest
        scale = 2**-7 * float(want.grad.abs().max())
        torch.testing.assert_close(got.grad.float(), want.grad.float(), rtol=2**-7, atol=scale)
        # the first reader silent: the others' gradients alone
        some = x.clone().requires_grad_()
        passed, *ys = node(some, w, 1e-5, readers=readers)
        torch.autograd.backward([passed, *ys[1:]], [dys[0].clone(), *(d.clone() for d in dys[2:readers + 1])])
        alone = x.clone().requires_grad_()
        ref_passed, ref_y = node(alone, w, 1e-5)
        torch.autograd.backward([ref_passed, *(ref_y for _ in ys[1:])],
                                [dys[0].clone(), *(d.clone() for d in dys[2:readers + 1])])
        torch.testing.assert_close(some.grad.float(), alone.grad.float(), rtol=2**-7,
                                   atol=2**-7 * float(alone.grad.abs().max()))
    with pytest.raises(ValueError, match="readers"):
        rms_norm.frozen_skip_rms_norm(x, w, 1e-5, readers=4)
    # Readers: the alias for the offered output only, once
    out, other = x.clone(), x.clone()
    k_proj, v_proj = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    alias = out.detach()
    rms_norm.readers.offer(out, {k_proj: alias})
    assert rms_norm.readers.take(v_proj, out) is out and rms_norm.readers.take(k_proj, other) is other
    assert rms_norm.readers.take(k_proj, out) is alias and rms_norm.readers.take(k_proj, out) is out
    rms_norm.readers.clear()


def check_skip_layers_aliases():
    """A tiny Llama with LoRA on every projection, the fused LoRA node on each: with the
    skip-norm forward, k_proj and v_proj read aliases of the first norm's output and up_proj
    one of the second's (the norms' nodes then have 3 and 2 readers), and logits and
    gradients are the layers' own forward's."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from kubetune.trainer import fast_paths, rms_norm

    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64)

    def make():  # twice from one seed (a deep copy would keep the first model's wrapped forwards)
        torch.manual_seed(0)
        base = transformers.AutoModelForCausalLM.from_config(cfg)
        for m in base.modules():  # the norms as Liger patches them
            if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon"):
                m.casting_mode, m.offset = "llama", 0.0
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        assert fast_paths.fuse_lora_layers(model) == 2 * 7
        assert fast_paths.frozen_norms(model) == 2 * 2 + 1
        return model

    own, skip = make(), make()
    layers = fast_paths.decoder_layers(skip)
    assert all(rms_norm.use_skip_norms(layer) for layer in layers)
    ids = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for model in (own, skip):
        emb = model.get_base_model().model.embed_tokens(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb).logits
        if model is skip:
            used = _outputs_read(logits.grad_fn)
            assert used["FrozenSkipRMSNormFnBackward"] == {0, 1, 2, 3}, used  # stream, q, k, v
            assert used["FrozenAddSkipRMSNormFnBackward"] == {0, 1, 2}, used  # stream, gate, up
        (logits.float() ** 2).mean().backward()
        outs.append(logits)
        lora = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        assert len(lora) == 2 * 7 * 2 and all(g is not None for g in lora)
        grads.append((*lora, emb.grad))
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * a.abs().max().item())
    assert rms_norm.readers._out is None  # nothing kept after the layer


def _outputs_read(fn) -> dict:
    """For each node type, which of its outputs some node of the graph reads."""
    out, seen, todo = {}, set(), [fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        for g, nr in f.next_functions:
            if g is not None:
                out.setdefault(type(g).__name__, set()).add(nr)
                todo.append(g)
    return out


def _graph_nodes(fn) -> set:
    seen, todo = set(), [fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        todo.extend(g for g, _ in f.next_functions)
    return {type(f).__name__ for f in seen}


def check_skip_layers():
    """Each family in SKIP_NORM_LAYERS, a tiny random model: its decoder layers with the
    skip-norm forward give the logits of the layers' own forward (with the same routed norms)
    exactly, and the same gradients of a trained projection and of the embeddings' output;
    a norm made trainable sends the layer back to its own forward."""
    import copy

    import torch
    import transformers

    from kubetune.trainer import fast_paths, rms_norm

    for name in ("LlamaConfig", "MistralConfig", "Qwen2Config", "Qwen3Config"):
        cfg = getattr(transformers, name)(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          max_position_embeddings=64)
        torch.manual_seed(0)
        # fp32: the kernel's two roundings are then exact, and any difference is the path's
        own = transformers.AutoModelForCausalLM.from_config(cfg).requires_grad_(False)
        for m in own.modules():  # the norms as Liger patches them (its attributes), weights frozen
            if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon"):
                m.casting_mode, m.offset = "llama", 0.0
        skip = copy.deepcopy(own)
        for model in (own, skip):
            # two a layer and the final one (Qwen3's q/k norms too: they are Liger-patched alike)
            assert fast_paths.frozen_norms(model) == 2 * 2 + 1 + (2 * 2 if name == "Qwen3Config" else 0)
            model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
        layers = fast_paths.decoder_layers(skip)
        assert sum(rms_norm.use_skip_norms(layer) for layer in layers) == 2
        assert all(rms_norm.use_skip_norms(layer) for layer in layers)  # idempotent
        ids = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(1))
        outs, grads = [], []
        for model in (own, skip):
            emb = model.model.embed_tokens(ids).requires_grad_(True)
            logits = model(inputs_embeds=emb).logits
            nodes = _graph_nodes(logits.grad_fn)
            assert ("FrozenSkipRMSNormFnBackward" in nodes) is (model is skip), name
            assert ("FrozenAddSkipRMSNormFnBackward" in nodes) is (model is skip), name  # the second norm
            assert "FrozenRMSNormFnBackward" in nodes  # the final norm, and Qwen3's q/k norms
            (logits.float() ** 2).mean().backward()
            outs.append(logits)
            grads.append((model.model.layers[0].self_attn.q_proj.weight.grad, emb.grad))
        assert torch.equal(outs[0], outs[1]), name
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * a.abs().max().item())
        # a trainable norm: the layer's own forward again (Liger's node would run; here its stand-in)
        layers[0].post_attention_layernorm.weight.requires_grad_(True)
        assert not rms_norm.routed(layers[0].post_attention_layernorm)
    gemma = torch.nn.Module()
    assert not rms_norm.use_skip_norms(gemma)  # not a pre-norm layer this forward reproduces


if __name__ == "__main__":
    main(globals())
