"""GPU check of the trainer's varlen attention (trainer/packed_attention.py).

1. Kernel level: packed rows of random q/k/v (grouped-query heads as in
   Llama-3-8B) through `varlen_attention_forward` against a per-sample
   causal sdpa reference in fp32: outputs and q/k/v gradients within bf16
   tolerance, every output element written (the output is poisoned first).
2. Model level: a small random Llama loaded with the varlen implementation
   and with "sdpa" (which builds a block-diagonal mask from position_ids):
   same loss and logits on the same packed batch.
3. Timing: forward+backward of the attention alone on a 16k-token packed
   micro-batch, varlen vs sdpa with the dense block-diagonal mask.

Run on the GPU machine: python3 bench/check_attention.py [--json out.json]
Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch
import torch.nn.functional as F

from kubetune.contract.recipe import MethodSpec, PerformanceSpec
from kubetune.trainer import packed_attention, performance


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def packed_inputs(lengths_per_row, heads, kv_heads, dim, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = len(lengths_per_row)
    seq = sum(lengths_per_row[0])
    assert all(sum(r) == seq for r in lengths_per_row), "rows must have equal length"
    q = torch.randn(rows, heads, seq, dim, generator=g).to(device, dtype)
    k = torch.randn(rows, kv_heads, seq, dim, generator=g).to(device, dtype)
    v = torch.randn(rows, kv_heads, seq, dim, generator=g).to(device, dtype)
    pos = torch.cat([torch.cat([torch.arange(n) for n in r]).unsqueeze(0) for r in lengths_per_row]).to(device)
    return q, k, v, pos


def reference(q, k, v, lengths_per_row, scale):
    """Per-sample causal attention in fp32, (rows, seq, heads, dim)."""
    outs = []
    for r, lens in enumerate(lengths_per_row):
        start, pieces = 0, []
        for n in lens:
            qs = q[r : r + 1, :, start : start + n].float()
            ks = k[r : r + 1, :, start : start + n].float()
            vs = v[r : r + 1, :, start : start + n].float()
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
            pieces.append(o)
            start += n
        outs.append(torch.cat(pieces, dim=2))
    return torch.cat(outs).transpose(1, 2)


def check_kernel(results: dict) -> bool:
    ok = True
    heads, kv_heads, dim = 32, 8, 128
    scale = dim**-0.5
    cases = {
        "one_row": [[1, 7, 250, 1000, 790]],
        "two_rows": [[300, 212, 1, 511], [1024]],
        "single_sample": [[2048]],
    }
    for name, lens in cases.items():
        seed = random.randrange(1 << 30)
        q, k, v, pos = packed_inputs(lens, heads, kv_heads, dim, torch.bfloat16, "cuda", seed)
        for t in (q, k, v):
            t.requires_grad_(True)
        out, _ = packed_attention.varlen_attention_forward(None, q, k, v, None, scaling=scale, position_ids=pos)
        ref = reference(q, k, v, lens, scale)
        grad = torch.randn_like(ref)
        (gq, gk, gv) = torch.autograd.grad(out.float(), (q, k, v), grad)
        (rq, rk, rv) = torch.autograd.grad(ref, (q, k, v), grad)
        errs = {
            "out": rel_err(out, ref),
            "dq": rel_err(gq, rq),
            "dk": rel_err(gk, rk),
            "dv": rel_err(gv, rv),
        }
        finite = all(torch.isfinite(t).all().item() for t in (out, gq, gk, gv))
        good = finite and all(e < 2e-2 for e in errs.values())
        results[f"kernel_{name}"] = {"seed": seed, "lengths": lens, "rel_err": errs, "ok": good}
        print(f"kernel {name:14s} {'OK ' if good else 'BAD'} " + " ".join(f"{k}={e:.2e}" for k, e in errs.items()), flush=True)
        ok &= good
    # Cross-sample leak check: changing sample 2's keys must not change sample 1's outputs.
    lens = [[400, 600, 1048]]
    q, k, v, pos = packed_inputs(lens, heads, kv_heads, dim, torch.bfloat16, "cuda", 7)
    a, _ = packed_attention.varlen_attention_forward(None, q, k, v, None, scaling=scale, position_ids=pos)
    k2 = k.clone()
    k2[:, :, 400:1000] = torch.randn_like(k2[:, :, 400:1000])
    b, _ = packed_attention.varlen_attention_forward(None, q, k2, v, None, scaling=scale, position_ids=pos)
    leak_ok = torch.equal(a[:, :400], b[:, :400]) and torch.equal(a[:, 1000:], b[:, 1000:]) and not torch.equal(a[:, 400:1000], b[:, 400:1000])
    results["kernel_no_cross_sample"] = leak_ok
    print(f"kernel no-cross-sample     {'OK' if leak_ok else 'BAD'}", flush=True)
    return ok and leak_ok


def check_model(results: dict) -> bool:
    """Packed forward through the model with the varlen implementation equals
    running each sample on its own; greedy generation (KV cache, left padding:
    the sdpa fallback) gives the same tokens as plain sdpa."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(random.randrange(1 << 30))
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    # What the trainer decides for this model with training.performance.attention: auto.
    perf = performance.resolve(PerformanceSpec(), method=MethodSpec(type="lora"), strategy="ddp", cuda=True,
                               varlen_capable=packed_attention.varlen_available(), model_config=cfg, max_length=4096)
    name = packed_attention.attention_implementation(perf.attention)
    results["attention_implementation"] = name
    lens = [5, 300, 1, 700, 1042]
    ids = torch.randint(0, cfg.vocab_size, (1, sum(lens)), device="cuda")
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0).cuda()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        pieces, start = [], 0
        for n in lens:
            pieces.append(model(input_ids=ids[:, start:start + n], use_cache=False).logits.float())
            start += n
        ref = torch.cat(pieces, dim=1)
        model.set_attn_implementation(name)
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
    err = rel_err(packed, ref)
    prompt = torch.randint(3, cfg.vocab_size, (2, 16), device="cuda")
    am = torch.ones_like(prompt)
    am[1, :5] = 0
    gen = {}
    for impl in ("sdpa", name):
        model.set_attn_implementation(impl)
        gen[impl] = model.generate(input_ids=prompt, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    same_gen = torch.equal(gen["sdpa"], gen[name])
    good = name == packed_attention.VARLEN_ATTENTION and err < 2e-2 and same_gen
    results["model_level"] = {"impl": name, "packed_vs_per_sample_rel_err": err, "generate_equal": same_gen, "ok": good}
    print(f"model  packed {name} vs per-sample {'OK' if err < 2e-2 else 'BAD'} rel err {err:.2e}; generate equal {same_gen}", flush=True)
    return good


def lognormal_lengths(total, rng, median=250, cap=2000):
    out = []
    while sum(out) < total:
        out.append(int(min(cap, max(24, rng.lognormvariate(5.5, 0.6)))))
    out[-1] -= sum(out) - total
    if out[-1] <= 0:
        out.pop()
        out[-1] += total - sum(out)
    return out


def report(results: dict, path) -> None:
    """Print a check's results as JSON, and write them to `path` (--json) when given."""
    print(json.dumps(results, indent=1), flush=True)
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


def time_fn(fn, reps=10, calls=1):
    """ms per call of fn on the GPU: CUDA events around `calls` calls in a row (more than
    one hides each call's launch cost behind the previous one, as in a step), the median
    of `reps` such measurements."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(calls):
            fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / calls)
    ts.sort()
    return ts[len(ts) // 2]


def bench_attention(results: dict) -> None:
    heads, kv_heads, dim, rows, seq = 32, 8, 128, 8, 2048
    rng = random.Random(0)
    lens = [lognormal_lengths(seq, rng) for _ in range(rows)]
    q, k, v, pos = packed_inputs(lens, heads, kv_heads, dim, torch.bfloat16, "cuda", 1)
    # padding-free layout: the whole micro-batch as one row
    q1 = q.permute(1, 0, 2, 3).reshape(heads, rows * seq, dim).unsqueeze(0).contiguous().requires_grad_(True)
    k1 = k.permute(1, 0, 2, 3).reshape(kv_heads, rows * seq, dim).unsqueeze(0).contiguous().requires_grad_(True)
    v1 = v.permute(1, 0, 2, 3).reshape(kv_heads, rows * seq, dim).unsqueeze(0).contiguous().requires_grad_(True)
    flat = [n for r in lens for n in r]
    pos1 = torch.cat([torch.arange(n) for n in flat]).unsqueeze(0).cuda()
    g = torch.randn(1, rows * seq, heads, dim, device="cuda", dtype=torch.bfloat16)

    def varlen():
        o, _ = packed_attention.varlen_attention_forward(None, q1, k1, v1, None, scaling=dim**-0.5, position_ids=pos1)
        o.backward(g)

    seg = torch.repeat_interleave(torch.arange(len(flat), device="cuda"), torch.tensor(flat, device="cuda"))
    idx = torch.arange(rows * seq, device="cuda")
    mask = (seg[:, None] == seg[None, :]) & (idx[:, None] >= idx[None, :])

    def dense():
        o = F.scaled_dot_product_attention(q1, k1, v1, attn_mask=mask, enable_gqa=True)
        o.backward(g.transpose(1, 2))

    t_var = time_fn(varlen)
    try:
        t_dense = time_fn(dense, reps=3)
    except torch.OutOfMemoryError:
        t_dense = None
    flops = sum(4 * n * n / 2 * dim * heads for n in flat) * 3.5  # causal fwd (2 matmuls) + bwd (~2.5x)
    results["attention_timing_ms"] = {"tokens": rows * seq, "samples": len(flat), "varlen_fwd_bwd": t_var,
                                     "sdpa_dense_blockdiag_fwd_bwd": t_dense,
                                     "varlen_tflops": flops / (t_var * 1e-3) / 1e12}
    print(f"attention fwd+bwd {rows * seq} tokens, {len(flat)} samples: varlen {t_var:.2f} ms, dense-mask sdpa {t_dense} ms", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    import inspect
    from torch.nn.attention.varlen import varlen_attn

    results["varlen_signature"] = str(inspect.signature(varlen_attn))
    print("varlen_attn", results["varlen_signature"], flush=True)
    ok = check_kernel(results)
    ok &= check_model(results)
    bench_attention(results)
    results["ok"] = ok
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("ATTENTION CHECK", "PASSED" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
