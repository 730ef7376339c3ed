"""Ceiling probe: how fast can one GPU run LoRA/QLoRA steps on the benchmark
model with the trainer's fast paths, outside any trainer loop?

Not the benchmark (bench/run.py measures the project's `kubetune train`
path); this isolates the model's step time so that the gap between the two
is the trainer's own overhead. Packed micro-batches of synthetic tokens
(lognormal sample lengths, one concatenated row, position_ids restarting per
sample), fused AdamW over the adapter, several micro-batch sizes and
gradient-checkpointing settings on one loaded model.

python3 bench/probe_speed.py --model-dir /tmp/llama8b-rand --quant nf4 --tokens 8192,16384 --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import PROFILES  # noqa: E402

from kubetune.contract.recipe import MethodSpec, PerformanceSpec  # noqa: E402
from kubetune.trainer import fast_paths, fp8, packed_attention, performance  # noqa: E402

N_MATMUL = 7.5e9
PEAK_FLOPS = 989e12


def packed_batch(tokens: int, profile: str, rng: random.Random, vocab: int):
    mu, sigma, lo, cap = PROFILES[profile]
    lens = []
    while sum(lens) < tokens:
        lens.append(int(min(cap, max(lo, rng.lognormvariate(mu, sigma)))))
    lens[-1] -= sum(lens) - tokens
    if lens[-1] < 1:
        lens.pop()
        lens[-1] += tokens - sum(lens)
    ids = torch.randint(3, vocab, (1, tokens))
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    labels = ids.clone()
    # first token of each sample has no target inside the sample
    starts = torch.tensor([0] + [sum(lens[:i]) for i in range(1, len(lens))])
    labels[0, starts] = -100
    return ids.cuda(), pos.cuda(), labels.cuda()


def load(model_dir: str, quant: str, targets: str = "all-linear"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # training.performance: auto on this GPU, as the trainer resolves it (FP8 for the NF4 base)
    perf = performance.resolve(PerformanceSpec(), method=MethodSpec(type="qlora" if quant == "nf4" else "lora"),
                               strategy="ddp", cuda=True, fp8_capable=fp8.supported(torch.device("cuda")),
                               varlen_capable=packed_attention.varlen_available(),
                               liger_installed=fast_paths.liger_installed())
    kw = {}
    if quant == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": 0},
                                                 attn_implementation=packed_attention.attention_implementation(perf.attention), **kw)
    torch.cuda.synchronize()
    load_s = time.time() - t
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets if targets == "all-linear" else targets.split(","),
                                             task_type="CAUSAL_LM"))
    fast_paths.apply_fast_paths(model, perf)
    return model, load_s, perf


def step(model, opt, batch, autocast: bool) -> float:
    ids, pos, labels = batch
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, position_ids=pos, labels=labels)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss


def profile_one(model, opt, batch, autocast: bool, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(model, opt, batch, autocast)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=90)
    kernels_only = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=90)
    Path(path).write_text(table + "\n\nBY SELF CUDA TIME\n" + kernels_only)


def run(model, tokens: int, steps: int, gc: bool, profile: str, seed: int, autocast: bool = True,
        profile_path: str | None = None) -> dict:
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    rng = random.Random(seed)
    vocab = model.get_base_model().config.vocab_size
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    try:
        for i in range(steps):
            batch = packed_batch(tokens, profile, rng, vocab)
            torch.cuda.synchronize()
            t = time.perf_counter()
            loss = step(model, opt, batch, autocast)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            losses.append(float(loss))
        if profile_path:
            profile_one(model, opt, batch, autocast, profile_path)
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return {"tokens": tokens, "gc": gc, "oom": True, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    steady = times[3:]
    med = statistics.median(steady)
    tps = tokens / med
    return {"tokens": tokens, "gc": gc, "autocast": autocast, "profile": profile, "steps": steps, "sec_per_step": round(med, 4),
            "tokens_per_s": round(tps), "mfu_4N": round(4 * N_MATMUL * tps / PEAK_FLOPS, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "first_step_s": round(times[0], 2),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    ap.add_argument("--tokens", default="8192,16384")
    ap.add_argument("--gc", default="1", help="comma list of 1/0 per --tokens entry, or one value for all")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="LoRA targets: comma list or all-linear")
    ap.add_argument("--profile", default="instruct")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-autocast", action="store_true", help="run without bf16 autocast (the HF Trainer uses it)")
    ap.add_argument("--profile-dir", default=None, help="write a torch.profiler table of one extra step per config")
    a = ap.parse_args()
    torch.cuda.reset_peak_memory_stats()
    model, load_s, perf = load(a.model_dir, a.quant, a.targets)
    base = {"quant": a.quant, "load_s": round(load_s, 1), "attn": model.get_base_model().config._attn_implementation,
            "liger": perf.liger, "fp8": perf.fp8, "load_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "after_load_gib": round(torch.cuda.memory_allocated() / 2**30, 2)}
    print("PROBE", json.dumps(base), flush=True)
    toks = [int(x) for x in a.tokens.split(",")]
    gcs = [x == "1" for x in a.gc.split(",")]
    if len(gcs) == 1:
        gcs = gcs * len(toks)
    for t, gc in zip(toks, gcs):
        prof = f"{a.profile_dir}/profile_{a.quant}_{t}_gc{int(gc)}.txt" if a.profile_dir else None
        r = {**base, **run(model, t, a.steps, gc, a.profile, seed=t, autocast=not a.no_autocast, profile_path=prof)}
        print("PROBE", json.dumps(r), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
