"""GPU check of the FP8 base products (trainer/fp8.py).

1. Kernels: the Triton row and tensor quantisers against the same arithmetic
   in PyTorch on the CPU (the one tests/unit/test_fp8.py pins down): equal
   scales, e4m3 codes equal or one rounding step apart (fp32 on two devices).
2. Products: fp8 `linear` / `linear_input_grad` against the fp32 product,
   relative error, on the Llama-3-8B projection shapes; beside it the error
   of bf16 and the error NF4 rounding of the weight alone causes (QLoRA's).
   And `quantize_nf4` (a bitsandbytes NF4 weight straight to e4m3) against
   dequantising then casting: the same codes, and the time of each.
3. Timing (CUDA events, median of 10): bf16 `x @ w.t()` against the fp8 path
   including its quantisation, and the split: row quantisation, weight
   quantisation, the scaled product alone.
4. The SwiGLU product quantised where it is made (`fp8.swiglu_rows`, KUBETUNE_FP8_SWIGLU=1):
   the same scales and codes as silu(gate) * up in bf16 then `quantize_rows`, the in-place
   backward against autograd, and the time of each path at 16,382 x 14,336.

Run on the GPU machine: python3 bench/check_fp8.py [--json out.json]
Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import sys

import torch

from check_attention import report as write_report
from check_attention import time_fn as timed  # CUDA-event median, same clock as the attention check
from kubetune.trainer import fp8

TOKENS = 16382  # a packed 8 x 2048 micro-batch less two pad tokens: rows not a multiple of 16
SHAPES = {  # name: (in, out) of the frozen weight
    "q/o 4096x4096": (4096, 4096),
    "k/v 4096->1024": (4096, 1024),
    "gate/up 4096->14336": (4096, 14336),
    "down 14336->4096": (14336, 4096),
}


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def check_kernels(failures: list) -> dict:
    torch.manual_seed(0)
    x = (torch.randn(1000, 14336) * torch.logspace(-2, 2, 1000).unsqueeze(1)).to(torch.bfloat16)
    qg, sg = fp8.quantize_rows(x.cuda())
    qc, sc = fp8.quantize_rows(x)
    scale_err = float(((sg.cpu() - sc).abs() / sc).max())
    codes_off = float((qg.cpu().float() != qc.float()).float().mean())
    # e4m3 codes of one sign are ordered like their bit patterns: a tie rounded the other
    # way is one step apart (a relative step of up to 1/3 among the subnormals)
    steps = (qg.cpu().view(torch.int8).int() - qc.view(torch.int8).int()).abs()
    w = (torch.randn(14336, 4096) / 64).to(torch.bfloat16)
    wg, wsg = fp8.quantize_tensor(w.cuda(), transpose=True)
    wc, wsc = fp8.quantize_tensor(w, transpose=True)
    w_off = float((wg.cpu().float() != wc.float()).float().mean())
    out = {"row_scale_max_rel_diff": scale_err, "row_codes_differing": codes_off,
           "row_codes_max_steps_apart": int(steps.max()), "weight_codes_differing": w_off,
           "weight_scale_equal": bool(torch.equal(wsg.cpu(), wsc)),
           # rows 1000..1007: the padding up to the grid of 16, written by the row kernel itself
           "padding_rows_zero_scale_one": bool((qg[1000:].float() == 0).all() and (sg[1000:] == 1).all())}
    out.update(check_nf4())
    if (scale_err > 1e-6 or codes_off > 1e-3 or int(steps.max()) > 1 or w_off > 1e-3 or not out["weight_scale_equal"]
            or not out["padding_rows_zero_scale_one"] or not out["nf4_codes_equal"]):
        failures.append(f"kernels differ from the reference arithmetic: {out}")
    return out


def check_nf4() -> dict:
    """quantize_nf4 (NF4 straight to e4m3) against bitsandbytes' dequantisation then
    quantize_tensor, on a gate/up-shaped weight with double quantisation: the same
    codes, both orientations; and the time of each."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    w = (torch.randn(14336, 4096) / 64).to(torch.bfloat16)
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True).cuda()
    dense = bnbf.dequantize_4bit(p.data, p.quant_state)
    amax = fp8.weight_amax(dense)
    equal = True
    for transpose in (False, True):
        ref, _ = fp8.quantize_tensor(dense, transpose=transpose, amax=amax)
        equal &= bool(torch.equal(fp8.quantize_nf4(p, amax, transpose).view(torch.int8), ref.view(torch.int8)))
    unfused = timed(lambda: fp8.quantize_tensor(bnbf.dequantize_4bit(p.data, p.quant_state), amax=amax))
    fused = timed(lambda: fp8.quantize_nf4(p, amax))
    return {"nf4_codes_equal": equal, "nf4_dequantise_then_cast_ms": unfused, "nf4_to_e4m3_ms": fused}


def check_products(failures: list) -> dict:
    import bitsandbytes.functional as bnbf

    out = {}
    torch.manual_seed(1)
    for name, (k, n) in SHAPES.items():
        x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
        dy = torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16)
        y = fp8.linear(x, w, torch.bfloat16)
        dx = fp8.linear_input_grad(dy, w, torch.bfloat16)
        ey = rel(y, x.float() @ w.float().t())
        ex = rel(dx, dy.float() @ w.float())
        bf = rel(x @ w.t(), x.float() @ w.float().t())
        # For scale: what QLoRA's own NF4 rounding of the weight does to the same product.
        packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        nf4 = rel(x @ bnbf.dequantize_4bit(packed, state).t(), x.float() @ w.float().t())
        out[name] = {"fp8_fwd_rel_err": round(ey, 5), "fp8_dgrad_rel_err": round(ex, 5), "bf16_rel_err": round(bf, 5),
                     "nf4_weight_rel_err": round(nf4, 5)}
        if not (y.shape == (TOKENS, n) and dx.shape == (TOKENS, k)) or ey > 0.05 or ex > 0.05:
            failures.append(f"{name}: {out[name]}")
    return out


def timing() -> dict:
    out = {}
    for name, (k, n) in SHAPES.items():
        x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
        dy = torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16)
        flop = 2 * TOKENS * k * n
        xq, xs = fp8.quantize_rows(x)
        wq, ws = fp8.quantize_tensor(w)
        wsv = ws.expand(1, n).contiguous()
        t = {
            "bf16_fwd_ms": timed(lambda: x @ w.t()),
            "bf16_dgrad_ms": timed(lambda: dy @ w),
            "fp8_fwd_ms": timed(lambda: fp8.linear(x, w, torch.bfloat16)),
            "fp8_dgrad_ms": timed(lambda: fp8.linear_input_grad(dy, w, torch.bfloat16)),
            "quant_rows_ms": timed(lambda: fp8.quantize_rows(x)),
            "quant_weight_ms": timed(lambda: fp8.quantize_tensor(w)),
            "quant_weight_t_ms": timed(lambda: fp8.quantize_tensor(w, transpose=True)),
            "scaled_mm_ms": timed(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=wsv, out_dtype=torch.bfloat16)),
        }
        t = {key: round(v, 3) for key, v in t.items()}
        t["bf16_tflops"] = round(flop / t["bf16_fwd_ms"] / 1e9, 1)
        t["scaled_mm_tflops"] = round(flop / t["scaled_mm_ms"] / 1e9, 1)
        t["fp8_fwd_speedup"] = round(t["bf16_fwd_ms"] / t["fp8_fwd_ms"], 2)
        t["fp8_dgrad_speedup"] = round(t["bf16_dgrad_ms"] / t["fp8_dgrad_ms"], 2)
        out[name] = t
    return out


def check_swiglu(failures: list) -> dict:
    torch.manual_seed(1)
    a = (torch.randn(TOKENS, 14336, device="cuda") * 2).to(torch.bfloat16)
    b = torch.randn(TOKENS, 14336, device="cuda").to(torch.bfloat16)
    dh = torch.randn(TOKENS, 14336, device="cuda").to(torch.bfloat16)
    q, s = fp8.swiglu_rows(a, b)
    rq, rs = fp8.quantize_rows(torch.nn.functional.silu(a) * b)
    # torch's silu and the kernel's a * sigmoid(a) may differ in a float32 ulp, which the bf16
    # rounding hides almost always: count the rows where it did not.
    out = {"rows_scale_differing": float((s != rs).float().mean()),
           "scale_max_rel_diff": float(((s - rs).abs() / rs).max()),
           "codes_differing": float((q.float() != rq.float()).float().mean()),
           "codes_max_steps_apart": int((q.view(torch.int8).int() - rq.view(torch.int8).int()).abs().max())}
    af, bf = a.float().requires_grad_(), b.float().requires_grad_()
    (torch.nn.functional.silu(af) * bf).backward(dh.float())
    da, db = fp8.swiglu_backward_(a.clone(), b.clone(), dh)
    out["backward_rel_err"] = [rel(da.float(), af.grad), rel(db.float(), bf.grad)]
    out["fused_fwd_ms"] = round(timed(lambda: fp8.swiglu_rows(a, b)), 3)
    out["unfused_fwd_ms"] = round(timed(lambda: fp8.quantize_rows(torch.nn.functional.silu(a) * b)), 3)
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        out["liger_then_rows_fwd_ms"] = round(timed(lambda: fp8.quantize_rows(LigerSiLUMulFunction.apply(a, b))), 3)
    except ImportError:
        pass
    a2, b2 = a.clone(), b.clone()
    out["fused_bwd_ms"] = round(timed(lambda: fp8.swiglu_backward_(a2, b2, dh)), 3)
    # The backward of a frozen gate / up: their gradients straight to e4m3 rows, against the
    # in-place backward and two row quantisations.
    got = fp8.swiglu_backward_rows(a, b, dh)
    da, db = fp8.swiglu_backward_(a.clone(), b.clone(), dh)
    refs = [fp8.quantize_rows(da), fp8.quantize_rows(db)]
    out["backward_rows_codes_differing"] = [float((q.float() != rq.float()).float().mean()) for (q, _), (rq, _) in zip(got, refs)]
    out["backward_rows_scale_max_rel_diff"] = [float(((s - rs).abs() / rs).max()) for (_, s), (_, rs) in zip(got, refs)]
    out["backward_rows_ms"] = round(timed(lambda: fp8.swiglu_backward_rows(a, b, dh)), 3)
    out["backward_then_rows_ms"] = round(timed(lambda: [fp8.quantize_rows(t) for t in fp8.swiglu_backward_(a2, b2, dh)]), 3)
    if (out["rows_scale_differing"] > 1e-3 or out["scale_max_rel_diff"] > 2**-7 or out["codes_differing"] > 1e-3 or out["codes_max_steps_apart"] > 1
            or max(out["backward_rel_err"]) > 1e-2 or max(out["backward_rows_codes_differing"]) > 1e-3
            or max(out["backward_rows_scale_max_rel_diff"]) > 2**-7):
        failures.append(f"swiglu_rows / swiglu_backward_ differ from the unfused arithmetic: {out}")
    return out


def check_fast_accum(failures: list) -> dict:
    """Each product, forward (x @ w^T) and input gradient (dy @ w), with and without
    cuBLASLt's fast FP8 accumulation (`fp8.set_fast_accum`): time, and the error against the
    fp32 product of the same e4m3 operands (the accumulation's own error) and against the
    exact product."""
    out = {}
    torch.manual_seed(2)
    for name, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
        # (rows, the other operand with the contraction last): dgrad contracts over n, w^T's rows
        for kind, a, b in (("fwd", torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16), w),
                           ("dgrad", torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16),
                            w.t().contiguous())):
            aq, a_s = fp8.quantize_rows(a)
            bq, b_s = fp8.quantize_tensor(b)
            bsv = b_s.expand(1, b.shape[0]).contiguous()
            same_operands = ((aq.float() * a_s) @ (bq.float() * b_s).t())[:TOKENS]
            exact = a.float() @ b.float().t()
            row = {}
            for fast in (False, True):
                tag = "fast" if fast else "promoted"
                mm = lambda: torch._scaled_mm(aq, bq.t(), scale_a=a_s, scale_b=bsv, out_dtype=torch.bfloat16,  # noqa: E731
                                              use_fast_accum=fast)
                y = mm()[:TOKENS]  # the rows padded to the grid of 16 dropped
                row[f"{tag}_ms"] = round(timed(mm), 3)
                row[f"{tag}_tflops"] = round(2 * TOKENS * k * n / row[f"{tag}_ms"] / 1e9, 1)
                row[f"{tag}_rel_err_same_operands"] = round(rel(y, same_operands), 6)
                row[f"{tag}_rel_err_exact"] = round(rel(y, exact), 5)
            row["speedup"] = round(row["promoted_ms"] / row["fast_ms"], 3)
            out[f"{name}_{kind}"] = row
            if row["fast_rel_err_exact"] > 0.05:
                failures.append(f"fast accumulation, {name} {kind}: {row}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if not fp8.supported(torch.device("cuda")):
        print("no FP8-capable CUDA device", file=sys.stderr)
        return 2
    failures: list = []
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": TOKENS,
              "kernels": check_kernels(failures), "products": check_products(failures), "timing": timing(),
              "swiglu": check_swiglu(failures), "fast_accum": check_fast_accum(failures)}
    report["failures"] = failures
    write_report(report, args.json)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
