"""GPU check of trainer/triton_launch.py: each of the trainer's Triton kernels that an 8B
step launches, through Triton's own launch path and through the compiled kernel's
launcher (`triton_launch.launch`), must give the same bytes; and the host time of one
call of each entry point both ways (the GPU kept ahead of the host by small shapes: what
is timed is the host's launch work, the point of the change).

python3 bench/check_fast_launch.py [--json FILE]   (exit status 1 when a result differs)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from check_attention import report
from kubetune.trainer import fp8, lora_dropout, rms_norm, triton_launch


def cases(m: int):
    """(name, a function of no arguments returning the tensors it wrote) for each entry point,
    on fresh inputs each call (the in-place ones write into copies)."""
    import bitsandbytes as bnb

    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    k, n, r, inter = 4096, 1024, 16, 14336
    x, dy = rnd(m, k), rnd(m, k)
    a, b, xa = rnd(r, k), rnd(k, r), rnd(m, r)
    gate, up, dh = rnd(m, inter), rnd(m, inter), rnd(m, inter)
    w = (1 + rnd(k, dtype=torch.float32) / 4).bfloat16()
    p4 = bnb.nn.Params4bit(rnd(n, k) * 0.02, requires_grad=False, quant_type="nf4", compress_statistics=True).cuda()
    amax = fp8.weight_amax(bnb.functional.dequantize_4bit(p4.data, p4.quant_state))
    _, rstd, _ = rms_norm.normalize(x, w, 1e-5)

    def add_product():
        out = dy.clone()
        lora_dropout.add_product(out, xa, b, 2.0)
        return [out]

    def add_input_grad():
        out = dy.clone()
        lora_dropout.add_input_grad(out, xa, a, 1234, 0.1)
        return [out]

    def swiglu_backward():
        ga, gu = gate.clone(), up.clone()
        return list(fp8.swiglu_backward_kernel_(ga, gu, dh))

    return [
        ("quantize_rows", lambda: list(fp8.quantize_rows(x))),
        ("quantize_nf4", lambda: [fp8.quantize_nf4(p4, amax)]),
        ("quantize_nf4_transposed", lambda: [fp8.quantize_nf4(p4, amax, transpose=True)]),
        ("lora_a_forward", lambda: [lora_dropout.lora_a_forward(x, a, 1234, 0.1)]),
        ("add_input_grad", add_input_grad),
        ("add_product", add_product),
        ("a_grad", lambda: [lora_dropout.a_grad(xa, x, 1234, 0.1)]),
        ("rms_norm", lambda: flat(rms_norm.normalize(x, w, 1e-5))),
        ("rms_norm_rows", lambda: flat(rms_norm.normalize(x, w, 1e-5, rows=True))),
        ("rms_norm_backward", lambda: [rms_norm.normalize_backward(dy, x, w, rstd)]),
        ("swiglu_rows", lambda: list(fp8.swiglu_rows_kernel(gate, up))),
        ("swiglu_backward_rows", lambda: flat(fp8.swiglu_backward_rows_kernel(gate, up, dh))),
        ("swiglu_backward", swiglu_backward),
    ]


def flat(outputs) -> list:
    """The tensors of a nest of tuples and lists (None left out)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for o in (outputs or ()) for t in flat(o)]


def same(xs, ys) -> bool:
    return len(xs) == len(ys) and all(torch.equal(u.view(torch.uint8), v.view(torch.uint8)) for u, v in zip(xs, ys))


def host_us(fn, calls: int = 300, reps: int = 5) -> float:
    """Median host microseconds per call over `reps` runs of `calls` calls in a row."""
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t) / calls * 1e6)
    torch.cuda.synchronize()
    return round(statistics.median(out), 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    import triton

    results = {"triton": triton.__version__, "torch": torch.__version__, "device": torch.cuda.get_device_name(),
               "equal": {}, "host_us_per_call": {}}
    failures = []
    # 16,384 rows as in a step, for the bytes; 64 for the host times, where the GPU keeps up
    for m, part in ((16384, "equal"), (64, "host_us_per_call")):
        for name, fn in cases(m):
            triton_launch.ENABLED = False
            want = fn()
            slow = host_us(fn) if part == "host_us_per_call" else None
            triton_launch.ENABLED = True
            got, again = fn(), fn()  # the first launch of a specialisation is Triton's, the next the launcher's
            if part == "equal":
                ok = same(want, got) and same(want, again)
                results["equal"][name] = ok
                if not ok:
                    failures.append(name)
            else:
                results["host_us_per_call"][name] = {"triton": slow, "launcher": host_us(fn)}
    # which kernels the launcher took, and where one call's host time goes (cProfile, own time)
    import cProfile
    import io
    import pstats

    from kubetune.trainer.lora_dropout import _kernels as dropout_kernels

    _, dk = dropout_kernels()
    results["launcher_engaged"] = {name: bool(getattr(getattr(dk, name), "_kubetune_launcher", None))
                                   for name in ("forward_kernel", "input_grad_kernel", "a_grad_kernel")}
    results["kernel_class"] = type(dk.forward_kernel).__mro__[0].__module__ + "." + type(dk.forward_kernel).__name__
    profiles = {}
    for name, fn in cases(64):
        if name not in ("quantize_nf4", "add_product", "rms_norm"):
            continue
        fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
        profiles[name] = out.getvalue()
    results["failures"] = failures
    report(results, args.json)
    if args.json:
        with open(args.json.replace(".json", "_host_profile.txt"), "w") as f:
            for name, text in profiles.items():
                f.write(f"==== {name}: 300 calls\n{text}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
