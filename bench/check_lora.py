"""GPU check of the fused LoRA linear (trainer/lora_kernels.py, wired by trainer/fast_paths.py) on bitsandbytes
4-bit and bf16 base layers: same output and gradients as PEFT's own forward
under bf16 autocast, as the trainer runs it (dropout 0, so both sides compute
the same function). Fresh random inputs every run.

Then the LoRA-dropout kernels (trainer/lora_dropout.py) at the 8B shape
(16k tokens x 4096, rank 16, bf16): their products against PyTorch over the
mask they draw, the mask's keep rate, and the time of one projection's LoRA
dropout work (forward, input gradient and A gradient) against the dropped-copy
path it replaces (CUDA events, median of 20; check_attention's clock).

python3 bench/check_lora.py   (exit status 1 when a check fails)
"""

from __future__ import annotations

import random
import sys

import torch

from check_attention import time_fn  # CUDA-event median, the clock of the other checks
from kubetune.trainer import fast_paths


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def build(kind: str, seed: int):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if kind == "nf4":
                lin = [bnb.nn.Linear4bit(1024, 4096, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"),
                       bnb.nn.Linear4bit(4096, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")]
            else:
                lin = [torch.nn.Linear(1024, 4096, bias=False, dtype=torch.bfloat16),
                       torch.nn.Linear(4096, 1024, bias=False, dtype=torch.bfloat16)]
            self.up, self.down = lin

        def forward(self, x):
            return self.down(torch.nn.functional.silu(self.up(x)))

    m = Two().cuda()
    m.is_loaded_in_4bit = kind == "nf4"  # how PEFT picks its bitsandbytes LoRA layer
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["up", "down"]))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return m


def grads(m, x, g):
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    y.backward(g)
    return y.detach().float(), x.grad.float(), {n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad}


def main() -> int:
    ok = True
    for kind in ("nf4", "bf16"):
        seed = random.randrange(1 << 30)
        m = build(kind, seed)
        x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
        y0, dx0, gp0 = grads(m, x, g)
        n = fast_paths.fuse_lora_layers(m)
        y1, dx1, gp1 = grads(m, x, g)
        errs = {"y": rel(y1, y0), "dx": rel(dx1, dx0)}
        errs.update({k.split(".")[-3] + "." + k.split(".")[-2].replace("lora_", ""): rel(gp1[k], gp0[k]) for k in gp0})
        dtype_ok = all(p.grad.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
        good = n == 2 and dtype_ok and all(e < 2e-2 for e in errs.values())
        ok &= good
        print(f"fused LoRA {kind:5s} {'OK ' if good else 'BAD'} seed {seed} fused {n} " +
              " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    ok &= check_dropout()
    print("LORA CHECK", "PASSED" if ok else "FAILED", flush=True)
    return 0 if ok else 1


def check_dropout() -> bool:
    from kubetune.trainer import lora_dropout as ld

    m, k, r, p = 16384, 4096, 16, 0.05
    seed = random.randrange(1 << 30)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a = (torch.randn(r, k, device="cuda") / 64).to(torch.bfloat16)
    dxa = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
    dx0 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    keep = ld.keep_mask(seed, m, k, p, "cuda")
    scale = ld.threshold_and_scale(p)[1]
    xd = x.float() * keep * scale
    errs = {
        "keep_rate": abs(keep.float().mean().item() - 1 / scale),
        "xa": rel(ld.lora_a_forward(x, a, seed, p), xd @ a.float().t()),
        "dA": rel(ld.a_grad(dxa, x, seed, p), dxa.float().t() @ xd),
    }
    dx = dx0.clone()
    ld.add_input_grad(dx, dxa, a, seed, p)
    errs["dx"] = rel(dx, dx0.float() + (dxa.float() @ a.float()) * keep * scale)
    good = errs["keep_rate"] < 1e-3 and all(v < 1e-2 for n, v in errs.items() if n != "keep_rate")

    def dropped_copy():
        xd_, mask = torch.ops.aten.native_dropout(x, p, True)
        xd_ @ a.t()
        dx.add_(torch.ops.aten.native_dropout_backward(dxa @ a, mask, 1 / (1 - p)))
        dxa.t() @ xd_

    def in_kernels():
        ld.lora_a_forward(x, a, seed, p)
        ld.add_input_grad(dx, dxa, a, seed, p)
        ld.a_grad(dxa, x, seed, p)

    t_old, t_new = time_fn(dropped_copy, reps=20), time_fn(in_kernels, reps=20)
    print(f"LoRA dropout kernels {'OK ' if good else 'BAD'} seed {seed} " +
          " ".join(f"{n}={v:.1e}" for n, v in errs.items()) +
          f" | one projection, forward + backward: dropped copy {t_old:.3f} ms, in the kernels {t_new:.3f} ms",
          flush=True)
    return good


if __name__ == "__main__":
    sys.exit(main())
