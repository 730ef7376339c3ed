"""Sweep of the LoRA-dropout kernels' tiles (trainer/lora_dropout.py: FORWARD, INPUT_GRAD,
A_GRAD) on the GPU, at the 8B shape (16,384 tokens x 4096, rank 16, bf16, p 0.05).

Each kernel is memory-bound: it streams x (or reads and writes dx) once, 128 MiB at this
shape. The sweep times every tile from a small grid (CUDA events around 20 calls in a row,
so that the host's launch cost of each call hides behind the previous one, as in a step;
median of 5), checks its output against the current tiles' (the mask does not
depend on the tiles; only the summation order does), and prints the fastest beside the
current one, with the bandwidth each reaches. It changes nothing: the chosen tiles are
written into trainer/lora_dropout.py by hand, with the figures.

python3 bench/tune_lora_dropout.py [--json out.json] [--quick]
python3 bench/tune_lora_dropout.py --rounds 10,7,0 [--json out.json]
    (the current tiles at each count of Philox rounds, beside the plain product without
    dropout: how much of each kernel's time is drawing the mask; 10 is the trainer's)
(On a CPU, with TRITON_INTERPRET=1 and a few --tokens, it runs the same code in Triton's
interpreter: a check of the script, not of the timings.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import time

import torch

from check_attention import time_fn as gpu_clock
from kubetune.trainer import lora_dropout as ld

M, R, P, SEED = 16384, 16, 0.05, 1234
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def grids(quick: bool) -> dict[str, list[dict]]:
    bms, bks = ((32, 64), (64, 128)) if quick else ((32, 64, 128), (64, 128, 256))
    fwd = [{"BM": bm, "BK": bk, "num_warps": w, "num_stages": s}
           for bm, bk, w, s in itertools.product(bms, bks, (4, 8), (3, 4))]
    ig = [{"BM": bm, "BK": bk, "num_warps": w, "num_stages": 3} for bm, bk, w in itertools.product(bms, bks, (4, 8))]
    ag = [{"BM": bm, "BK": bk, "num_warps": w, "num_stages": 3, "programs": n}
          for bm, bk, w, n in itertools.product(bms, bks[:2], (4, 8), (512, 1024, 2048))]
    return {"forward": fwd, "input_grad": ig, "a_grad": ag}


def inputs(k: int) -> tuple:
    """(x, a, dxa, dx) at K = k: the kernels' operands, the same on every call."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(M, k, device=DEVICE, dtype=torch.bfloat16, generator=g)
    a = (torch.randn(R, k, device=DEVICE, dtype=torch.bfloat16, generator=g) / 8).contiguous()
    dxa = torch.randn(M, R, device=DEVICE, dtype=torch.bfloat16, generator=g)
    return x, a, dxa, torch.zeros(M, k, device=DEVICE, dtype=torch.bfloat16)


def runner(kernel: str, k: int, operands: tuple | None = None):
    """(run(tiles) -> output, bytes moved per call) for one kernel at K = k (on `operands`, or
    fresh `inputs`)."""
    x, a, dxa, dx = operands or inputs(k)
    if kernel == "forward":
        return (lambda t: ld.lora_a_forward(x, a, SEED, P, tiles=t)), x.numel() * 2
    if kernel == "input_grad":
        def run(t):
            dx.zero_()
            ld.add_input_grad(dx, dxa, a, SEED, P, tiles=t)
            return dx
        return run, 2 * dx.numel() * 2
    return (lambda t: ld.a_grad(dxa, x, SEED, P, tiles=t)), x.numel() * 2


def time_fn(fn) -> float:
    """ms per call: on the GPU, 20 calls in a row (median of 5); in the interpreter one call."""
    if DEVICE == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return gpu_clock(fn, reps=5, calls=20)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def sweep(kernel: str, tiles: list[dict], current: dict, k: int) -> dict:
    run, nbytes = runner(kernel, k)
    ref = run(current).clone()
    # input_grad's timed call includes dx.zero_(), a pass of 2 bytes per element: timed apart
    zero_ms = time_fn(lambda: runner_zero(k)) if kernel == "input_grad" else 0.0
    rows = []
    for t in [current] + [t for t in tiles if t != current]:
        try:
            err = rel(run(t), ref)
            ms = max(1e-6, time_fn(lambda: run(t)) - zero_ms)
        except Exception as e:  # a tile too large for the SM's resources fails to compile
            rows.append({"tiles": t, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        rows.append({"tiles": t, "ms": round(ms, 4), "tb_per_s": round(nbytes / ms / 1e9, 2), "rel_err": err})
    ok = [r for r in rows if "ms" in r and r["rel_err"] < 1e-2]
    best = min(ok, key=lambda r: r["ms"])
    return {"k": k, "current": rows[0], "best": best, "speedup": round(rows[0]["ms"] / best["ms"], 3), "rows": rows}


_ZERO: dict = {}


def runner_zero(k: int):
    t = _ZERO.get(k)
    if t is None:
        t = _ZERO[k] = torch.zeros(M, k, device=DEVICE, dtype=torch.bfloat16)
    t.zero_()


def plain_product(kernel: str, operands: tuple):
    """The same product without dropout (torch's matrix multiply) on the same operands: what
    the kernel would cost if drawing and applying the mask were free."""
    x, a, dxa, dx = operands
    if kernel == "forward":
        return lambda: x @ a.t()
    if kernel == "input_grad":
        return lambda: dx.addmm_(dxa, a)
    return lambda: dxa.t().float() @ x.float() if DEVICE == "cpu" else dxa.t() @ x


def rounds_probe(rounds: list[int], k: int) -> dict:
    """Each kernel at its current tiles with Philox at each count of rounds, beside the plain
    product: how much of a kernel's time is the mask's drawing (10 rounds is the trainer's)."""
    current = {"forward": ld.FORWARD, "input_grad": ld.INPUT_GRAD, "a_grad": ld.A_GRAD}
    out = {}
    operands = inputs(k)
    for kernel, tiles in current.items():
        run, nbytes = runner(kernel, k, operands)
        zero_ms = time_fn(lambda: runner_zero(k)) if kernel == "input_grad" else 0.0
        row = {}
        for r in rounds:
            t = {**tiles, "ROUNDS": r}
            run(t)  # compile
            row[f"rounds{r}_ms"] = round(max(1e-6, time_fn(lambda: run(t)) - zero_ms), 4)
        plain = plain_product(kernel, operands)
        row["plain_ms"] = round(time_fn(plain), 4)
        row["bytes"] = nbytes
        out[kernel] = row
        print(f"{kernel:10s} K={k} " + " ".join(f"{n} {v}" for n, v in row.items()), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    ap.add_argument("--tokens", type=int, default=M)
    ap.add_argument("--rounds", default="", help="e.g. 10,7,0: time the current tiles at each count of Philox "
                                                 "rounds and the plain product instead of sweeping tiles")
    a = ap.parse_args()
    globals()["M"] = a.tokens
    if a.rounds:
        k = 4096 if DEVICE == "cuda" else 256
        res = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)",
               "torch": torch.__version__, "shape": {"M": M, "K": k, "R": R, "p": P},
               "rounds": rounds_probe([int(r) for r in a.rounds.split(",")], k)}
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    current = {"forward": ld.FORWARD, "input_grad": ld.INPUT_GRAD, "a_grad": ld.A_GRAD}
    out = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)", "torch": torch.__version__, "shape": {"M": M, "R": R, "p": P},
           "kernels": {}}
    for kernel, tiles in grids(a.quick).items():
        res = sweep(kernel, tiles, current[kernel], 4096 if DEVICE == "cuda" else 256)
        # the winner at the MLP's input width too (down_proj: 14336)
        wide = sweep(kernel, [res["best"]["tiles"]], current[kernel], 14336 if DEVICE == "cuda" else 448)
        out["kernels"][kernel] = {"k4096": res, "k14336": {k: wide[k] for k in ("current", "best", "speedup")}}
        c, b = res["current"], res["best"]
        print(f"{kernel:10s} current {c['tiles']} {c['ms']:.4f} ms ({c['tb_per_s']} TB/s) | best {b['tiles']} "
              f"{b['ms']:.4f} ms ({b['tb_per_s']} TB/s) x{res['speedup']} | at K=14336: "
              f"{wide['current']['ms']:.4f} -> {wide['rows'][-1].get('ms')} ms", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
