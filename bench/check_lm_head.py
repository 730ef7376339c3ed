"""GPU check of the LM head with its gradient made in the forward (trainer/lm_head.py)
against TRL's fused head (trl.kernels.ChunkedLogProbFunction), at the 8B shape: 16,375
tokens, hidden 4096, vocabulary 128,256, bf16 under autocast, as the trainer runs it.
Both fold with TRL's Triton kernels. Reported: the largest differences of the
log-probabilities and entropy, whether the top-1 flags agree, the relative error of the
hidden-state gradient (each against an fp32 run of TRL's function), and the time of
forward + backward of each (CUDA events, median of 10; check_attention's clock).

python3 bench/check_lm_head.py [--json FILE]   (exit status 1 when a check fails)
"""

from __future__ import annotations

import argparse
import sys

import torch

from check_attention import report, time_fn
from kubetune.trainer import lm_head


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--tokens", type=int, default=16375)
    args = ap.parse_args()
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction as Theirs

    ours = lm_head.one_pass_function()
    g = torch.Generator(device="cuda").manual_seed(0)
    n, hidden, vocab = args.tokens, 4096, 128256
    h = (torch.randn(n, hidden, device="cuda", generator=g) * 1.5).to(torch.bfloat16)
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    outputs = ("entropy", "is_top1")

    def run(fn, dtype, x):
        x = x.detach().clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            lp, ent, _, _, top1 = fn.apply(x, w.to(dtype), None, targets, 1.0, 32768, None, 1.0, outputs)
        (-lp.sum() / n).backward()
        return lp.detach().float(), ent.detach().float(), top1, x.grad.float()

    exact = run(Theirs, torch.float32, h.float())
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": n}
    for name, fn in (("trl", Theirs), ("one_pass", ours)):
        lp, ent, top1, grad = run(fn, torch.bfloat16, h)
        results[name] = {
            "logprob_max_abs_diff": float((lp - exact[0]).abs().max()),
            "entropy_max_abs_diff": float((ent - exact[1]).abs().max()),
            "top1_disagree": int((top1 != exact[2]).sum()),
            "grad_rel_err": float((grad - exact[3]).norm() / exact[3].norm()),
            "ms_forward_backward": round(time_fn(lambda fn=fn: run(fn, torch.bfloat16, h)), 3),
        }
    ok = (results["one_pass"]["grad_rel_err"] <= 1.5 * results["trl"]["grad_rel_err"] + 1e-3
          and results["one_pass"]["logprob_max_abs_diff"] <= 1.5 * results["trl"]["logprob_max_abs_diff"] + 1e-3)
    results["ok"] = ok
    results["speedup"] = round(results["trl"]["ms_forward_backward"] / results["one_pass"]["ms_forward_backward"], 3)
    results["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    report(results, args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
