"""Sweep of the FP8 path's memory-bound kernels (trainer/fp8.py) on the GPU, at the 8B shape:
the NF4 -> e4m3 weight cast (`quantize_nf4`, forward layout and transposed, at each of the
decoder layer's weight shapes: rows a program, warps) and the two SwiGLU row kernels
(`swiglu_rows`, `swiglu_backward_rows`, 16,384 tokens x 14,336: warps).

Every variant is checked against the current one bit for bit (the tiles and warps change
how the work is split, never a value) and timed with CUDA events around 20 calls in a
row (median of 5). It prints, per kernel, the current figure, the fastest and the bandwidth
each reaches; for the NF4 cast, the tiles that minimise one step's sum over the layer's calls
(`STEP_CALLS`). It changes nothing: the chosen settings are written into trainer/fp8.py by
hand (NF4_TILES, NF4_TILES_T, SWIGLU_ROWS_WARPS, SWIGLU_BACKWARD_ROWS_WARPS), with the figures.

python3 bench/tune_fp8_kernels.py [--json out.json] [--quick]
(On a CPU, with TRITON_INTERPRET=1, it runs the same code in Triton's interpreter at small
shapes: a check of the script, not of the timings.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from kubetune.trainer import fp8
from tune_lora_dropout import time_fn  # 20 calls in a row on the GPU (median of 5); one in the interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEVICE == "cuda"
TOKENS, HIDDEN, INTER, KV = (16384, 4096, 14336, 1024) if GPU else (48, 128, 448, 64)

# (N, K) of each frozen weight of a Llama decoder layer, and how many casts of it one step
# makes: forward layout twice (the forward and the checkpointed recompute), transposed once
# (the input gradient).
WEIGHTS = {"q_o": (HIDDEN, HIDDEN), "k_v": (KV, HIDDEN), "gate_up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}
STEP_CALLS = {"q_o": 2, "k_v": 2, "gate_up": 2, "down": 1}  # weights of that shape a layer


def same_bits(a, b) -> bool:
    return bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))


def nf4_weight(n: int, k: int):
    """A random bf16 (N, K) weight as bitsandbytes NF4 with double quantisation (the trainer's
    default), on the device."""
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64,
                          quant_storage=torch.uint8)
    return p.cuda() if GPU else p._quantize("cpu")


def nf4_grid(quick: bool) -> list[dict]:
    bns, warps = ((64, 128), (4, 8)) if quick else ((16, 32, 64, 128, 256), (2, 4, 8))
    return [{"BN": bn, "num_warps": w} for bn, w in itertools.product(bns, warps)]


def sweep_nf4(quick: bool) -> dict:
    out = {}
    for transpose in (False, True):
        current = fp8.NF4_TILES_T if transpose else fp8.NF4_TILES
        grid = [current] + [t for t in nf4_grid(quick) if t != current]
        per_tiles: dict = {json.dumps(t, sort_keys=True): {"tiles": t, "ms": {}} for t in grid}
        for name, (n, k) in WEIGHTS.items():
            p = nf4_weight(n, k)
            amax = fp8.weight_amax(torch.ones(1, device=DEVICE))
            ref = fp8.quantize_nf4(p, amax, transpose, tiles=current)
            for t in grid:
                row = per_tiles[json.dumps(t, sort_keys=True)]
                try:
                    if not same_bits(fp8.quantize_nf4(p, amax, transpose, tiles=t), ref):
                        row["error"] = f"codes differ at {name}"
                        continue
                    row["ms"][name] = round(time_fn(lambda: fp8.quantize_nf4(p, amax, transpose, tiles=t)), 4)
                except Exception as e:  # a tile too large for the SM's resources fails to compile
                    row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            del p
        rows = []
        for row in per_tiles.values():
            if "error" in row or len(row["ms"]) != len(WEIGHTS):
                rows.append(row)
                continue
            row["layer_ms"] = round(sum(row["ms"][w] * STEP_CALLS[w] * (1 if transpose else 2) for w in WEIGHTS), 4)
            row["tb_per_s"] = {w: round(1.5 * n * k / row["ms"][w] / 1e9, 2) for w, (n, k) in WEIGHTS.items()}
            rows.append(row)
        ok = [r for r in rows if "layer_ms" in r]
        best = min(ok, key=lambda r: r["layer_ms"])
        cur = rows[0]
        out["transposed" if transpose else "forward"] = {"current": cur, "best": best,
                                                          "speedup": round(cur["layer_ms"] / best["layer_ms"], 3),
                                                          "rows": rows}
        layout = "transposed" if transpose else "forward"
        print(f"nf4 {layout}: current {cur['tiles']} {cur['layer_ms']} ms a layer {cur['ms']} | "
              f"best {best['tiles']} {best['layer_ms']} ms {best['ms']} x{out[layout]['speedup']}", flush=True)
    return out


def swiglu_grid(quick: bool) -> list[int]:
    """Warps of the SwiGLU row kernels (each keeps the whole row in one pass; the record of
    this sweep at commit 1501636 also has two-pass variants, slower at every piece width)."""
    return [16, 32] if quick else [4, 8, 16, 32]


def sweep_swiglu(quick: bool) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    a, b, dh = (torch.randn(TOKENS - 2, INTER, device=DEVICE, generator=g).bfloat16() for _ in range(3))
    kernels = {
        "swiglu_rows": (lambda w: fp8.swiglu_rows_kernel(a, b, warps=w), fp8.SWIGLU_ROWS_WARPS, 5 * a.numel()),
        "swiglu_backward_rows": (lambda w: fp8.swiglu_backward_rows_kernel(a, b, dh, warps=w),
                                 fp8.SWIGLU_BACKWARD_ROWS_WARPS, 8 * a.numel()),
    }
    out = {}
    for name, (run, current, nbytes) in kernels.items():
        def flat(res):
            return [t for pair in (res if isinstance(res, list) else [res]) for t in pair]

        ref = flat(run(current))
        rows = []
        for how in [current] + [w for w in swiglu_grid(quick) if w != current]:
            try:
                got = flat(run(how))
                if not all(same_bits(x, y) for x, y in zip(got, ref)):
                    rows.append({"how": how, "error": "values differ"})
                    continue
                ms = time_fn(lambda: run(how))
            except Exception as e:
                rows.append({"how": how, "error": f"{type(e).__name__}: {str(e)[:120]}"})
                continue
            rows.append({"how": how, "ms": round(ms, 4), "tb_per_s": round(nbytes / ms / 1e9, 2)})
        ok = [r for r in rows if "ms" in r]
        best = min(ok, key=lambda r: r["ms"])
        out[name] = {"current": rows[0], "best": best, "speedup": round(rows[0]["ms"] / best["ms"], 3), "rows": rows}
        print(f"{name}: current {rows[0]['how']} {rows[0]['ms']} ms ({rows[0]['tb_per_s']} TB/s) | best "
              f"{best['how']} {best['ms']} ms ({best['tb_per_s']} TB/s) x{out[name]['speedup']}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    ap.add_argument("--only", default="", help="nf4 or swiglu: one of the two sweeps")
    args = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name() if GPU else "cpu (Triton interpreter)", "torch": torch.__version__,
           "shape": {"tokens": TOKENS, "hidden": HIDDEN, "intermediate": INTER, "kv": KV}}
    if args.only in ("", "swiglu"):
        res["swiglu"] = sweep_swiglu(args.quick)
    if args.only in ("", "nf4"):
        res["nf4"] = sweep_nf4(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
