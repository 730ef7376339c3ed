"""Trainer speed benchmark: the project's own `kubetune train` path on the
protocol's model and data, beside the team's reference recipe, same GPU,
same invocation.

    python3 bench/run.py --cases qlora-instruct,qlora-long,lora-instruct \\
        --reference B,pf --steps 30 --out $OUT

Each case runs in its own process (clean CUDA memory statistics): it writes
a TrainerConfig (synthetic "text" dataset, the random Llama-3-8B-shaped
model on local disk) and calls `kubetune.trainer.train.run_train`, exactly
what `kubetune train --config` does. Instrumentation only wraps it:
`load_model` and `dataset.prepare` are timed, and `BenchClock`, a
TrainerCallback added to the SFTTrainer the stage builds, times every
optimizer step (CUDA-synchronised) and counts non-pad tokens with a forward
pre-hook. Reported per case: non-pad tokens/s (median over the steady steps,
after `--warmup`), MFU (4*N per token, N = 7.5e9, 989 TFLOP/s dense bf16),
peak GPU memory of loading and of training alone (peak reset after
loading), time to first optimizer step split into load+quantize, data prep,
trainer setup and first step, and the loss curve.

Several GPUs (the multi-GPU scaling runs):

    python3 bench/run.py --cases qlora-instruct --launch accelerate --gpus 8 --strategy deepspeed-zero2 ...

runs each case under the operator's own train command
(`kubetune.operator.training.accelerate_args` for a FineTuneJob with
`gpusPerNode: 8` and that strategy, its DeepSpeed config rendered as the
operator renders the ConfigMap; bench/launch.py swaps only pod-specific
values), with this timed wrapper as the program instead of
`-m kubetune train`. Figures are per GPU (rank 0's tokens and steps); the
peak memory of every rank is recorded.

The large-model path (ZeRO-3 QLoRA on the Llama-3-70B shape; the model is
written shard by shard, about 141 GB of disk):

    python3 bench/run.py --model-shape 70b --cases qlora-instruct --launch accelerate --gpus 8 \
        --strategy deepspeed-zero3 --qlora-budget-gib 0 ...

`--timing events` times steps with CUDA events instead of a host sync per
step (the sync itself leaves the GPU idle while the host prepares the next
step; the reference recipe's own clock syncs, so the default keeps both
sides alike); `--log-every` sets training.logEvery (each logged step syncs
for the loss).

The reference recipe (`--reference-script`, default .bench/reference_recipe.py,
a copy of the team's) runs after the cases; the ratio to each reference
recipe is printed and everything is appended to `<out>/results.jsonl`.

Unsloth (`--unsloth 8x1`: rows per micro-batch x accumulation, a comma list)
runs after the reference, each setting in its own process
(bench/unsloth_recipe.py) with PYTHONPATH set to Unsloth's own install target
only (`--unsloth-site`, installed from `.whl/unsloth/` plus bitsandbytes and
pydantic from `.whl/`): its trl 1.15 and datasets 4.x never reach the cases,
nor the cases' trl and datasets it. Same random model, same data file.

Model folders: the cases read `--model-dir` (made once by synthetic.make_model;
the trainer only reads a base model). Each reference gets a folder of its own,
copied from it just before it runs and removed after (the reference recipe's
is the MODEL_DIR its script names; Unsloth's `<work>/models/unsloth-BxA`), so
no recipe can alter the model another one loads. Every folder is checked
against the fingerprint taken when the model was made (size, mtime and hashes
of every file) after each recipe; the result is in the record.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_PROCESS = time.time()
HERE = Path(__file__).resolve().parent
N_MATMUL = 7.5e9  # Llama-3-8B shape; matmul_params() gives it for any shape


def matmul_params(config) -> float:
    """Parameters that take part in a matrix product per token (the N of the 4·N
    FLOPs convention): every projection of every layer, plus the output head."""
    h, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = h // config.num_attention_heads * config.num_key_value_heads
    return float(layers * (h * (2 * h + 2 * kv) + 3 * h * ffn) + h * config.vocab_size)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}
# The reference recipe adapts these four projections: same work on both sides.
REFERENCE_TARGETS = "q_proj,k_proj,v_proj,o_proj"

CASES = {
    # name: (method, profile, maxLength)
    "qlora-instruct": ("qlora", "instruct", 2048),
    "qlora-long": ("qlora", "long", 4096),
    "lora-instruct": ("lora", "instruct", 2048),
    # a loss curve that falls (Zipf-distributed words), for the loss check of numerics changes
    "qlora-learn": ("qlora", "learn", 2048),
    # plumbing check of the harness itself on a CPU (with --tiny): no figures
    "cpu-smoke": ("lora", "instruct", 512),
}
# Long context (issue 16 item 3): "qlora-ctx<N>" is 8B QLoRA on packed rows of N tokens of
# the longctx profile (documents of median ~6k tokens, tail to 32k), e.g. qlora-ctx32768.
CTX_PREFIX = "qlora-ctx"


def case_spec(case: str) -> tuple[str, str, int]:
    """(method, data profile, dataset.maxLength) of a case name (CASES, or qlora-ctx<N>)."""
    if case in CASES:
        return CASES[case]
    if case.startswith(CTX_PREFIX) and case[len(CTX_PREFIX):].isdigit() and int(case[len(CTX_PREFIX):]) >= 256:
        return ("qlora", "longctx", int(case[len(CTX_PREFIX):]))
    raise KeyError(case)
# "<case>@<variant>" runs the same case with the config's training.performance
# section set so (same seed, data and micro-batches), as a FineTuneJob would set
# it: "plain" turns every fast path off, the loss-curve check; the others are
# candidate speed-ups measured one at a time.
VARIANTS = {
    "plain": {"attention": "sdpa", "liger": "off", "fusedLora": "off"},
    "compile": {"compile": "on"},
    "compile-noliger": {"compile": "on", "liger": "off"},
    "nofuse": {"fusedLora": "off"},
    "allgc": {"selectiveCheckpointing": "off"},
    "fp8": {"fp8": "on"},
    "bf16": {"fp8": "off"},
    # the same case on the code before a change (--before-site: that code's install target,
    # put first on the case's PYTHONPATH), for before/after figures in one invocation
    "before": {},
    # the same case with the trainer's background reading of its libraries and model
    # (off by default), for time-to-first-step figures on a cold page cache
    "prefetch": {},
    # the same case with PyTorch's expandable allocator segments, for what the allocator
    # reserves beyond what is allocated
    "expandable": {},
    # the same case with checkpointed layers keeping their attention output in the GPU memory
    # left over too (opt-in; on the host beside offloaded checkpoints is the default)
    "keepattn": {},
    # the same case with no kept attention outputs at all (not even on the host, the default)
    "nokeep": {},
    # the same case with the attention outputs kept on the host without the output projections'
    # outputs beside them (the default since the thirteenth round keeps both)
    "nokeepout": {},
    # the same case with the SwiGLU product quantised where it is made, and with the forward
    # FP8 products' fast accumulation (each opt-in when measured in issue 16's fifth round,
    # the default since); "noswiglu" and "noacc" turn them off
    "swiglu": {},
    "fastacc": {},
    "noswiglu": {},
    "noacc": {},
    # the same case with the input gradients' FP8 products accumulating fast too (opt-in when
    # measured in the sixth round, the default since); "nograd" turns it off
    "fastgrad": {},
    "nograd": {},
    # the same case with the host waiting where transformers and TRL make it wait (the sixth
    # round's change turned off: TRL's compact LM head, the packed-rows scan)
    "hostwaits": {},
    # the same case again, as the job's next pod (with --kernel-cache: it restores the kernels
    # an earlier case saved)
    "restart": {},
    # the same case with bitsandbytes imported as before the seventh round (with torch's
    # compiler stack: its fallback ops' torch.compile wrappers built at import)
    "eagerbnb": {},
    # the same case with its first step's host functions profiled (cProfile, whose overhead
    # lengthens that step: its time to the first step is not a measurement)
    "firstprof": {},
    # the same case without the child that compiles the run's kernels while the trainer
    # imports and loads (trainer/kernel_warmup.py, the default since the eighth round)
    "nowarm": {},
}
# What a variant sets in its case's environment instead of the config.
VARIANT_ENV = {
    "prefetch": {"KUBETUNE_PREFETCH": "1"},
    "expandable": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    "keepattn": {"KUBETUNE_KEEP_ATTENTION": "1"},
    "nokeep": {"KUBETUNE_KEEP_ATTENTION": "0"},
    "nokeepout": {"KUBETUNE_KEEP_OUTPUT": "0"},
    "swiglu": {"KUBETUNE_FP8_SWIGLU": "1"},
    "fastacc": {"KUBETUNE_FP8_FAST_ACCUM": "1"},
    "noswiglu": {"KUBETUNE_FP8_SWIGLU": "0"},
    "noacc": {"KUBETUNE_FP8_FAST_ACCUM": "0"},
    "fastgrad": {"KUBETUNE_FP8_FAST_ACCUM_GRAD": "1"},
    "nograd": {"KUBETUNE_FP8_FAST_ACCUM_GRAD": "0"},
    "hostwaits": {"KUBETUNE_AVOID_HOST_WAITS": "0"},
    "nowarm": {"KUBETUNE_KERNEL_WARMUP": "0"},
}


def gpu_busy_us(events) -> float:
    """Microseconds in which at least one GPU kernel ran (union of the kernel intervals):
    summing per-op device times double counts an op and its kernels."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy


def host_waits(events) -> list[str]:
    """Each stream synchronisation of a profiled step, as the ops it ran in (innermost
    first): where the host waited for the GPU, after which the GPU idles while the host
    catches up."""
    waits = []
    for e in events:
        if e.name != "cudaStreamSynchronize":
            continue
        chain, p = [], getattr(e, "cpu_parent", None)
        while p is not None and len(chain) < 4:
            chain.append(p.name)
            p = p.cpu_parent
        waits.append(" < ".join(chain) or "(no enclosing op)")
    return waits


def _kernels_and_launches(trace_events: list) -> tuple[list, dict]:
    """A chrome trace's GPU activity in time order, and each launch call by its correlation id."""
    gpu = sorted((e for e in trace_events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    launch = {e["args"].get("correlation"): e for e in trace_events
              if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    return gpu, launch


def gpu_gaps(trace_events: list, top: int = 12, least_us: float = 5.0) -> dict:
    """Where the GPU idled inside a profiled window (its chrome-trace events): each gap of at
    least `least_us` between the union of kernel intervals, largest first, with the kernels
    either side and the host ops that launched the kernel after it (innermost first) and that
    ran through it. A gap a host op spans is the host being late: a wait, or launch work the
    GPU outran."""
    gpu, launch = _kernels_and_launches(trace_events)
    if not gpu:
        return {"total_us": 0.0, "count": 0, "largest": []}
    ops = sorted((e for e in trace_events if e.get("cat") == "cpu_op" and e.get("ph") == "X"), key=lambda e: e["ts"])

    def enclosing(ts: float, tid) -> list[str]:
        inside = [o for o in ops if o["tid"] == tid and o["ts"] <= ts <= o["ts"] + o["dur"]]
        return [o["name"][:60] for o in sorted(inside, key=lambda o: o["dur"])[:4]]

    def spanning(a: float, b: float) -> list[str]:
        over = {}
        for o in ops:
            if o["ts"] >= b:
                break
            cut = min(b, o["ts"] + o["dur"]) - max(a, o["ts"])
            if cut > 0.5 * (b - a):
                over[o["name"][:60]] = max(over.get(o["name"][:60], 0), o["dur"])
        return [name for name, _ in sorted(over.items(), key=lambda kv: -kv[1])[:4]]

    gaps, end, before, t0 = [], gpu[0]["ts"] + gpu[0]["dur"], gpu[0], gpu[0]["ts"]
    for e in gpu[1:]:
        if e["ts"] - end >= least_us:
            gaps.append((e["ts"] - end, end, before, e))
        if e["ts"] + e["dur"] > end:
            end, before = e["ts"] + e["dur"], e
    largest = []
    for us, at, a, b in sorted(gaps, key=lambda g: -g[0])[:top]:
        by = launch.get(b.get("args", {}).get("correlation"))
        largest.append({"us": round(us, 1), "at_ms": round((at - t0) / 1000, 2), "after": a["name"][:60],
                        "before": b["name"][:60], "launched_in": enclosing(by["ts"], by["tid"]) if by else [],
                        "host_ops_through": spanning(at, at + us)})
    return {"total_us": round(sum(g[0] for g in gaps), 1), "count": len(gaps), "span_us": round(end - t0, 1),
            "largest": largest}


def host_lead(trace_events: list, bin_ms: float = 50.0) -> list[dict]:
    """Per `bin_ms` of a profiled window's GPU timeline: how long kernels ran in it, and by how
    much the host was ahead of the GPU there (the least time from a launch call's return to
    its kernel's start). A lead near 0 with the GPU short of busy is a host-bound stretch; a
    lead that stops growing is the launch queue full (the host then waits at each launch)."""
    gpu, launch = _kernels_and_launches(trace_events)
    if not gpu:
        return []
    t0, bins = gpu[0]["ts"], {}
    for e in gpu:
        b = bins.setdefault(int((e["ts"] - t0) // (bin_ms * 1000)), {"busy": 0.0, "lead": None})
        b["busy"] += e["dur"]
        by = launch.get(e.get("args", {}).get("correlation"))
        if by is not None:
            lead = e["ts"] - (by["ts"] + by["dur"])
            b["lead"] = lead if b["lead"] is None else min(b["lead"], lead)
    return [{"at_ms": round(i * bin_ms), "gpu_busy_ms": round(b["busy"] / 1000, 1),
             "host_lead_ms": None if b["lead"] is None else round(max(0.0, b["lead"]) / 1000, 1)}
            for i, b in sorted(bins.items())]


def drop_page_cache() -> bool:
    """Write dirty pages, then drop the page cache (Linux, root); False where refused."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def uncheckpointed_count(part: str):
    """N of an "unckpt<N>" variant (as a string), else None."""
    n = part[len("unckpt"):]
    return n if part.startswith("unckpt") and n.isdigit() else None


def max_tokens_of(part: str):
    """N of a "tok<N>" variant (as a string), else None."""
    n = part[len("tok"):]
    return n if part.startswith("tok") and n.isdigit() else None


def variant_env(variant: str) -> dict:
    """What a variant, or each part of "a+b", sets in its case's environment (VARIANT_ENV;
    "unckpt<N>": the last N layers uncheckpointed whatever the plan says; "tok<N>": the
    micro-batch plan's cap of N tokens instead of its default)."""
    out: dict = {}
    for part in variant.split("+"):
        if uncheckpointed_count(part) is not None:
            out["KUBETUNE_UNCHECKPOINTED_LAYERS"] = uncheckpointed_count(part)
        if max_tokens_of(part) is not None:
            out["KUBETUNE_MAX_AUTO_TOKENS"] = max_tokens_of(part)
        out.update(VARIANT_ENV.get(part, {}))
    return out


def variant_fields(variant: str) -> dict:
    """training.performance fields of a variant: VARIANTS, or "b<GiB>" / "allgc-b<GiB>" (a
    memory budget, every layer checkpointed with allgc-), e.g. b13.6; "a+b" takes both
    parts' fields (e.g. b9.6+keepattn)."""
    if "+" in variant:
        out = {}
        for part in variant.split("+"):
            out.update(variant_fields(part))
        return out
    if variant in VARIANTS:
        return dict(VARIANTS[variant])
    if uncheckpointed_count(variant) is not None or max_tokens_of(variant) is not None:
        return {}  # an environment setting only (variant_env)
    rest, out = variant, {}
    if rest.startswith("allgc-"):
        rest, out = rest[len("allgc-"):], {"selectiveCheckpointing": "off"}
    try:
        if rest.startswith("b") and float(rest[1:]) > 0:
            return {**out, "memoryBudgetGiB": float(rest[1:])}
    except ValueError:
        pass
    raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)}, b<GiB>, allgc-b<GiB>)")


def performance_section(case: str, variant: str, qlora_budget_gib: float) -> dict:
    """training.performance of one case: the memory budget the micro-batch
    planner may use (QLoRA cases: the reference's peak, the target's bound)
    and the variant's switches; everything else stays auto (the default a
    FineTuneJob gets)."""
    perf: dict = {}
    if case_spec(case)[0] == "qlora" and qlora_budget_gib > 0:
        perf["memoryBudgetGiB"] = qlora_budget_gib
    if variant:
        perf.update(variant_fields(variant))
    return perf


def trainer_config(case: str, model_dir: str, data: str, out: str, steps: int, batch, seed: int,
                   targets: str = REFERENCE_TARGETS, log_every: int = 1, strategy: str = "ddp",
                   variant: str = "", qlora_budget_gib: float = 0) -> dict:
    method, _, max_len = case_spec(case)
    training = {"maxSteps": steps, "batchSize": batch, "gradientAccumulation": 1, "learningRate": 2e-4,
                "packing": True, "seed": seed, "checkpointEvery": 100000, "logEvery": log_every}
    perf = performance_section(case, variant, qlora_budget_gib)
    if perf:
        training["performance"] = perf
    return {
        "baseModel": {"uri": model_dir},
        "dataset": {"uri": data, "format": "text", "validationSplit": 0.0, "maxLength": max_len},
        "method": {"type": method, "r": 16, "alpha": 32, "targetModules": targets if targets == "all-linear" else targets.split(",")},
        "training": training,
        "launch": {"strategy": strategy},
        "output": {"uri": out},
        "storage": {"cacheDir": str(Path(out).parent / "cache")},
    }


# ---------------------------------------------------------------- one case (child process)

def run_case(args) -> dict:
    try:  # as `kubetune train` does, before the heavy imports (the @before code may predate it)
        from kubetune.trainer import prefetch
    except ImportError:
        prefetch = None
    if prefetch is not None:
        prefetch.start(json.loads(args.config_json)["baseModel"]["uri"])
    try:  # the allocator `kubetune train` sets (the @before code may predate it)
        from kubetune.trainer import allocator
    except ImportError:
        allocator = None
    if allocator is not None:
        allocator.use_expandable_segments()
    try:  # as `kubetune train` does: a child compiles the run's kernels meanwhile (the @before code may predate it)
        from kubetune.trainer import kernel_warmup
    except ImportError:
        kernel_warmup = None
    if kernel_warmup is not None:
        from kubetune.trainer.config import parse_config

        config_file = Path(args.result_dir or tempfile.mkdtemp()) / f"trainer-config-{os.environ.get('RANK', '0')}.json"
        config_file.write_text(args.config_json)
        kernel_warmup.start(config_file, parse_config(json.loads(args.config_json)))
    try:  # as `kubetune train` does: bitsandbytes without torch's compiler stack (the @before code may predate it)
        from kubetune.trainer import lazy_compile
    except ImportError:
        lazy_compile = None
    if lazy_compile is not None and "eagerbnb" not in args.variant.split("+"):
        lazy_compile.import_bitsandbytes()
    import torch
    import trl
    from transformers import TrainerCallback

    import kubetune.trainer.dataset as dataset_mod
    import kubetune.trainer.train as train_mod
    from kubetune.trainer.config import parse_config

    t_imports = time.time()
    marks: dict = {}
    cuda = torch.cuda.is_available()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def max_mem():
        return torch.cuda.max_memory_allocated() if cuda else 0

    class BenchClock(TrainerCallback):
        def __init__(self):
            self.step_end, self.step_tokens, self.losses = [], [], {}
            self.events, self.first_end = [], None
            self.tokens = 0
            self.peak_train = 0

        def _count(self, module, a, kw):
            if not module.training:
                return
            am, ids = kw.get("attention_mask"), kw.get("input_ids")
            self.tokens += int(am.sum()) if am is not None else int(ids.numel())

        def on_step_begin(self, args, state, control, **kw):
            if first_step_profile and not self.step_end and getattr(self, "cprof", None) is None:
                import cProfile

                self.cprof = cProfile.Profile()
                self.cprof.enable()
            if args_profile_step and state.global_step + 1 == args_profile_step and getattr(self, "prof", None) is None:
                from torch.profiler import ProfilerActivity, profile

                sync()
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                self.prof = profile(activities=acts, record_shapes=True)
                self.prof.__enter__()
                self.prof_t = time.time()

        def _end_first_step_profile(self):
            import io
            import pstats

            self.cprof.disable()
            out = io.StringIO()
            stats = pstats.Stats(self.cprof, stream=out)
            out.write("FIRST STEP, host functions by cumulative time (cProfile; its overhead included)\n")
            stats.sort_stats("cumulative").print_stats(70)
            out.write("\nBY OWN TIME\n")
            stats.sort_stats("tottime").print_stats(40)
            Path(first_step_profile).write_text(out.getvalue())

        def _end_profile(self):
            import gzip
            import tempfile

            sync()
            wall = time.time() - self.prof_t
            self.prof.__exit__(None, None, None)
            ka = self.prof.key_averages()
            busy_us = gpu_busy_us(self.prof.events())
            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp) / "trace.json"
                self.prof.export_chrome_trace(str(raw))
                trace = raw.read_bytes()
            events = json.loads(trace).get("traceEvents", [])
            gaps = gpu_gaps(events)
            steps = f"steps {args_profile_step}-{args_profile_step + args_profile_span - 1}" if args_profile_span > 1 \
                else f"step {args_profile_step}"
            marks["profile"] = {"step": args_profile_step, "span": args_profile_span, "wall_s": round(wall, 4),
                                "gpu_busy_s": round(busy_us / 1e6, 4), "gpu_idle_s": round(wall - busy_us / 1e6, 4),
                                "host_waits": host_waits(self.prof.events()),
                                "gpu_gaps": {k: v for k, v in gaps.items() if k != "largest"}}
            if args.profile_out:
                Path(args.profile_out).write_text(
                    f"{steps}: wall {wall:.4f}s, GPU busy {busy_us / 1e6:.4f}s (union of kernel intervals)\n\n"
                    + ka.table(sort_by="self_device_time_total", row_limit=50, max_name_column_width=80)
                    + "\n\nBY INPUT SHAPE\n" + self.prof.key_averages(group_by_input_shape=True).table(
                        sort_by="self_device_time_total", row_limit=40, max_name_column_width=60)
                    + "\n\nBY SELF CPU\n" + ka.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=80)
                    + "\n\nGPU GAPS (>= 5 us between kernels, largest first)\n" + json.dumps(gaps, indent=1)
                    + "\n\nHOST LEAD (per 50 ms of the GPU timeline: kernel time in it, least lead of a launch)\n"
                    + "\n".join(json.dumps(row) for row in host_lead(events)))
                # The timeline shows where the GPU waits for the host (chrome://tracing, Perfetto).
                with gzip.open(str(Path(args.profile_out).with_suffix(".trace.json.gz")), "wb") as dst:
                    dst.write(trace)
            self.prof = None

        def on_train_begin(self, args, state, control, model=None, **kw):
            sync()
            marks["train_begin"] = time.time()
            model.register_forward_pre_hook(self._count, with_kwargs=True)

        def on_step_end(self, args, state, control, **kw):
            if getattr(self, "prof", None) is not None and state.global_step >= args_profile_step + args_profile_span - 1:
                self._end_profile()
            if getattr(self, "cprof", None) is not None and not self.step_end:
                sync()
                self._end_first_step_profile()
            if events_timing:
                # A CUDA event in stream order instead of a host sync per step: the sync
                # itself idles the GPU while the host prepares the next step.
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                self.events.append(ev)
                if self.first_end is None:
                    sync()
                    self.first_end = time.time()
            else:
                sync()
                self.step_end.append(time.time())
            self.step_tokens.append(self.tokens)
            self.tokens = 0
            self.peak_train = max(self.peak_train, max_mem())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses[state.global_step] = logs["loss"]

    rank = int(os.environ.get("RANK", "0"))
    args_profile_step = args.profile_step if rank == 0 else 0
    args_profile_span = args.profile_span
    # @firstprof: the first step's host functions (cProfile), into the logs beside the case's
    first_step_profile = (args.profile_out and rank == 0 and "firstprof" in args.variant.split("+")
                          and str(Path(args.profile_out).with_name(Path(args.profile_out).stem + "_first_step.txt")))
    events_timing = cuda and args.timing == "events"
    clock = BenchClock()
    real_load, real_prepare = train_mod.load_model, dataset_mod.prepare

    def load_model(*a, **kw):
        t = time.time()
        m = real_load(*a, **kw)
        sync()
        marks["load_s"] = time.time() - t
        marks["load_peak"] = max_mem()
        marks["after_load"] = torch.cuda.memory_allocated() if cuda else 0
        marks["attn"] = m.get_base_model().config._attn_implementation
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        marks["after_load_t"] = time.time()
        return m

    def prepare(*a, **kw):
        t = time.time()
        d = real_prepare(*a, **kw)
        marks["data_prep_s"] = time.time() - t
        return d

    class BenchSFTTrainer(trl.SFTTrainer):
        def __init__(self, *a, callbacks=None, **kw):
            super().__init__(*a, callbacks=[*(callbacks or []), clock], **kw)
            marks["micro_batch"] = self.args.per_device_train_batch_size
            marks["gradient_checkpointing"] = self.args.gradient_checkpointing
            marks["activation_offloading"] = bool(getattr(self.args, "activation_offloading", False))
            # The plan's layer choices, as the trainer applies them (train.py adds at most one).
            chosen = next((c for c in callbacks or [] if type(c).__name__ == "SelectiveCheckpointing"), None)
            marks["uncheckpointed_layers"] = getattr(chosen, "layers", 0)
            marks["kept_attention_layers"] = getattr(chosen, "kept_attention", 0)
            marks["kept_attention_on_host"] = bool(getattr(chosen, "kept_on_host", False))
            marks["kept_output_on_host"] = bool(getattr(chosen, "kept_output", False))

    train_mod.load_model, dataset_mod.prepare, trl.SFTTrainer = load_model, prepare, BenchSFTTrainer

    cfg = parse_config(json.loads(args.config_json), source="bench")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    result = train_mod.run_train(cfg)
    assert result.exit_code == 0, f"train stage exited {result.exit_code}"

    if events_timing:
        sync()
        clock.step_end = [clock.first_end + clock.events[0].elapsed_time(e) / 1000 for e in clock.events]
    ends, toks = clock.step_end, clock.step_tokens
    profiled = range(args.profile_step, args.profile_step + args.profile_span) if args.profile_step else range(0)
    steady = [i for i in range(args.warmup, len(ends)) if i + 1 not in profiled]
    if len(steady) < 20:
        print(f"warning: only {len(steady)} steady steps (protocol: >= 20)", flush=True)
    rates = [toks[i] / (ends[i] - ends[i - 1]) for i in steady]
    sec = [ends[i] - ends[i - 1] for i in steady]
    tps = statistics.median(rates)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in gpu), 989e12)
    from transformers import AutoConfig

    n_matmul = matmul_params(AutoConfig.from_pretrained(cfg.base_model.uri))
    first_step = ends[0] - marks["train_begin"]
    return {
        "case": args.case + (f"@{args.variant}" if args.variant else ""),
        "method": cfg.method.type,
        "profile": case_spec(args.case)[1],
        "max_length": cfg.dataset.max_length,
        "micro_batch_rows": marks.get("micro_batch"),
        "gradient_checkpointing": marks.get("gradient_checkpointing"),
        "activation_offloading": marks.get("activation_offloading"),
        "peak_gib_reserved": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else 0,
        "uncheckpointed_layers": marks.get("uncheckpointed_layers", 0),
        "kept_attention_layers": marks.get("kept_attention_layers", 0),
        "kept_attention_on_host": marks.get("kept_attention_on_host", False),
        "kept_output_on_host": marks.get("kept_output_on_host", False),
        "attention": marks.get("attn"),
        "steps": len(ends),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "strategy": cfg.launch.strategy,
        "timing": "events" if events_timing else "sync",
        "log_every": cfg.training.log_every,
        "steady_steps": len(rates),
        "tokens_per_step_median": statistics.median(toks[i] for i in steady),
        "sec_per_step_median": round(statistics.median(sec), 4),
        "tokens_per_s": round(tps),
        "tokens_per_s_min_max": [round(min(rates)), round(max(rates))],
        "mfu_4N": round(4 * n_matmul * tps / peak, 4),
        "model_matmul_params": n_matmul,
        "peak_gib_load": round(marks["load_peak"] / 2**30, 2),
        "after_load_gib": round(marks["after_load"] / 2**30, 2),
        "peak_gib_train": round(clock.peak_train / 2**30, 2),
        "ttfs": {
            "process_start_to_first_step_s": round(ends[0] - T_PROCESS, 1),
            "imports_s": round(t_imports - T_PROCESS, 1),
            "data_prep_s": round(marks["data_prep_s"], 1),
            "load_quantize_s": round(marks["load_s"], 1),
            "trainer_setup_s": round(marks["train_begin"] - marks["after_load_t"], 1),
            "first_step_s": round(first_step, 1),
            "run_train_to_first_step_s": round(ends[0] - t0, 1),
        },
        "loss": {str(k): round(v, 4) for k, v in sorted(clock.losses.items())},
        "profile": marks.get("profile"),
        "performance": cfg.training.performance.model_dump(by_alias=True, exclude_none=True),
        # the debugging overrides, if any were set around the bench (they win over the config), and the
        # allocator settings (@expandable)
        "env": {k: v for k, v in os.environ.items() if k.startswith("KUBETUNE_") or k == "PYTORCH_CUDA_ALLOC_CONF"},
    }


# ---------------------------------------------------------------- parent

def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for n in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "liger_kernel", "datasets", "kubetune"):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out


def git_commit() -> str | None:
    """The commit the code came from: what bench/prepare_device.sh wrote into .bench/commit
    (the GPU machine's copy of the tree can carry older git metadata than its files), else
    git's HEAD."""
    stamp = HERE.parent / ".bench" / "commit"
    if stamp.is_file() and stamp.read_text().strip():
        return stamp.read_text().strip()
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def fresh_dir(path: Path) -> Path:
    """Every case starts from nothing: no checkpoint to resume from."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path.parent / "cache" / "runs", ignore_errors=True)
    return path


def loss_checks(results: list[dict]) -> dict:
    """Per "<case>@<variant>" run beside its plain "<case>": the largest step-wise
    loss difference over the steps both logged (absolute, and relative to the
    variant's loss), keyed "<case>@<variant>". Against "@plain" it is the evidence
    that the fast paths train the same model; against the others, that a
    candidate speed-up does. A combined "<case>@<a>+<b>" is paired with
    "<case>@<a>" when that ran (what <b> adds), else with "<case>"; where "<case>" did
    not run either, with "<case>@bf16" (a change to the FP8 numerics against bf16
    products, the issue's loss check). "against" names the pair's other run."""
    done = {r["case"]: r for r in results if not r.get("failed")}
    out = {}
    for name, other in done.items():
        if "@" not in name:
            continue
        case = name.split("@")[0]
        candidates = ([name.rsplit("+", 1)[0]] if "+" in name else []) + [case, f"{case}@bf16"]
        against = next((c for c in candidates if c in done and c != name), None)
        if against is None:
            continue
        base = done[against]
        steps = sorted(set(base["loss"]) & set(other["loss"]), key=int)
        if not steps:
            continue
        diffs = [abs(base["loss"][k] - other["loss"][k]) for k in steps]
        rel = [d / max(abs(other["loss"][k]), 1e-12) for d, k in zip(diffs, steps)]
        out[name] = {"against": against, "steps": len(steps), "max_abs_diff": round(max(diffs), 5), "max_rel_diff": round(max(rel), 5),
                     "first": [base["loss"][steps[0]], other["loss"][steps[0]]],
                     "last": [base["loss"][steps[-1]], other["loss"][steps[-1]]]}
    return out


# ---------------------------------------------------------------- model folders, Unsloth's process

def fingerprint(model_dir: str | Path) -> dict:
    """What identifies the model's files: per file (relative path) its size, a sha256 of
    the whole file (small ones) or of its first and last MiB (weight shards: hashing 16 GB
    would cost more than a step), and its mtime (any write in the middle of a shard moves
    it)."""
    import hashlib

    root = Path(model_dir)
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        st = f.stat()
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            if st.st_size <= 64 * 2**20:
                h.update(fh.read())
            else:
                h.update(fh.read(2**20))
                fh.seek(st.st_size - 2**20)
                h.update(fh.read(2**20))
        out[str(f.relative_to(root))] = [st.st_size, h.hexdigest(), st.st_mtime_ns]
    return out


def model_changes(expected: dict, found: dict, mtimes: bool = True) -> list[str]:
    """Files added, removed or changed in a model folder, each prefixed with what happened
    (mtimes=False: content only, for a copy, whose file system may not keep mtimes)."""
    n = 3 if mtimes else 2
    return ([f"added {k}" for k in sorted(set(found) - set(expected))]
            + [f"removed {k}" for k in sorted(set(expected) - set(found))]
            + [f"changed {k}" for k in sorted(set(expected) & set(found)) if expected[k][:n] != found[k][:n]])


def copy_model(src: str | Path, dest: str | Path, expected: dict) -> tuple[float, dict]:
    """A fresh folder for one recipe: `dest` removed, then `src` copied into it. Refuses
    when `src` no longer matches the fingerprint taken when it was made (so that one
    recipe's alteration cannot reach the next one's copy) or the copy differs from it.
    Returns the seconds spent and the copy's own fingerprint, to check it against after
    the recipe ran."""
    changed = model_changes(expected, fingerprint(src))
    if changed:
        raise RuntimeError(f"model folder {src} changed since it was made: {changed[:5]}")
    if Path(dest).resolve() == Path(src).resolve():
        raise ValueError(f"a recipe's own model folder cannot be the source folder {src}")
    t = time.time()
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    secs = time.time() - t
    copied = fingerprint(dest)
    changed = model_changes(expected, copied, mtimes=False)
    if changed:
        raise RuntimeError(f"copy {dest} differs from {src}: {changed[:5]}")
    return secs, copied


def regenerate_model(src: str | Path, dest: str | Path, expected: dict, maker) -> tuple[float, dict]:
    """A fresh folder for one recipe where the disk holds one copy only (the 70B model
    written already quantised, 37 GB, on a 64 GiB disk): `src` (checked first, as
    copy_model does) is removed, and `maker(dest)` writes the model again from the same
    seed; the result must equal the fingerprint taken when it was first made (content:
    sizes and hashes). Returns the seconds spent and the new folder's fingerprint."""
    src, dest = Path(src), Path(dest)
    if src.exists():
        changed = model_changes(expected, fingerprint(src))
        if changed:
            raise RuntimeError(f"model folder {src} changed since it was made: {changed[:5]}")
    if dest.resolve() == src.resolve():
        raise ValueError(f"a recipe's own model folder cannot be the source folder {src}")
    t = time.time()
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    maker(dest)
    secs = time.time() - t
    made = fingerprint(dest)
    changed = model_changes(expected, made, mtimes=False)
    if changed:
        raise RuntimeError(f"{dest} made again differs from the first {src}: {changed[:5]}")
    return secs, made


def reference_model_dir(script: str | Path) -> Path:
    """The folder the reference recipe loads (its script's MODEL_DIR line): the harness
    fills it with a fresh copy of the benchmark model before the recipe runs."""
    import re

    found = re.findall(r"^MODEL_DIR\s*=\s*[\"']([^\"']+)[\"']", Path(script).read_text(), flags=re.M)
    if len(found) != 1:
        raise ValueError(f"{script}: expected one MODEL_DIR = '...' line, found {len(found)}")
    return Path(found[0])


# Wheels of the cases' folder (.whl/) that Unsloth's install target takes too: the
# packages its own folder (.whl/unsloth/) does not hold and the GPU image lacks.
UNSLOTH_SHARED_WHEELS = ("bitsandbytes", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
                         "dill", "multiprocess")


def wheel_name(path: str | Path) -> str:
    """The distribution name of a wheel file, normalised (PEP 503/427: lower case, '_')."""
    import re

    return re.sub(r"[-_.]+", "_", Path(path).name.split("-")[0]).lower()


def unsloth_install_cmd(python: str, own: str | Path, shared: str | Path, site: str | Path) -> list[str]:
    """pip line that installs Unsloth's own target: every wheel of `own` (.whl/unsloth:
    unsloth, unsloth_zoo, trl 1.15, datasets 4.x, ...) and, from `shared` (.whl), only the
    UNSLOTH_SHARED_WHEELS that `own` lacks. One version of each name (pip stops on two)."""
    own_w = sorted(Path(own).glob("*.whl"))
    if not own_w:
        raise FileNotFoundError(f"no wheels in {own} (bench/fetch_wheels.sh --unsloth prepares them)")
    names = [wheel_name(w) for w in own_w]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two versions of {dup} in {own}")
    extra = [w for w in sorted(Path(shared).glob("*.whl")) if wheel_name(w) in UNSLOTH_SHARED_WHEELS
             and wheel_name(w) not in names]
    extra_names = [wheel_name(w) for w in extra]
    dup = sorted({n for n in extra_names if extra_names.count(n) > 1})
    if dup:
        raise ValueError(f"two versions of {dup} in {shared}")
    return [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
            "--upgrade", "--target", str(site), *map(str, own_w), *map(str, extra)]


def unsloth_env(base: dict, site: str | Path) -> dict:
    """Environment of Unsloth's process: its own install target is the whole PYTHONPATH
    (the cases' target, with trl 1.16 and datasets 5, is not on it); no network (the GPU
    machine has none: Unsloth's statistics download and hub look-ups are turned off)."""
    env = dict(base)
    env["PYTHONPATH"] = str(site)
    env.update(UNSLOTH_DISABLE_STATISTICS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def parse_unsloth(spec: str) -> list[tuple[int, int, str]]:
    """'8x1,1x1:qlora-ctx16384' -> [(8, 1, 'qlora-instruct'), (1, 1, 'qlora-ctx16384')]: rows
    per micro-batch x gradient accumulation, and the case whose data and maxLength it takes
    (default qlora-instruct)."""
    out = []
    for part in [p for p in spec.split(",") if p]:
        setting, _, case = part.partition(":")
        b, sep, a = setting.partition("x")
        if not sep or not b.isdigit() or not a.isdigit() or int(b) < 1 or int(a) < 1:
            raise ValueError(f"--unsloth takes BxA settings such as 8x1 (or 8x1:CASE), got {part!r}")
        case = case or "qlora-instruct"
        try:
            if case_spec(case)[0] != "qlora":
                raise ValueError(f"--unsloth {part!r}: Unsloth runs the QLoRA cases only")
        except KeyError:
            raise ValueError(f"--unsloth {part!r}: unknown case {case!r}") from None
        out.append((int(b), int(a), case))
    return out


def unsloth_name(batch: int, accum: int, case: str) -> str:
    return f"unsloth-{batch}x{accum}" + ("" if case == "qlora-instruct" else f"-{case}")


def unsloth_cmd(python: str, script: str | Path, model_dir: str | Path, data: str | Path, batch: int, accum: int,
                steps: int, warmup: int, seed: int, max_length: int, targets: str, result: str | Path,
                output_dir: str | Path, log_every: int) -> list[str]:
    return [python, str(script), "--model-dir", str(model_dir), "--data", str(data), "--max-length", str(max_length),
            "--batch", str(batch), "--accum", str(accum), "--steps", str(steps), "--warmup", str(warmup),
            "--seed", str(seed), "--targets", targets, "--result", str(result), "--output-dir", str(output_dir),
            "--log-every", str(log_every)]


def rows_of(args, profile: str) -> int:
    """Rows of a profile's data file: --rows, or --rows-longctx for the long documents."""
    return args.rows_longctx if profile == "longctx" else args.rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="qlora-instruct")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3, help="optimizer steps left out of the steady-state median")
    ap.add_argument("--batch", default="auto", help="training.batchSize: auto or rows per micro-batch")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--targets", default=REFERENCE_TARGETS, help="LoRA target modules: comma list or all-linear")
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--rows-longctx", type=int, default=200,
                    help="rows of the longctx profile (median ~6k tokens each: 200 rows are 1.5M tokens)")
    ap.add_argument("--model-dir", default=None,
                    help="where the cases' random model is made once (default /tmp/llama<shape>-kubetune); each "
                         "reference gets a copy in a folder of its own (the reference recipe's: its MODEL_DIR, "
                         "/tmp/llama8b-rand), made just before it runs and removed after")
    ap.add_argument("--work", default="/tmp/kubetune-bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reference", default="", help="reference recipes to run too: comma list of A, B, pf")
    ap.add_argument("--reference-script", default=str(HERE.parent / ".bench" / "reference_recipe.py"))
    ap.add_argument("--unsloth", default="",
                    help="Unsloth settings to run too, each in its own process and model folder: comma list of "
                         "BxA (rows per micro-batch x gradient accumulation), e.g. 8x1")
    ap.add_argument("--unsloth-script", default=str(HERE / "unsloth_recipe.py"))
    ap.add_argument("--unsloth-site", default="/tmp/site-unsloth",
                    help="Unsloth's own install target (the whole PYTHONPATH of its process)")
    ap.add_argument("--unsloth-wheels", default=str(HERE.parent / ".whl" / "unsloth"),
                    help="installed into --unsloth-site first (with bitsandbytes and pydantic from the folder above); "
                         "'' to use the target as it is")
    ap.add_argument("--unsloth-steps", type=int, default=0, help="Unsloth's optimizer steps (0: --steps)")
    ap.add_argument("--reference-models", choices=["copy", "regenerate"], default="copy",
                    help="how each reference gets its own model folder: a copy of the cases' (default), or, where the "
                         "disk holds one model only, the cases' folder removed after the cases ran and the model "
                         "written again from the same seed, checked equal")
    ap.add_argument("--keep-model-copies", action="store_true",
                    help="leave each reference's model folder in place (default: removed after it ran, for disk)")
    ap.add_argument("--deadline-s", type=float, default=0,
                    help="seconds from start after which no recipe starts; each one is stopped at it (0: none), so "
                         "that a device call's limit still leaves the record written")
    ap.add_argument("--before-site", default="",
                    help="install target of the code before a change, for the @before variant")
    ap.add_argument("--fresh-triton-cache", action="store_true",
                    help="each case gets an empty TRITON_CACHE_DIR of its own (its first step compiles every kernel, "
                         "as on a fresh pod)")
    ap.add_argument("--kernel-cache", action="store_true",
                    help="the cases share one kernel cache store, as the pods of one job do (output.kernelCacheUri, "
                         "trainer/kernel_cache.py): with --fresh-triton-cache the first case compiles and saves, the "
                         "later ones restore; the @restart variant names a case run again for that")
    ap.add_argument("--cold-cache", action="store_true",
                    help="empty the machine's page cache before each case (needs root): its imports and model load "
                         "read from the disk, as on a fresh node; the record says whether it was emptied")
    ap.add_argument("--label", default="", help="free text stored with the results (what changed)")
    ap.add_argument("--logs", default="", help="folder for each case's full output")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model with a 1k vocabulary (harness smoke test)")
    ap.add_argument("--model-shape", default="8b", choices=["8b", "8b-128k", "70b", "70b-nf4", "8b-nf4"],
                    help="Llama-3 shape of the random model (70b: the ZeRO-3 large-model path; about 141 GB on disk; "
                         "70b-nf4: written already quantised, about 37 GB, for 70B QLoRA on one GPU)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--config-json", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--profile-step", type=int, default=0,
                    help="profile this optimizer step (torch.profiler tables into --logs; the step is left out of the median)")
    ap.add_argument("--profile-span", type=int, default=1,
                    help="with --profile-step: profile this many steps from it in one window (2 or more: the window "
                         "holds step boundaries, where the host prepares the next batch)")
    ap.add_argument("--timing", choices=["sync", "events"], default="sync",
                    help="step clock: a host sync per step (as the reference recipe times itself) or CUDA events "
                         "(no sync; what a user's run does)")
    ap.add_argument("--log-every", type=int, default=1,
                    help="training.logEvery (1: a loss per step for the loss check; every logged step syncs)")
    ap.add_argument("--launch", choices=["in-process", "accelerate"], default="in-process",
                    help="run each case in a plain child process, or under the operator's own `accelerate launch` line")
    ap.add_argument("--gpus", type=int, default=1, help="with --launch accelerate: processes (GPUs) on this machine")
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "deepspeed-zero2", "deepspeed-zero3"],
                    help="launch.strategy (and, with --launch accelerate, the launcher's DeepSpeed flags)")
    ap.add_argument("--port", type=int, default=None, help="rendezvous port under --launch accelerate")
    ap.add_argument("--qlora-budget-gib", type=float, default=15.6,
                    help="training.performance.memoryBudgetGiB of the QLoRA cases (0: the trainer's default)")
    args = ap.parse_args()

    if args.case:  # child: one per rank under accelerate launch; rank 0's record is the case's
        res = run_case(args)
        # A file per rank: the ranks share one stdout, where long lines interleave.
        Path(args.result_dir, f"rank-{int(os.environ.get('RANK', '0'))}.json").write_text(json.dumps(res))
        return 0

    sys.path.insert(0, str(HERE))
    from synthetic import make_dataset, make_model

    work = Path(args.work).resolve()  # children run inside it
    args.model_dir = str(Path(args.model_dir or f"/tmp/llama{args.model_shape}-kubetune").resolve())
    try:
        unsloth_settings = parse_unsloth(args.unsloth)
    except ValueError as e:
        ap.error(str(e))
    ref_dir = reference_model_dir(args.reference_script).resolve() if args.reference else None
    if ref_dir is not None and ref_dir == Path(args.model_dir):
        ap.error(f"--model-dir {args.model_dir} is the reference recipe's own model folder: give the cases another")
    work.mkdir(parents=True, exist_ok=True)
    vocab = 1024 if args.tiny else 128256
    if args.model_shape.endswith("-nf4"):  # written already quantised (bitsandbytes 4-bit checkpoint)
        from synthetic import make_model_nf4

        def maker(d):
            return make_model_nf4(d, shape="tiny" if args.tiny else args.model_shape[:-len("-nf4")])
    else:
        def maker(d):
            return make_model(d, tiny=args.tiny, shape=None if args.tiny else args.model_shape)
    made = maker(args.model_dir)
    model_fp = fingerprint(args.model_dir)
    print(f"model ready ({made:.0f}s to make)", flush=True)

    def time_left() -> float | None:
        return None if not args.deadline_s else args.deadline_s - (time.time() - T_PROCESS)

    def child_timeout(what: str) -> float | None:
        left = time_left()
        if left is not None and left < 45:
            raise TimeoutError(f"{what}: not started, {left:.0f}s left before --deadline-s")
        return None if left is None else left - 15  # 15 s to write the record

    results, data_stats = [], {}
    if args.kernel_cache:
        shutil.rmtree(work / "kernel-cache", ignore_errors=True)  # the invocation's first case compiles
    if args.logs:
        Path(args.logs).mkdir(parents=True, exist_ok=True)  # the profile is written into it mid-run
    for spec in [c for c in args.cases.split(",") if c]:
        case, _, variant = spec.partition("@")
        slug = spec.replace("@", "_").replace("+", "-")  # file names of this case
        try:
            profile = case_spec(case)[1]
        except KeyError:
            ap.error(f"unknown case {case!r}; known: {', '.join(CASES)}, {CTX_PREFIX}<N>")
        data = work / f"{profile}.jsonl"
        if profile not in data_stats:
            data_stats[profile] = make_dataset(data, rows_of(args, profile), profile, seed=args.seed, vocab_size=vocab)
        batch = args.batch if args.batch == "auto" else int(args.batch)
        cfg = trainer_config(case, args.model_dir, str(data), str(fresh_dir(work / f"out-{slug}")), args.steps, batch, args.seed,
                             args.targets, args.log_every, args.strategy, variant, args.qlora_budget_gib)
        if args.kernel_cache:
            cfg["output"]["kernelCacheUri"] = str(work / "kernel-cache")
        result_dir = work / f"result-{slug}"
        shutil.rmtree(result_dir, ignore_errors=True)
        result_dir.mkdir(parents=True)
        program = [__file__, "--case", case, "--config-json", json.dumps(cfg), "--warmup", str(args.warmup),
               "--timing", args.timing, "--result-dir", str(result_dir),
               "--variant", variant, "--profile-step", str(args.profile_step), "--profile-span", str(args.profile_span)]
        if args.logs and args.profile_step:
            program += ["--profile-out", str(Path(args.logs) / f"profile_{slug}.txt")]
        env = dict(os.environ)
        if variant == "before":
            if not args.before_site:
                ap.error("the @before variant needs --before-site")
            env["PYTHONPATH"] = os.pathsep.join([args.before_site] + [x for x in [env.get("PYTHONPATH")] if x])
        env.update(variant_env(variant))
        cold = drop_page_cache() if args.cold_cache else None
        if args.fresh_triton_cache:  # this case compiles every Triton kernel itself (a fresh pod's first step)
            shutil.rmtree(work / f"triton-{slug}", ignore_errors=True)
            env["TRITON_CACHE_DIR"] = str(work / f"triton-{slug}")
        if args.launch == "accelerate":
            # The operator's train command with the timed wrapper as its program (the wrapper
            # calls run_train exactly as `-m kubetune train --config` does).
            from launch import launcher_args

            ds_file = work / f"deepspeed-{args.strategy}.json"
            launcher, _, ds = launcher_args(case_spec(case)[0], args.strategy, args.gpus, work / "unused.yaml", ds_file,
                                            port=args.port)
            if ds:
                ds_file.write_text(ds)
            cmd = launcher + program
        else:
            cmd = [sys.executable] + program
        t = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work, timeout=child_timeout(spec))
        except (subprocess.TimeoutExpired, TimeoutError) as e:
            print(f"case {spec} STOPPED: {e}", flush=True)
            results.append({"case": spec, "failed": True, "rc": None, "stderr_tail": str(e)})
            continue
        if args.logs:
            Path(args.logs).mkdir(parents=True, exist_ok=True)
            (Path(args.logs) / f"{slug}.log").write_text(proc.stdout[-200000:] + "\n--- stderr\n" + proc.stderr[-200000:])
        rank_files = sorted(result_dir.glob("rank-*.json"), key=lambda f: int(f.stem.split("-")[1]))
        if proc.returncode != 0 or not (result_dir / "rank-0.json").is_file():
            print(f"case {spec} FAILED (rc {proc.returncode}, {time.time() - t:.0f}s)\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}",
                  flush=True)
            results.append({"case": spec, "failed": True, "rc": proc.returncode, "stderr_tail": proc.stderr[-1500:]})
            continue
        ranks = [json.loads(f.read_text()) for f in rank_files]
        r = ranks[0]
        r["launch"] = " ".join(cmd[3:cmd.index(__file__)]) if args.launch == "accelerate" else "in-process"
        if cold is not None:
            r["cold_cache"] = cold  # page cache emptied before this case (False: refused)
        r["peak_gib_train_per_rank"] = [x["peak_gib_train"] for x in ranks]
        r["tokens_per_s_per_rank"] = [x["tokens_per_s"] for x in ranks]
        r["config"] = cfg
        r["data"] = data_stats[profile]
        r["model_dir"] = args.model_dir
        r["pythonpath"] = env.get("PYTHONPATH")
        r["triton_cache_dir"] = env.get("TRITON_CACHE_DIR")
        r["kernel_cache"] = [ln for ln in proc.stdout.splitlines() if ln.startswith("kernel cache:")]
        r["model_dir_changes"] = model_changes(model_fp, fingerprint(args.model_dir))
        results.append(r)
        print(f"case {spec}: {r['tokens_per_s']} tok/s, MFU {r['mfu_4N']:.3f}, peak train {r['peak_gib_train']} GiB "
              f"(load {r['peak_gib_load']}), micro-batch {r['micro_batch_rows']}x{r['max_length']} gc={r['gradient_checkpointing']} (last {r['uncheckpointed_layers']} layers without, {r.get('kept_attention_layers', 0)} keeping attention{' on the host' if r.get('kept_attention_on_host') else ''}{' with o_proj' if r.get('kept_output_on_host') else ''}), "
              f"first step after {r['ttfs']['process_start_to_first_step_s']}s, loss {list(r['loss'].values())[-1:]}", flush=True)

    def run_reference(name: str, cmd: list[str], env: dict, cwd: Path, model_dir: Path) -> tuple[str, dict]:
        """One reference recipe on a fresh copy of the model in its own folder: the copy,
        the run (log kept), the folder's check afterwards; the folder removed after."""
        info: dict = {"model_dir": str(model_dir)}
        copied = None
        try:
            if args.reference_models == "regenerate":
                secs, copied = regenerate_model(args.model_dir, model_dir, model_fp, maker)
                info["model_regenerated_s"] = round(secs, 1)
            else:
                secs, copied = copy_model(args.model_dir, model_dir, model_fp)
                info["model_copy_s"] = round(secs, 1)
            t = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=child_timeout(name))
            info["wall_s"] = round(time.time() - t, 1)
            info["rc"] = proc.returncode
            out, err = proc.stdout, proc.stderr
        except (subprocess.TimeoutExpired, TimeoutError, RuntimeError, ValueError, OSError) as e:
            info["rc"], info["error"] = None, f"{type(e).__name__}: {e}"
            out = (e.stdout or "") if isinstance(e, subprocess.TimeoutExpired) else ""
            err = (e.stderr or "") if isinstance(e, subprocess.TimeoutExpired) else ""
            out, err = (out.decode() if isinstance(out, bytes) else out), (err.decode() if isinstance(err, bytes) else err)
        if copied is not None and model_dir.is_dir():
            info["model_dir_changes"] = model_changes(copied, fingerprint(model_dir))
            if info["model_dir_changes"]:
                print(f"{name} CHANGED its model folder {model_dir}: {info['model_dir_changes'][:5]}", flush=True)
            if not args.keep_model_copies:
                shutil.rmtree(model_dir, ignore_errors=True)
        if args.logs:
            (Path(args.logs) / f"{name}.log").write_text(out[-200000:] + "\n--- stderr\n" + err[-200000:])
        if info["rc"] != 0:
            print(f"{name} FAILED ({info.get('error') or 'rc ' + str(info['rc'])})\n{out[-2000:]}\n{err[-4000:]}", flush=True)
            info["stderr_tail"] = err[-1500:]
        return out, info

    refs, ref_info = [], {}
    if args.reference:
        script = Path(args.reference_script).resolve()
        out_text, ref_info = run_reference(
            "reference", [sys.executable, script.name, *args.reference.split(",")], dict(os.environ, OUT=str(work)),
            script.parent, ref_dir)
        refs = [json.loads(l[7:]) for l in out_text.splitlines() if l.startswith("RESULT ")]

    unsloth, unsloth_info = [], {}
    if unsloth_settings:
        site = Path(args.unsloth_site)
        if args.unsloth_wheels:
            t = time.time()
            pip = subprocess.run(unsloth_install_cmd(sys.executable, args.unsloth_wheels, Path(args.unsloth_wheels).parent,
                                                     site), capture_output=True, text=True)
            unsloth_info["install_s"] = round(time.time() - t, 1)
            if pip.returncode != 0:
                print(f"Unsloth's install FAILED\n{pip.stderr[-3000:]}", flush=True)
                unsloth_info["install_error"] = pip.stderr[-1500:]
        unsloth_info["site"] = str(site)
        targets = ("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" if args.targets == "all-linear"
                   else args.targets)
        for batch, accum, ucase in unsloth_settings:
            _, uprofile, umax_len = case_spec(ucase)
            data = work / f"{uprofile}.jsonl"  # the cases' own rows (same generator, seed and file)
            if uprofile not in data_stats:
                data_stats[uprofile] = make_dataset(data, rows_of(args, uprofile), uprofile, seed=args.seed, vocab_size=vocab)
            name = unsloth_name(batch, accum, ucase)
            if "install_error" in unsloth_info:
                unsloth.append({"name": name, "failed": True, "error": "install failed"})
                continue
            rdir = work / name
            shutil.rmtree(rdir, ignore_errors=True)
            rdir.mkdir(parents=True)
            cmd = unsloth_cmd(sys.executable, Path(args.unsloth_script).resolve(), work / "models" / name, data, batch,
                              accum, args.unsloth_steps or args.steps, args.warmup, args.seed, umax_len,
                              targets, rdir / "result.json", rdir / "out", args.log_every)
            _, info = run_reference(name, cmd, unsloth_env(os.environ, site), rdir, work / "models" / name)
            res = json.loads((rdir / "result.json").read_text()) if (rdir / "result.json").is_file() else {
                "name": name, "failed": True}
            res.update(info)
            if info["rc"] != 0:
                res["failed"] = True
            if ucase != "qlora-instruct":  # the recipe names its setting only; the case tells the runs apart
                res["name"] = f"{res.get('name', name)}-{ucase}"
            res["data"] = data_stats[uprofile]
            res["case"] = ucase
            res["max_length"] = umax_len
            unsloth.append(res)
            if not res.get("failed"):
                print(f"{name}: {res['tokens_per_s']} tok/s, peak train {res['peak_gib_train']} GiB "
                      f"(with load {res['peak_mem_gib']}), attention {res.get('attention')}", flush=True)

    import torch

    regenerated = args.reference_models == "regenerate" and bool(args.reference or unsloth_settings)
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": versions(),
        "commit": git_commit(),
        "label": args.label,
        "results": results,
        "reference": refs,
        "reference_run": ref_info,
        "unsloth": unsloth,
        "unsloth_run": unsloth_info,
        "model": {"dir": args.model_dir, "made_s": round(made, 1),
                  # regenerate: the cases' folder made way for each reference's (one copy on the disk)
                  "changes_at_end": [] if regenerated else model_changes(model_fp, fingerprint(args.model_dir)),
                  "reference_models": args.reference_models},
    }
    ratios = {}
    for r in results:
        if r.get("failed"):
            continue
        for ref in refs:
            ratios[f"{r['case']}/{ref['name']}"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 2)
    record["ratio_vs_reference"] = ratios
    ok_unsloth = [u for u in unsloth if not u.get("failed") and u.get("tokens_per_s")]
    # each case against Unsloth on the same data and maxLength ("qlora-ctx16384@allgc-b80" with "...-qlora-ctx16384")
    record["ratio_vs_unsloth"] = {f"{r['case']}/{u['name']}": round(r["tokens_per_s"] / u["tokens_per_s"], 2)
                                  for r in results if not r.get("failed") for u in ok_unsloth
                                  if r["case"].split("@")[0] == u.get("case", "qlora-instruct")}
    record["memory_vs_unsloth"] = {f"{r['case']}/{u['name']}": round(r["peak_gib_train"] / u["peak_gib_train"], 2)
                                   for r in results if not r.get("failed") for u in ok_unsloth
                                   if r["case"].split("@")[0] == u.get("case", "qlora-instruct") and u.get("peak_gib_train")}
    record["unsloth_vs_reference"] = {f"{u['name']}/{ref['name']}": round(u["tokens_per_s"] / ref["tokens_per_s"], 2)
                                      for u in ok_unsloth for ref in refs}
    record["loss_check"] = loss_checks(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print("\n{:<16} {:>9} {:>6} {:>9} {:>9} {:>8}".format("case", "tok/s", "MFU", "peak GiB", "load GiB", "1st step"))
    for r in results:
        if not r.get("failed"):
            print("{:<16} {:>9} {:>6.3f} {:>9} {:>9} {:>7}s".format(r["case"], r["tokens_per_s"], r["mfu_4N"], r["peak_gib_train"],
                                                              r["peak_gib_load"], r["ttfs"]["process_start_to_first_step_s"]))
    for ref in refs:
        print("{:<16} {:>9} {:>6.3f} {:>9}  (reference)".format(ref["name"], ref["tokens_per_s"], ref["mfu_4N_vs_989TF"], ref["peak_mem_gib"]))
    for u in ok_unsloth:
        print("{:<16} {:>9} {:>6.3f} {:>9} {:>9}  (Unsloth, {}s to first step)".format(
            u["name"], u["tokens_per_s"], u["mfu_4N_vs_989TF"], u["peak_gib_train"], u["peak_gib_load"],
            u["ttfs"]["process_start_to_first_step_s"]))
    print("ratios:", json.dumps(ratios), json.dumps(record["ratio_vs_unsloth"]), json.dumps(record["unsloth_vs_reference"]),
          flush=True)
    if record["loss_check"]:
        print("loss check (case vs its variant, same seed):", json.dumps(record["loss_check"]), flush=True)
    # a recipe that altered its model folder fails the run too: its figure was measured on
    # the model it was given, but a folder it changes must be seen, not just recorded
    altered = ([r["case"] for r in results if r.get("model_dir_changes")]
               + (["reference"] if ref_info.get("model_dir_changes") else [])
               + [u["name"] for u in unsloth if u.get("model_dir_changes")])
    ok = (all(not r.get("failed") for r in results) and len(ok_unsloth) == len(unsloth)
          and ref_info.get("rc", 0) == 0 and not record["model"]["changes_at_end"] and not altered)
    if altered:
        print(f"model folders altered by: {altered}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
