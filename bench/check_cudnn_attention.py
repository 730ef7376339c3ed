"""GPU check of the trainer's two varlen attention kernels (trainer/packed_attention.py):
PyTorch's flash kernel against cuDNN's fused attention over ragged rows
(KUBETUNE_ATTENTION_KERNEL=cudnn), both through `flash_varlen_gqa` as the trainer calls
them (Llama-3-8B heads: 32 query, 8 key/value, dim 128, bf16).

For each packing it reports the forward and backward times of each kernel (median of CUDA
event timings), the first cuDNN call of a new (samples, length) bucket (its plan build),
and the relative error of each kernel's output and q/k/v gradients against a per-sample
fp32 reference (checked where the reference fits; else cuDNN against flash). It fails when
cuDNN's error exceeds twice flash's plus 1e-3.

Run on the GPU machine: python3 bench/check_cudnn_attention.py [--json out.json]
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from check_attention import lognormal_lengths, rel_err, report, time_fn  # noqa: E402

from kubetune.trainer import packed_attention as pa  # noqa: E402

HEADS, KV, DIM = 32, 8, 128


def packings() -> dict[str, list[int]]:
    rng = random.Random(0)
    instruct = [n for _ in range(8) for n in lognormal_lengths(2048, rng)]
    return {
        "instruct-8x2048": instruct,
        "long-docs-16k": [6144, 4096, 3072, 2048, 1024],
        "one-doc-16k": [16384],
        "one-doc-32k": [32768],
    }


def reference(q, k, v, lengths, scale):
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start:start + n].transpose(0, 1).unsqueeze(0).float() for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


def check(name: str, lengths: list[int], results: dict) -> bool:
    tokens = sum(lengths)
    g = torch.Generator(device="cpu").manual_seed(len(lengths))
    q, k, v = (torch.randn(tokens, h, DIM, generator=g).cuda().bfloat16() for h in (HEADS, KV, KV))
    dout = torch.randn(tokens, HEADS, DIM, generator=g).cuda().bfloat16()
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    scale = DIM**-0.5
    row: dict = {"tokens": tokens, "samples": len(lengths), "max_len": max(lengths),
                 "cudnn_bucket": pa.cudnn_bucket(len(lengths), max(lengths), tokens)}

    def grads(backend, qq=q, kk=k, vv=v):
        qkv = [t.detach().clone().requires_grad_() for t in (qq, kk, vv)]
        out = pa.flash_varlen_gqa(*qkv, cu, max(lengths), scale, None, backend)
        return [out] + list(torch.autograd.grad(out, qkv, dout))

    vals = {}
    for backend in ("flash", "cudnn"):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        vals[backend] = grads(backend)
        torch.cuda.synchronize()
        row[f"{backend}_first_call_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
        qkv = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with torch.no_grad():
            row[f"{backend}_fwd_ms"] = round(time_fn(lambda: pa.flash_varlen_gqa(*qkv, cu, max(lengths), scale, None, backend), calls=4), 3)
        out = pa.flash_varlen_gqa(*qkv, cu, max(lengths), scale, None, backend)
        row[f"{backend}_bwd_ms"] = round(time_fn(lambda: torch.autograd.grad(out, qkv, dout, retain_graph=True), calls=4), 3)
    causal_flops = sum(2 * 2 * n * n / 2 * DIM * HEADS for n in lengths)
    for backend in ("flash", "cudnn"):
        row[f"{backend}_fwd_tflops"] = round(causal_flops / (row[f"{backend}_fwd_ms"] * 1e-3) / 1e12, 1)
        row[f"{backend}_bwd_tflops"] = round(2.5 * causal_flops / (row[f"{backend}_bwd_ms"] * 1e-3) / 1e12, 1)
    names = ("out", "dq", "dk", "dv")
    ok = True
    if tokens <= 16384 and max(lengths) <= 8192:
        qkv = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref = reference(*qkv, lengths, scale)
        exact = [ref.detach()] + list(torch.autograd.grad(ref, qkv, dout.float()))
        for what, e, fl, cd in zip(names, exact, vals["flash"], vals["cudnn"]):
            row[f"{what}_err_flash"], row[f"{what}_err_cudnn"] = rel_err(fl, e), rel_err(cd, e)
            ok &= row[f"{what}_err_cudnn"] <= 2 * row[f"{what}_err_flash"] + 1e-3
    else:
        for what, fl, cd in zip(names, vals["flash"], vals["cudnn"]):
            row[f"{what}_cudnn_vs_flash"] = rel_err(cd, fl)
            ok &= row[f"{what}_cudnn_vs_flash"] <= 1e-2
    row["ok"] = bool(ok)
    results["packings"][name] = row
    print(name, row, flush=True)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results: dict = {"check": "bench/check_cudnn_attention.py", "torch": torch.__version__,
                     "cudnn": torch.backends.cudnn.version(), "device": torch.cuda.get_device_name(), "packings": {}}
    ok = True
    for name, lengths in packings().items():
        try:
            ok &= check(name, lengths, results)
        except Exception as e:  # noqa: BLE001 - a kernel that refuses a shape is a finding, reported
            results["packings"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(name, "ERROR", e, flush=True)
            ok = False
    results["ok"] = ok
    report(results, args.json)
    print("CUDNN ATTENTION CHECK", "PASSED" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
