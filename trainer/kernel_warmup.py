"""Compile the run's Triton kernels in child processes while the trainer imports and loads.

Why: a pod that finds no kernel cache (`kernel_cache.py`: a job's first pod, a new
GPU kind, new library versions) compiles about 17 Triton kernels (the FP8 casts, the
LoRA-dropout products, Liger's norms and rotary embedding, the LM head's folds)
one after the other, each when the first step first reaches it: 10.6-14.6 s of an
8B first step, after 11-19 s of imports and 7 s of loading in which no kernel is
compiled (bench/RESULTS.md, issue 16, seventh round).

Here `start()` (standard library only, so it runs before the trainer imports
torch) launches `python -m kubetune.trainer.kernel_warmup --config X --part P`,
one child per part:

- `layer`: imports torch, triton and the trainer's kernel modules only (a few
  seconds, against the trainer's transformers, peft and trl), builds one decoder
  layer of the model's dimensions (read from its config.json) with the trainer's
  own nodes (`lora_kernels`), routed as `fast_paths` routes the real layers
  (`routes`), and runs it forward and backward.
- `libraries`: the kernels of the libraries the trainer patches in: Liger's norm,
  rotary embedding and SwiGLU, and TRL's LM-head folds (through `lm_head`), on
  the same shapes. Apart, because importing them imports transformers, and
  liger-kernel torch's compiler stack and peft too (12 s of a CPU machine's
  imports): in one child they would hold the trainer's own kernels back.

Each kernel compiles with the arguments the run will give it and lands in
Triton's cache directory, where the trainer's first step finds it. Token counts
are the one data-dependent argument: the trainer's own kernels do not specialise
on them (`lora_dropout_kernels`), Liger's rotary embedding and norm do, so each
part runs for a count that is a multiple of 16 and for one that is not.

Before its first step the trainer waits for the children (`settle`, at most
`WAIT_S`), so that the step finds the kernels complete and the children's GPU
memory free (a CUDA context each, one layer's weights one at a time in 4 bits, a
few hundred tokens of activations). Everything here is an optimisation: a child
that cannot read the model, fails or is too slow costs the compile it would have
saved, never the run. Where the job's kernel cache restored the kernels, the
children are stopped (`cancel`), as they are when the trainer exits first.
Measured on an 8B QLoRA first pod: 21.8-25.1 s from start to the first step
against 25.9-31.3 s without (bench/RESULTS.md, issue 16, eighth round).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kubetune.contract import facts

WAIT_S = 60.0  # the most the trainer waits for the children before its first step
# One count a multiple of 16 and one not (Triton's integer specialisation), the odd one first:
# a packed micro-batch is rarely a multiple of 16. Small, so the child's memory stays small.
TOKENS = (397, 400)
# What TRL's SFTTrainer asks of its fused LM head (trl/trainer/sft_trainer.py, add_fused_lm_head):
# the optional outputs are constexpr flags of the head's kernels.
LM_HEAD_OUTPUTS = ("log_probs", "entropy", "is_top1")
HEAD_WIDTH = 128  # the hidden width of the warm-up's LM head (`libraries_step` says why it may differ)
# Decoder families with Llama's layer: q/k/v/o, gate/up/down with SiLU, RMSNorm, rotary embedding.
LLAMA_LIKE = ("llama", "mistral", "qwen2")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "kernel warm-up:"
PARTS = ("layer", "libraries")


@dataclass(frozen=True)
class Geometry:
    """One decoder layer's dimensions and what the run adapts: all the kernels' arguments
    that are not token counts."""

    family: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    quantized: bool  # QLoRA: 4-bit NF4 base weights
    double_quant: bool
    rank: int
    scaling: float
    dropout: float
    adapted: frozenset  # projection names with a LoRA adapter
    fusable: bool  # the adapters take the fused node (no DoRA, no LoRA bias)

    def shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}[name]


def adapted_projections(targets, all_linear: bool) -> frozenset:
    """The layer's projections PEFT adapts for `target_modules` (names match a module's last part)."""
    if all_linear:
        return frozenset(PROJECTIONS)
    return frozenset(p for p in PROJECTIONS if p in set(targets))


def geometry(cfg, model_config: dict) -> Optional[Geometry]:
    """The layer to warm up for a trainer config and the model's config.json, or None where
    this module does not know the model's layer (its kernels then compile in the first step)."""
    c = model_config.get("text_config") or model_config
    family = c.get("model_type", "")
    if family not in LLAMA_LIKE or c.get("hidden_act", "silu") != "silu":
        return None
    from types import SimpleNamespace

    from kubetune.trainer.memory_plan import ModelShape

    s = ModelShape.from_config(SimpleNamespace(**c))  # the dimensions as the memory plan reads them
    m = cfg.method
    targets = m.peft_target_modules
    rank = int(m.r)
    return Geometry(
        family=family, hidden=s.hidden, intermediate=s.intermediate, heads=s.heads, kv_heads=s.kv_heads,
        head_dim=int(c.get("head_dim") or s.hidden // s.heads), vocab=s.vocab, eps=float(c.get("rms_norm_eps", 1e-6)),
        quantized=m.type == "qlora" and m.quantization.bits == 4 and m.quantization.type == "nf4",
        double_quant=bool(m.quantization.double_quant), rank=rank,
        scaling=float(m.alpha) / (rank ** 0.5 if m.use_rslora else rank), dropout=float(m.dropout),
        adapted=adapted_projections(targets if isinstance(targets, list) else [], targets == "all-linear"),
        fusable=not m.use_dora and m.bias == "none")


# --------------------------------------------------------------------------
# The trainer's side: start the children, wait for them, stop them
# --------------------------------------------------------------------------

_running: Optional["Warmup"] = None  # this process's children, until settled or cancelled


class Warmup:
    """The running children, one per part."""

    def __init__(self, processes: list, started: float):
        self.processes, self.started = processes, started

    def settle(self, timeout: float = WAIT_S) -> str:
        """Wait for the children (at most `timeout` s in all, then stop them); what happened, for the log."""
        deadline = time.time() + max(0.0, timeout)
        codes = []
        for p in self.processes:
            try:
                codes.append(p.wait(timeout=max(0.0, deadline - time.time())))
            except subprocess.TimeoutExpired:
                self.stop()
                return f"{PREFIX} stopped after {timeout:.0f} s of waiting; the first step compiles what is left"
        failed = [c for c in codes if c != 0]
        if failed:
            return f"{PREFIX} a child exited {failed[0]}; the first step compiles what it needs"
        return f"{PREFIX} done {time.time() - self.started:.1f} s after the trainer started"

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait()


def wanted(cfg, env=os.environ, gpu_device: str = "/dev/nvidiactl") -> bool:
    """The children are worth starting: LoRA or QLoRA, the node's first process (the others
    share its Triton cache), an NVIDIA GPU in the pod, not turned off by KUBETUNE_KERNEL_WARMUP=0."""
    if env.get(facts.ENV_KERNEL_WARMUP, "1").strip() == "0":
        return False
    if env.get("LOCAL_RANK", "0") != "0":
        return False
    if env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return cfg.method.type in ("lora", "qlora") and os.path.exists(gpu_device)


def start(config_path: Path, cfg, **kw) -> Optional[Warmup]:
    """Launch the children for this config when `wanted`; their log lines go to the trainer's stderr."""
    global _running
    if not wanted(cfg, **kw):
        return None
    processes = [subprocess.Popen([sys.executable, "-m", "kubetune.trainer.kernel_warmup", "--config", str(config_path),
                                   "--part", part], stdin=subprocess.DEVNULL) for part in PARTS]
    _running = Warmup(processes, time.time())
    atexit.register(cancel)  # a trainer that fails or stops before its first step leaves none behind
    return _running


def settle(timeout: float = WAIT_S) -> Optional[str]:
    """Before the first step: wait for this process's children, if it started them."""
    global _running
    running, _running = _running, None
    return running.settle(timeout) if running is not None else None


def cancel() -> bool:
    """Stop the children (the kernel cache brought the kernels); whether any were running."""
    global _running
    running, _running = _running, None
    if running is None:
        return False
    running.stop()
    return True


# --------------------------------------------------------------------------
# The children (`main`, one process per part)
# --------------------------------------------------------------------------

def read_model_config(cfg) -> dict:
    """The base model's config.json, from its directory or its S3 prefix."""
    from kubetune.trainer.storage import is_s3, open_store

    uri = cfg.base_model.uri
    if not is_s3(uri):
        return json.loads((Path(uri) / "config.json").read_text())
    data = open_store(uri, cfg.storage.endpoint_url, cfg.storage.region).get_bytes("config.json")
    if data is None:
        raise FileNotFoundError(f"{uri.rstrip('/')}/config.json")
    return json.loads(data)


@dataclass(frozen=True)
class Route:
    """How the trainer runs one projection (`fast_paths`)."""

    adapted: bool
    fused: bool  # the fused LoRA node (`lora_kernels.lora_linear`)
    fp8: bool  # its base product in FP8 (`fast_paths.fp8_base_products`)


def routes(geo: Geometry, perf, pays) -> dict:
    """Each projection's `Route` for the resolved performance settings; `pays(in, out)` is
    `fp8.pays`. An adapter is fused where fused LoRA is on and it is vanilla; a fused
    adapter's base product, or a frozen linear, runs in FP8 where FP8 is on and pays."""
    out = {}
    for name in PROJECTIONS:
        adapted = name in geo.adapted
        fused = adapted and geo.fusable and perf.fused_lora
        out[name] = Route(adapted, fused, perf.fp8 and (fused or not adapted) and pays(*geo.shape(name)))
    return out


def swiglu_in_fp8(r: dict, perf) -> bool:
    """The MLP's SwiGLU product goes straight to e4m3 rows (`fast_paths.fuse_swiglu_down`):
    FP8 with the SwiGLU fusion on and a frozen FP8 down_proj. Otherwise Liger's SwiGLU
    (where Liger is on) makes it."""
    down = r["down_proj"]
    return perf.fp8 and perf.fp8_swiglu and down.fp8 and not down.adapted


def shares(r: dict) -> dict:
    """The `fp8.SharedRows` role of each projection (`fast_paths.mark_fp8_siblings`)."""
    from kubetune.trainer.fast_paths import SIBLINGS, share_roles

    out = {}
    for names in SIBLINGS:
        if all(r[n].fp8 for n in names):
            out.update(zip(names, share_roles(len(names))))
    return out


class Layer:
    """One decoder layer with the run's routing, without the libraries' kernels (the
    `libraries` part's): their inputs and outputs have the same shapes either way."""

    def __init__(self, geo: Geometry, perf, device):
        import torch

        from kubetune.trainer import fp8

        self.geo, self.perf, self.device = geo, perf, device
        self.dtype = torch.bfloat16
        self.route = routes(geo, perf, fp8.pays)
        self.share = shares(self.route)
        self.bases, self.lora = {}, {}
        for name, route in self.route.items():
            n_in, n_out = geo.shape(name)
            self.bases[name] = self._base(n_in, n_out)
            if route.adapted:
                a = (torch.randn(geo.rank, n_in, device=device) / n_in ** 0.5).requires_grad_()
                b = torch.zeros(n_out, geo.rank, device=device).requires_grad_()
                self.lora[name] = (a, b)

    def _base(self, n_in: int, n_out: int):
        import torch

        w = torch.randn(n_out, n_in, device=self.device, dtype=self.dtype) * 0.02
        if not self.geo.quantized:
            lin = torch.nn.Linear(n_in, n_out, bias=False, device="meta")
            lin.weight = torch.nn.Parameter(w, requires_grad=False)
            return lin
        import bitsandbytes as bnb

        # As transformers' loader quantises a bf16 checkpoint: NF4, blocks of 64, uint8 storage.
        lin = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=self.dtype,
                                compress_statistics=self.geo.double_quant, quant_type="nf4", device="meta")
        lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=self.geo.double_quant,
                                       quant_type="nf4", quant_storage=torch.uint8).to(self.device)
        return lin

    def project(self, name: str, x):
        from kubetune.trainer.lora_kernels import dense_weight, frozen_linear_fp8, lora_linear

        base, route = self.bases[name], self.route[name]
        if route.fused:
            a, b = self.lora[name]
            return lora_linear(x, a, b, base, self.geo.scaling, self.geo.dropout, route.fp8, self.share.get(name))
        if route.adapted:  # PEFT's own forward: cuBLAS products, no Triton kernel
            a, b = self.lora[name]
            return x @ dense_weight(base, x.dtype).t() + (x @ a.to(x.dtype).t()) @ b.to(x.dtype).t() * self.geo.scaling
        if route.fp8:
            return frozen_linear_fp8(x, base, self.share.get(name))
        return x @ dense_weight(base, x.dtype).t()

    def mlp(self, x):
        import torch

        from kubetune.trainer.lora_kernels import frozen_swiglu_mlp_fp8, swiglu_down_fp8

        if swiglu_in_fp8(self.route, self.perf):
            if all(self.route[n].fp8 and not self.route[n].adapted for n in ("gate_proj", "up_proj")):
                return frozen_swiglu_mlp_fp8(x, self.bases["gate_proj"], self.bases["up_proj"],
                                             self.bases["down_proj"])
            return swiglu_down_fp8(self.project("gate_proj", x), self.project("up_proj", x),
                                   self.bases["down_proj"])
        h = torch.nn.functional.silu(self.project("gate_proj", x)) * self.project("up_proj", x)
        return self.project("down_proj", h)

    def step(self, tokens: int) -> None:
        """Forward and backward over `tokens` positions of one packed row."""
        import torch

        x = torch.randn(1, tokens, self.geo.hidden, device=self.device, dtype=self.dtype).requires_grad_()
        with torch.autocast(self.device.type, dtype=self.dtype):
            q, k, v = (self.project(n, x) for n in ("q_proj", "k_proj", "v_proj"))
            # Attention is cuBLAS / the varlen kernel, not Triton: its output has q's shape.
            x2 = x + self.project("o_proj", q)
            x3 = x2 + self.mlp(x2)
            loss = (x3.float() ** 2).sum() + k.float().sum() + v.float().sum()
        loss.backward()


def libraries_step(geo: Geometry, perf, device, tokens: int) -> None:
    """The libraries' kernels as the patched model calls them, forward and backward: where
    Liger is on, the RMSNorm (`rms_norm`, as Liger's Llama norm routed by fast_paths: the
    weight frozen as LoRA leaves it, with FP8 its output's e4m3 rows made by its kernel),
    its rotary embedding on q (1, heads, tokens, head_dim) and k, and its SwiGLU where the MLP
    does not take the FP8 one; and the LM head (`lm_head.one_pass_function`, TRL's kernels)."""
    import torch

    from kubetune.trainer import fp8
    from kubetune.trainer.lm_head import one_pass_function

    dt = torch.bfloat16
    loss = 0.0
    if perf.liger:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        from kubetune.trainer.rms_norm import frozen_add_skip_rms_norm, frozen_skip_rms_norm, use_frozen_backward

        x = torch.randn(1, tokens, geo.hidden, device=device, dtype=dt, requires_grad=True)
        norm = LigerRMSNorm(geo.hidden, eps=geo.eps).to(device, dt).requires_grad_(False)
        use_frozen_backward(norm)  # as fast_paths routes the model's norms
        norm._kubetune_offer_rows = bool(perf.fp8)  # and marks them (`fast_paths.mark_fp8_siblings`)
        loss = loss + (norm(x * 1.0).float() ** 2).sum()  # in place on its input: not on the leaf
        # and as the pre-norm decoder layers call it (`rms_norm.use_skip_norms`): its backward
        # adds the residual stream's gradient and sums its output's readers' (q / k / v: three)
        passed, *ys = frozen_skip_rms_norm(x * 1.0, norm.weight, norm.variance_epsilon, bool(perf.fp8), readers=3)
        loss = loss + sum((y.float() ** 2).sum() for y in (passed, *ys))
        # and the second norm of those layers, with the residual stream's add in its kernel (the
        # MLP's gate and up: two readers)
        passed, *ys = frozen_add_skip_rms_norm(x * 1.0, x * 2.0, norm.weight, norm.variance_epsilon, bool(perf.fp8),
                                               readers=2)
        loss = loss + sum((y.float() ** 2).sum() for y in (passed, *ys))
        fp8.shared_rows.clear()  # the rows they offered: no projection here takes them
        q = torch.randn(1, tokens, geo.heads, geo.head_dim, device=device, dtype=dt, requires_grad=True)
        k = torch.randn(1, tokens, geo.kv_heads, geo.head_dim, device=device, dtype=dt, requires_grad=True)
        angle = torch.rand(1, tokens, geo.head_dim, device=device)
        qr, kr = liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), angle.cos().to(dt), angle.sin().to(dt))
        loss = loss + (qr.float() ** 2).sum() + (kr.float() ** 2).sum()
        if not swiglu_in_fp8(routes(geo, perf, fp8.pays), perf):
            gate, up = (torch.randn(1, tokens, geo.intermediate, device=device, dtype=dt, requires_grad=True)
                        for _ in range(2))
            loss = loss + (LigerSiLUMulFunction.apply(gate, up).float() ** 2).sum()
    # The head's kernels see the (tokens x vocabulary) tile and per-token statistics only; the
    # hidden width enters cuBLAS products. A narrow head keeps the child's memory small (a 70B
    # model's full head is 2 GiB in bf16, beside a trainer still loading).
    hidden = torch.randn(tokens - 1, HEAD_WIDTH, device=device, dtype=dt, requires_grad=True)
    head = torch.randn(geo.vocab, HEAD_WIDTH, device=device, dtype=dt) * 0.02
    targets = torch.randint(0, geo.vocab, (tokens - 1,), device=device)
    with torch.autocast(device.type, dtype=dt):
        logprobs = one_pass_function().apply(hidden, head, None, targets, 1.0, 4096, None, 1.0, LM_HEAD_OUTPUTS)[0]
    (loss - logprobs.float().sum()).backward()


def _say(part: str, text: str) -> None:
    print(f"{PREFIX} {part}: {text}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    import argparse
    import importlib.util

    ap = argparse.ArgumentParser(prog="python -m kubetune.trainer.kernel_warmup", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="the trainer config (as `kubetune train --config`)")
    ap.add_argument("--part", choices=PARTS, default="layer", help="which kernels (module docstring)")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        from kubetune.trainer.config import load_config

        cfg = load_config(args.config)
        geo = geometry(cfg, read_model_config(cfg))
    except Exception as e:  # the trainer reports a bad config or model itself
        _say(args.part, f"skipped: {type(e).__name__}: {e}")
        return 0
    if geo is None:
        _say(args.part, f"skipped: not a Llama-style decoder ({', '.join(LLAMA_LIKE)})")
        return 0
    liger_found = importlib.util.find_spec("liger_kernel") is not None
    from kubetune.trainer import lazy_compile

    lazy_compile.import_bitsandbytes()
    import torch

    if not torch.cuda.is_available():
        _say(args.part, "skipped: no CUDA GPU")
        return 0
    from kubetune.trainer.kernel_cache import complete_entries, local_cache_dir
    from kubetune.trainer.train import resolve_performance

    device = torch.device("cuda", 0)
    perf = resolve_performance(cfg, cuda=True, local_rank=0, liger_found=liger_found)
    if perf.compile and args.part == "layer":
        _say(args.part, "training.performance.compile is on: Inductor's kernels are compiled in the first step")
    cache_dir = local_cache_dir()
    before = set(complete_entries(cache_dir))
    t1 = time.time()
    if args.part == "layer":
        layer = Layer(geo, perf, device)
        run = layer.step
    else:
        def run(n):
            libraries_step(geo, perf, device, n)
    for n in TOKENS:
        run(n)
    torch.cuda.synchronize(device)
    what = "" if args.part == "layer" else " (Liger and the LM head)" if perf.liger else " (the LM head; Liger off)"
    _say(args.part, f"{len(set(complete_entries(cache_dir)) - before)} cache entries compiled{what} in {time.time() - t1:.1f} s, "
                    f"after {t1 - t0:.1f} s of imports and setup ({geo.family}, hidden {geo.hidden})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
