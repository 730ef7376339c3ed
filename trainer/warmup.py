"""Compile the first step's GPU kernels while the trainer is still starting up.

Why: on a fresh pod Triton compiles every kernel of the first step (Liger's
norm, SwiGLU and RoPE, the FP8 quantisers, forward and backward) only when
that step runs, after the imports, the data and the model load, one after the
other: 5-7 s of the 40 s from start to the first optimizer step on 8B
(bench/RESULTS.md). A child process started first thing runs the same code on
a one-layer model of the same shape (the trainer's own `load_model`, so the
same quantisation, fast paths and attention) and fills the Triton cache the
trainer then reads (the same `TRITON_CACHE_DIR`), while the parent imports,
tokenizes and loads.

The child gets the trainer config on its stdin at once and the model folder
when the parent has it (after a download); it imports torch and the rest in
the meantime. It writes nothing but the cache and a temporary folder of its
own, and any failure of it only means the first step compiles as before: the
parent never fails because of it. Only on a machine with an NVIDIA device,
and only one per node (local rank 0).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

# token counts of the warm-up batches: Triton specialises integer arguments on
# divisibility by 16, and a packed micro-batch's token count may or may not be
WARMUP_TOKENS = (1024, 1021)
WAIT_S = 60.0  # the most the parent waits for it before its first step


def wanted(env: Optional[dict] = None) -> bool:
    """A warm-up child pays here: an NVIDIA device node (no torch import needed to know),
    the node's first local rank, and not switched off (KUBETUNE_KERNEL_WARMUP=0)."""
    env = os.environ if env is None else env
    if env.get("KUBETUNE_KERNEL_WARMUP", "").strip() == "0":
        return False
    if env.get("LOCAL_RANK", "0") not in ("", "0"):
        return False
    return os.path.exists("/dev/nvidiactl")


class KernelWarmup:
    """The parent's handle on the child: `start` before the heavy imports,
    `model_ready` once the model folder is local, `finish` before the first step."""

    def __init__(self, proc: Optional[subprocess.Popen] = None):
        self.proc = proc
        self.err = None
        self.started = time.time()

    @classmethod
    def start(cls, config: dict[str, Any], enabled: Optional[bool] = None) -> "KernelWarmup":
        if not (wanted() if enabled is None else enabled):
            return cls(None)
        import tempfile

        try:
            # its log in a file, not a pipe: nobody reads a pipe until the end, and a full one would stall it
            err = tempfile.TemporaryFile(mode="w+", prefix="kubetune-warmup-")
            proc = subprocess.Popen([sys.executable, "-m", "kubetune.trainer.warmup"], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=err, text=True)
            proc.stdin.write(json.dumps(config) + "\n")
            proc.stdin.flush()
        except (OSError, ValueError) as e:
            log.info("kernel warm-up not started: %s", e)
            return cls(None)
        handle = cls(proc)
        handle.err = err
        return handle

    def model_ready(self, model_dir: Path | str) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.write(str(model_dir) + "\n")
            self.proc.stdin.close()
        except (OSError, ValueError):  # the child is gone: nothing to wait for
            pass

    def finish(self, wait_s: float = WAIT_S) -> Optional[int]:
        """Wait (at most `wait_s`) for the child, then make sure it is gone. Returns its exit
        code (None: it was not started or had to be stopped)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        try:
            if proc.stdin and not proc.stdin.closed:
                proc.stdin.close()
        except OSError:
            pass
        try:
            rc = proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        err = ""
        if self.err is not None:
            self.err.seek(0)
            err = self.err.read()[-500:]
            self.err.close()
            self.err = None
        # one line in the pod's log either way: whether the first step found its kernels compiled
        if rc == 0:
            print(f"kernel warm-up: done {time.time() - self.started:.1f} s after start", flush=True)
        elif rc is None:
            print(f"kernel warm-up: stopped after waiting {wait_s:.0f} s (the first step compiles the rest)", flush=True)
        else:
            print(f"kernel warm-up: failed (rc {rc}; the first step compiles instead): {' '.join(err.split())[-400:]}",
                  flush=True)
        return rc


def one_layer_config(config):
    """The model's transformers config cut to one decoder layer and a small vocabulary:
    every per-layer shape (hence every kernel) stays the model's."""
    import copy

    small = copy.deepcopy(config)
    text = small.get_text_config() if hasattr(small, "get_text_config") else small
    text.num_hidden_layers = 1
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[:1]
    text.vocab_size = 512
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(text, name, None) is not None and not isinstance(getattr(text, name), list) and getattr(text, name) >= 512:
            setattr(text, name, 0)
    return small


def packed_batch(tokens: int, vocab: int, device):
    """One packed row of `tokens` tokens holding two samples (position_ids restart at 0)."""
    import torch

    first = tokens // 2
    pos = torch.cat([torch.arange(first), torch.arange(tokens - first)]).unsqueeze(0).to(device)
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    return {"input_ids": ids, "position_ids": pos, "labels": ids.clone()}


def run(cfg_dict: dict[str, Any], model_dir: str, allow_cpu: bool = False) -> int:
    """In the child: load a one-layer model of `model_dir`'s shape through the trainer's
    own `load_model` (quantisation, LoRA, fast paths, attention as the run resolves them)
    and run forward + backward with checkpointing on the warm-up batches. Without CUDA it
    does nothing (`allow_cpu`: the same steps on the CPU, for the tests). Returns 0."""
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune.trainer.config import parse_config
    from kubetune.trainer.train import load_model, resolve_precision

    cuda = torch.cuda.is_available()
    if not cuda and not allow_cpu:
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    cfg = parse_config(cfg_dict, source="warmup")
    precision = resolve_precision(cfg, cuda, cuda and torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    config = one_layer_config(AutoConfig.from_pretrained(model_dir))
    with tempfile.TemporaryDirectory(prefix="kubetune-warmup-") as tmp:
        with torch.device(device):
            small = AutoModelForCausalLM.from_config(config, dtype=dtype)
        small.save_pretrained(tmp)
        del small
        model = load_model(cfg, Path(tmp), cuda=cuda, precision=precision, local_rank=0)
    model.to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    vocab = model.get_input_embeddings().weight.shape[0]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for tokens in WARMUP_TOKENS:
            out = model(**packed_batch(tokens, vocab, device), use_cache=False)
            out.loss.backward()
    if cuda:
        torch.cuda.synchronize()
    return 0


def main() -> int:
    cfg_line = sys.stdin.readline()
    # the slow part first, while the parent imports too
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import kubetune.trainer.train  # noqa: F401

    model_dir = sys.stdin.readline().strip()
    if not cfg_line.strip() or not model_dir:
        return 0
    return run(json.loads(cfg_line), model_dir)


if __name__ == "__main__":
    sys.exit(main())
