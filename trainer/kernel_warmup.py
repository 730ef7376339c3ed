"""Compile the run's Triton kernels in a child process while the trainer imports and loads.

Why: a pod that finds no kernel cache (`kernel_cache.py`: a job's first pod, a new
GPU kind, new library versions) compiles about 17 Triton kernels (the FP8 casts, the
LoRA-dropout products, Liger's norms and rotary embedding, the LM head's folds)
one after the other, each when the first step first reaches it: 10.6-14.6 s of an
8B first step, after 11-19 s of imports and 7 s of loading in which no kernel is
compiled (bench/RESULTS.md, issue 16, seventh round).

Here `start()` (standard library only, so it runs before the trainer imports
torch) launches `python -m kubetune.trainer.kernel_warmup --config X`. That child
imports torch, triton and the kernel modules only (a few seconds, against the
trainer's transformers, peft and trl), builds one decoder layer of the model's
dimensions (read from its config.json) with the trainer's own nodes
(`lora_kernels`, Liger's functions, `lm_head`), routed as `fast_paths` routes the
real layers, and runs it forward and backward with the LM head. Each kernel
compiles with the arguments the run will give it and lands in Triton's cache
directory, where the trainer's first step finds it. Token counts are the one
data-dependent argument: the trainer's own kernels do not specialise on them
(`lora_dropout_kernels`), Liger's rotary embedding and norm do, so the layer runs
for a count that is a multiple of 16 and for one that is not.

Before its first step the trainer waits for the child (`settle`, at most
`WAIT_S`), so that the step finds the kernels complete and the child's GPU
memory free. Everything here is an optimisation: a child that cannot read the
model, fails or is too slow costs the compile it would have saved, never the run.
Where the job's kernel cache restored the kernels, the child is stopped (`cancel`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kubetune.contract import facts

WAIT_S = 60.0  # the most the trainer waits for the child before its first step
# One count a multiple of 16 and one not (Triton's integer specialisation), the odd one first:
# a packed micro-batch is rarely a multiple of 16. Small, so the child's memory stays small.
TOKENS = (397, 400)
# What TRL's SFTTrainer asks of its fused LM head (trl/trainer/sft_trainer.py, add_fused_lm_head):
# the optional outputs are constexpr flags of the head's kernels.
LM_HEAD_OUTPUTS = ("log_probs", "entropy", "is_top1")
# Decoder families with Llama's layer: q/k/v/o, gate/up/down with SiLU, RMSNorm, rotary embedding.
LLAMA_LIKE = ("llama", "mistral", "qwen2")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "kernel warm-up:"


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
    m = cfg.method
    targets = m.peft_target_modules
    heads = int(c["num_attention_heads"])
    hidden = int(c["hidden_size"])
    rank = int(m.r)
    return Geometry(
        family=family, hidden=hidden, intermediate=int(c["intermediate_size"]), heads=heads,
        kv_heads=int(c.get("num_key_value_heads") or heads), head_dim=int(c.get("head_dim") or hidden // heads),
        vocab=int(c["vocab_size"]), eps=float(c.get("rms_norm_eps", 1e-6)),
        quantized=m.type == "qlora" and m.quantization.bits == 4 and m.quantization.type == "nf4",
        double_quant=bool(m.quantization.double_quant), rank=rank,
        scaling=float(m.alpha) / (rank ** 0.5 if m.use_rslora else rank), dropout=float(m.dropout),
        adapted=adapted_projections(targets if isinstance(targets, list) else [], targets == "all-linear"),
        fusable=not m.use_dora and m.bias == "none")


# --------------------------------------------------------------------------
# The trainer's side: start the child, wait for it, stop it
# --------------------------------------------------------------------------

_child: Optional["Warmup"] = None


class Warmup:
    """The running child."""

    def __init__(self, process: subprocess.Popen, started: float):
        self.process, self.started = process, started

    def settle(self, timeout: float = WAIT_S) -> str:
        """Wait for the child (at most `timeout` s, then stop it); what happened, for the log."""
        try:
            code = self.process.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            self.stop()
            return f"{PREFIX} stopped after {timeout:.0f} s of waiting; the first step compiles what is left"
        waited = time.time() - self.started
        if code != 0:
            return f"{PREFIX} the child exited {code}; the first step compiles what it needs"
        return f"{PREFIX} done {waited:.1f} s after the trainer started"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wanted(cfg, env=os.environ, gpu_device: str = "/dev/nvidiactl") -> bool:
    """A child is worth starting: LoRA or QLoRA, the node's first process (the others share
    its Triton cache), an NVIDIA GPU in the pod, not turned off by KUBETUNE_KERNEL_WARMUP=0."""
    if env.get(facts.ENV_KERNEL_WARMUP, "1").strip() == "0":
        return False
    if env.get("LOCAL_RANK", "0") != "0":
        return False
    if env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return cfg.method.type in ("lora", "qlora") and os.path.exists(gpu_device)


def start(config_path: Path, cfg, **kw) -> Optional[Warmup]:
    """Launch the child for this config when `wanted`; its log lines go to the trainer's stderr."""
    global _child
    if not wanted(cfg, **kw):
        return None
    process = subprocess.Popen([sys.executable, "-m", "kubetune.trainer.kernel_warmup", "--config", str(config_path)],
                               stdin=subprocess.DEVNULL)
    _child = Warmup(process, time.time())
    return _child


def settle(timeout: float = WAIT_S) -> Optional[str]:
    """Before the first step: wait for this process's child, if it started one."""
    global _child
    child, _child = _child, None
    return child.settle(timeout) if child is not None else None


def cancel() -> bool:
    """Stop the child (the kernel cache brought the kernels); whether one was running."""
    global _child
    child, _child = _child, None
    if child is None:
        return False
    child.stop()
    return True


# --------------------------------------------------------------------------
# The child
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


class Layer:
    """One decoder layer and the LM head, built on the GPU with the run's routing."""

    def __init__(self, geo: Geometry, perf, device):
        import torch

        from kubetune.trainer import fp8

        self.geo, self.perf, self.device = geo, perf, device
        self.dtype = torch.bfloat16
        self.bases, self.lora = {}, {}
        self.fp8 = {}
        for name in PROJECTIONS:
            n_in, n_out = geo.shape(name)
            self.bases[name] = self._base(n_in, n_out)
            adapted = name in geo.adapted
            fused = adapted and geo.fusable and perf.fused_lora
            # fast_paths.fp8_base_products: a fused adapter's base product, or a frozen linear.
            self.fp8[name] = perf.fp8 and (fused or not adapted) and fp8.pays(n_in, n_out)
            if adapted:
                a = (torch.randn(geo.rank, n_in, device=device) / n_in ** 0.5).requires_grad_()
                b = torch.zeros(n_out, geo.rank, device=device).requires_grad_()
                self.lora[name] = (a, b, fused)
        self.share = self._shares()
        self.norm = torch.ones(geo.hidden, device=device, dtype=self.dtype)
        self.head = torch.randn(geo.vocab, geo.hidden, device=device, dtype=self.dtype) * 0.02

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

    def _shares(self) -> dict:
        from kubetune.trainer.fast_paths import SIBLINGS, share_roles

        share = {}
        for names in SIBLINGS:  # fast_paths.mark_fp8_siblings
            if all(self.fp8[n] for n in names):
                share.update(zip(names, share_roles(len(names))))
        return share

    def project(self, name: str, x):
        from kubetune.trainer.lora_kernels import dense_weight, frozen_linear_fp8, lora_linear

        base = self.bases[name]
        if name in self.lora:
            a, b, fused = self.lora[name]
            if fused:
                return lora_linear(x, a, b, base, self.geo.scaling, self.geo.dropout, self.fp8[name],
                                   self.share.get(name))
            # PEFT's own forward: cuBLAS products, no Triton kernel
            y = x @ dense_weight(base, x.dtype).t()
            return y + (x @ a.to(x.dtype).t()) @ b.to(x.dtype).t() * self.geo.scaling
        if self.fp8[name]:
            return frozen_linear_fp8(x, base, self.share.get(name))
        return x @ dense_weight(base, x.dtype).t()

    def rms(self, x):
        if not self.perf.liger:
            return x
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        norm = LigerRMSNorm(self.geo.hidden, eps=self.geo.eps).to(self.device, self.dtype)
        return norm(x)

    def mlp(self, x):
        import torch

        from kubetune.trainer.lora_kernels import frozen_swiglu_mlp_fp8, swiglu_down_fp8

        # fast_paths.fuse_swiglu_down: a frozen FP8 down_proj takes the SwiGLU product as e4m3 rows.
        if self.perf.fp8 and self.perf.fp8_swiglu and self.fp8["down_proj"] and "down_proj" not in self.lora:
            if all(self.fp8[n] and n not in self.lora for n in ("gate_proj", "up_proj")):
                return frozen_swiglu_mlp_fp8(x, self.bases["gate_proj"], self.bases["up_proj"],
                                             self.bases["down_proj"])
            return swiglu_down_fp8(self.project("gate_proj", x), self.project("up_proj", x),
                                   self.bases["down_proj"])
        gate, up = self.project("gate_proj", x), self.project("up_proj", x)
        if self.perf.liger:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            h = LigerSiLUMulFunction.apply(gate, up)
        else:
            h = torch.nn.functional.silu(gate) * up
        return self.project("down_proj", h)

    def step(self, tokens: int) -> None:
        """Forward and backward over `tokens` positions of one packed row."""
        import torch

        from kubetune.trainer.lm_head import one_pass_function

        g = self.geo
        x = torch.randn(1, tokens, g.hidden, device=self.device, dtype=self.dtype).requires_grad_()
        with torch.autocast(self.device.type, dtype=self.dtype):
            h = self.rms(x)
            q, k, v = (self.project(n, h) for n in ("q_proj", "k_proj", "v_proj"))
            q = q.view(1, tokens, g.heads, g.head_dim).transpose(1, 2)
            k = k.view(1, tokens, g.kv_heads, g.head_dim).transpose(1, 2)
            if self.perf.liger:
                from liger_kernel.transformers.rope import liger_rotary_pos_emb

                angle = torch.rand(1, tokens, g.head_dim, device=self.device)
                q, k = liger_rotary_pos_emb(q, k, angle.cos().to(self.dtype), angle.sin().to(self.dtype))
            # Attention is cuBLAS / the varlen kernel, not Triton: its output here is q's layout.
            attn = q.transpose(1, 2).reshape(1, tokens, g.heads * g.head_dim)
            x2 = x + self.project("o_proj", attn)
            x3 = x2 + self.mlp(self.rms(x2))
            hidden = self.rms(x3)[0, :-1]
            targets = torch.randint(0, g.vocab, (tokens - 1,), device=self.device)
            logprobs = one_pass_function().apply(hidden, self.head, None, targets, 1.0, 4096, None, 1.0,
                                                 LM_HEAD_OUTPUTS)[0]
            loss = -logprobs.float().sum() + k.float().sum() + v.float().sum()
        loss.backward()


def warm(geo: Geometry, perf, device, tokens=TOKENS) -> None:
    layer = Layer(geo, perf, device)
    for n in tokens:
        layer.step(n)
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _entries(cache_dir: Path) -> set:
    try:
        return {p.name for p in cache_dir.iterdir()}
    except OSError:
        return set()


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kubetune.trainer.kernel_warmup", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="the trainer config (as `kubetune train --config`)")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        from kubetune.trainer.config import load_config

        cfg = load_config(args.config)
        geo = geometry(cfg, read_model_config(cfg))
    except Exception as e:  # the trainer reports a bad config or model itself
        print(f"{PREFIX} skipped: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 0
    if geo is None:
        print(f"{PREFIX} skipped: not a Llama-style decoder ({', '.join(LLAMA_LIKE)})", file=sys.stderr, flush=True)
        return 0
    from kubetune.trainer import lazy_compile

    lazy_compile.import_bitsandbytes()
    import torch

    if not torch.cuda.is_available():
        print(f"{PREFIX} skipped: no CUDA GPU", file=sys.stderr, flush=True)
        return 0
    from kubetune.trainer.kernel_cache import local_cache_dir
    from kubetune.trainer.train import resolve_performance

    device = torch.device("cuda", 0)
    perf = resolve_performance(cfg, cuda=True, local_rank=0)
    if perf.compile:
        print(f"{PREFIX} training.performance.compile is on: Inductor's kernels are compiled in the first step",
              file=sys.stderr, flush=True)
    cache_dir = local_cache_dir()
    before = _entries(cache_dir)
    t1 = time.time()
    warm(geo, perf, device)
    new = len(_entries(cache_dir) - before)
    print(f"{PREFIX} {new} cache entries compiled in {time.time() - t1:.1f} s ({t1 - t0:.1f} s of imports), "
          f"one {geo.family} layer of hidden {geo.hidden}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
