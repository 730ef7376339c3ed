"""Every supported model family: the attention the trainer picks for packed rows
gives the logits of the library's own attention run on each sample alone
(issue 15, GPU item).

For each family (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3) a
small random-weight model is built from its transformers config (a few
layers, the family's real head layout and head dims). The attention is the
one `performance.resolve` picks with `training.performance.attention: auto`
on this machine: the varlen kernel (`trainer/packed_attention.py`) where the
kernel runs and the family allows it, else the library's own (`sdpa`, or
`eager` for Gemma 2's soft-capped logits). A packed micro-batch, built as the
trainer's padding-free collator builds it (one row, position_ids restarting at
0 per sample, cu_seq_lens / max_length kwargs; TRL's own collator when TRL
imports), goes through the model with that attention; the reference is the
library's attention (`packed_attention.library_attention`) run on each sample
alone, unpacked. Both in the model's dtype (bf16 on a GPU); the same model
upcast to fp32 with eager attention, per sample, is the exact answer both are
also measured against.

The windowed families get a window (256 tokens) narrower than the longest
sample (dataset.maxLength 1024; the row holds a sample of exactly maxLength, one
of window+1, one of window, one of 1 token), so a dropped window would show.
Extra cases: a window equal to maxLength (the largest window the trainer
still serves with varlen: `varlen_unfit`'s boundary) for Mistral, Phi-3 and
Gemma 3, and Qwen2 with `use_sliding_window`.

Reported: the packed logits against the reference (||packed - reference|| /
||reference||, max |packed - reference|, that over max |reference|). Pass: the
packed logits are as close to the exact fp32 answer as the library's own
attention is in the same dtype (`bound` below: within twice its error, never
tighter than the dtype's floor), for the collator's batch and for position_ids
alone, every logit finite. Controls show that the bound would catch a real
error: the same packed row without position_ids (samples attend across their
boundaries) and, on CUDA, for a family that falls back, the varlen kernel
forced with its run-time guard switched off (the window / soft-cap dropped:
what the fallback avoids). Each control must land above the bound, or the pass
would prove nothing.

On a CPU (no varlen kernel) every family gets the library's attention, as the
trainer does there: the check is then the library's packed masks (sdpa / eager
with block-diagonal and window masks from position_ids) against per sample;
the report says what a varlen-capable GPU would pick. `--tiny` shrinks every
size (CPU tests).

    python3 bench/check_attention_families.py [--tiny] [--families llama,gemma2]
        [--no-extra] [--seed N] [--json out.json]

Exits non-zero when a family fails or a control does not detect its error.
The H200 run: bench/attention_families_h200.json, bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")

# The tolerance. Both bf16 paths are roundings of one function: the same bf16 weights upcast to fp32,
# eager attention, each sample alone, computes it exactly (TF32 off). bf16 keeps 8 significant bits
# (unit roundoff 2^-9 = 2e-3) and every layer rounds its activations a dozen times, so a whole bf16
# model lands 1e-2..3e-2 from the exact logits (measured on these models, CPU, before the GPU run:
# the library's per-sample path 2.8e-2 for Llama, 3.0e-2 Gemma 2, 8.5e-3 Gemma 3), and two correct
# bf16 paths that sum in different orders (varlen flash vs sdpa, packed vs per-sample GEMM shapes)
# differ from each other by as much: a fixed bound on packed-vs-reference near 1e-2 would fail correct
# paths by chance. So the bound is the library's own error in this run, on these inputs:
#     ||packed - exact|| / ||exact||  <=  max(FACTOR * ||reference - exact|| / ||exact||, FLOOR[dtype])
# The two paths round at the same places (same model, same dtype; only the attention kernel and the
# matrix shapes differ), so a correct fast path's error is of the library's size (ratio 1.00 on the CPU
# runs); FACTOR 2 leaves room for a kernel that rounds its softmax differently. FLOOR: no model path in
# that dtype is held tighter than a single operation's error (bf16 operands: up to 1e-2, METHOD.md of
# the device notes; fp32: 1e-7 a product, 1e-5 over a few layers). A real error (cross-sample
# attention, a dropped window or soft-cap) lands at 1e-1 and above: the controls measure it.
FACTOR = 2.0
FLOOR = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def _project():
    """kubetune.trainer from this checkout: the installed package where there is one, else the
    folders of this repository (pyproject maps kubetune.trainer to trainer/), which is how the GPU
    machine runs it without this project's wheel."""
    try:
        from kubetune.trainer import packed_attention, performance
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("kubetune"):
            raise
        sys.path.append(str(ROOT))  # appended: the checkout's operator/ must not shadow the stdlib's
        import kubetune

        spec = importlib.util.spec_from_file_location(
            "kubetune.trainer", ROOT / "trainer" / "__init__.py", submodule_search_locations=[str(ROOT / "trainer")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["kubetune.trainer"] = mod
        spec.loader.exec_module(mod)
        kubetune.trainer = mod
        from kubetune.trainer import packed_attention, performance
    from kubetune.contract.recipe import MethodSpec, PerformanceSpec

    return packed_attention, performance, MethodSpec, PerformanceSpec


# ---------------------------------------------------------------- sizes and configs


@dataclass(frozen=True)
class Sizes:
    layers: int
    vocab: int
    window: int  # the narrow window the windowed families get
    max_length: int  # dataset.maxLength: the longest sample
    row: int  # tokens in the packed micro-batch row
    # family -> (hidden, heads, kv_heads, head_dim): the family's own layout, scaled down
    heads: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


FULL = Sizes(layers=4, vocab=32000, window=256, max_length=1024, row=2048, heads={
    "llama": (1024, 8, 2, 128),  # Llama 3: head_dim 128, GQA
    "mistral": (1024, 8, 2, 128),
    "qwen2": (1024, 8, 2, 128),  # q/k/v biases
    "qwen3": (1024, 8, 2, 128),  # q/k RMSNorm
    "gemma2": (1024, 4, 2, 256),  # Gemma 2/3: head_dim 256
    "gemma3": (1024, 4, 2, 256),
    "phi3": (1152, 12, 12, 96),  # Phi-3-mini: head_dim 96, fused qkv, no GQA
})
TINY = Sizes(layers=2, vocab=256, window=8, max_length=32, row=64, heads={
    "llama": (64, 4, 2, 16), "mistral": (64, 4, 2, 16), "qwen2": (64, 4, 2, 16), "qwen3": (64, 4, 2, 16),
    "gemma2": (64, 2, 1, 32), "gemma3": (64, 2, 1, 32), "phi3": (48, 4, 4, 12),
})


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    window: str  # "narrow": sizes.window, "max_length": = dataset.maxLength, "none"
    note: str
    extra: bool = False


CASES = (
    Case("llama", "llama", "none", "no window"),
    Case("mistral", "mistral", "narrow", "sliding window on every layer (Mistral 7B v0.1)"),
    Case("qwen2", "qwen2", "none", "use_sliding_window off, as in the released checkpoints"),
    Case("qwen3", "qwen3", "none", "use_sliding_window off, as in the released checkpoints"),
    Case("gemma2", "gemma2", "narrow", "soft-capped attention logits; window on every other layer"),
    Case("gemma3", "gemma3", "narrow", "window on 3 layers of 4, no soft-cap"),
    Case("phi3", "phi3", "narrow", "sliding window on every layer (Phi-3-mini: 2047)"),
    Case("mistral/window=maxLength", "mistral", "max_length", "window as wide as the longest sample", extra=True),
    Case("phi3/window=maxLength", "phi3", "max_length", "window as wide as the longest sample", extra=True),
    Case("gemma3/window=maxLength", "gemma3", "max_length", "window as wide as the longest sample", extra=True),
    Case("qwen2/use_sliding_window", "qwen2", "narrow", "use_sliding_window on the upper half of the layers",
         extra=True),
)


def family_config(case: Case, sizes: Sizes):
    import transformers

    hidden, heads, kv, head_dim = sizes.heads[case.family]
    window = {"narrow": sizes.window, "max_length": sizes.max_length, "none": None}[case.window]
    common = dict(vocab_size=sizes.vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                  num_hidden_layers=sizes.layers, num_attention_heads=heads, num_key_value_heads=kv,
                  max_position_embeddings=4 * sizes.row, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  # Wider than the usual 0.02: random q/k then give attention logits of std ~2.5, so
                  # attention is peaked as in a trained model; with near-uniform attention a dropped
                  # window or a cross-sample leak would move the logits too little to tell apart.
                  initializer_range=0.05)
    f = case.family
    if f == "llama":
        return transformers.LlamaConfig(head_dim=head_dim, rope_theta=500000.0, **common)
    if f == "mistral":
        return transformers.MistralConfig(head_dim=head_dim, sliding_window=window, **common)
    if f == "qwen2":
        kw = dict(use_sliding_window=True, sliding_window=window, max_window_layers=sizes.layers // 2) if window else {}
        return transformers.Qwen2Config(**kw, **common)
    if f == "qwen3":
        return transformers.Qwen3Config(head_dim=head_dim, **common)
    if f == "gemma2":  # attn_logit_softcapping 50 and final_logit_softcapping 30 are the config's defaults
        return transformers.Gemma2Config(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=window,
                                         **common)
    if f == "gemma3":
        types = ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(sizes.layers)]
        if sizes.layers < 4:
            types[-1] = "full_attention"
        return transformers.Gemma3TextConfig(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=window,
                                             layer_types=types, **common)
    if f == "phi3":  # head_dim = hidden / heads
        return transformers.Phi3Config(sliding_window=window, **common)
    raise ValueError(f)


# ---------------------------------------------------------------- the packed batch


def sample_lengths(sizes: Sizes, rng: random.Random) -> list[int]:
    """One micro-batch row: a sample of exactly maxLength, one a token past the narrow window, one of
    exactly the window, a 1-token sample, and random lengths filling the rest; shuffled."""
    lens = [sizes.max_length, sizes.window + 1, sizes.window, 1]
    left = sizes.row - sum(lens)
    while left > 0:
        n = min(left, rng.randint(2, max(2, sizes.max_length // 3)))
        lens.append(n)
        left -= n
    rng.shuffle(lens)
    return lens


def collate(samples: list[torch.Tensor]) -> tuple[dict[str, Any], str]:
    """The padding-free batch the trainer's collator makes of these samples (TRL's
    DataCollatorForLanguageModeling(padding_free=True), which SFTTrainer uses for packing='bfd'),
    without labels: the model's keyword arguments. TRL's own when it imports, else the same keys
    built here."""
    try:
        import trl
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
        batch = collator([{"input_ids": s.tolist()} for s in samples])
        source = f"trl {trl.__version__} DataCollatorForLanguageModeling(padding_free=True)"
    except Exception as e:  # noqa: BLE001 - TRL missing or failing: build the same keys here
        ids = torch.cat(samples).unsqueeze(0)
        pos = torch.cat([torch.arange(len(s)) for s in samples]).unsqueeze(0)
        starts = (pos[0] == 0).nonzero().flatten()
        cu = torch.cat([starts, torch.tensor([pos.size(1)])]).to(torch.int32)
        batch = {"input_ids": ids, "position_ids": pos, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                 "max_length_q": int(cu.diff().max()), "max_length_k": int(cu.diff().max()),
                 "seq_idx": torch.repeat_interleave(torch.arange(len(samples), dtype=torch.int32), cu.diff())[None]}
        source = f"the keys of TRL's padding-free collator, built here (trl: {type(e).__name__}: {e})"
    batch.pop("labels", None)
    return batch, source


# ---------------------------------------------------------------- measuring


def diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """a against the reference b: ||a-b||/||b||, max |a-b|, max |a-b| / max |b|."""
    a, b = a.detach().double(), b.detach().double()
    d = (a - b).abs()
    return {"rel": float((a - b).norm() / b.norm().clamp_min(1e-30)), "max_abs": float(d.max()),
            "max_rel": float(d.max() / b.abs().max().clamp_min(1e-30))}


def per_sample_logits(model, ids: torch.Tensor, lens: list[int]) -> torch.Tensor:
    out = [model(input_ids=chunk, use_cache=False).logits for chunk in ids.split(lens, dim=1)]
    return torch.cat(out, dim=1)


@contextlib.contextmanager
def _guard_off(pa):
    saved = pa._refuse_what_varlen_cannot_do
    pa._refuse_what_varlen_cannot_do = lambda kwargs, max_len: None
    try:
        yield
    finally:
        pa._refuse_what_varlen_cannot_do = saved


def check_case(case: Case, sizes: Sizes, *, device: torch.device, dtype: torch.dtype, varlen_capable: bool,
               seed: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    pa, performance, MethodSpec, PerformanceSpec = _project()
    t0 = time.perf_counter()
    cfg = family_config(case, sizes)
    rng = random.Random(seed)
    lens = sample_lengths(sizes, rng)
    unfit = pa.varlen_unfit(cfg, sizes.max_length)
    fallback = pa.library_attention(cfg)

    def auto(capable: bool) -> str:
        # What the trainer decides with training.performance.attention: auto (train.resolve_performance).
        return performance.resolve(PerformanceSpec(), method=MethodSpec(type="lora"), strategy="ddp",
                                   cuda=device.type == "cuda", varlen_capable=capable, model_config=cfg,
                                   max_length=sizes.max_length, env={}).attention

    chosen = auto(varlen_capable)
    impl = pa.attention_implementation(chosen)
    rec: dict[str, Any] = {
        "case": case.name, "family": case.family, "model_type": cfg.model_type, "note": case.note,
        "extra": case.extra, "seed": seed, "sample_lengths": lens,
        "heads": dict(zip(("hidden", "heads", "kv_heads", "head_dim"), sizes.heads[case.family])),
        "sliding_window": getattr(cfg.get_text_config(), "sliding_window", None),
        "layer_types": getattr(cfg, "layer_types", None),
        "attn_logit_softcapping": getattr(cfg, "attn_logit_softcapping", None),
        "varlen_unfit": unfit, "library_attention": fallback,
        "auto_on_varlen_gpu": auto(True), "auto_here": chosen, "implementation": impl,
        "reference": f"{fallback}, each sample alone",
    }

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=fallback).eval()
    g = torch.Generator().manual_seed(seed)
    samples = [torch.randint(3, sizes.vocab, (n,), generator=g) for n in lens]
    batch, rec["batch_from"] = collate(samples)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    ids = batch["input_ids"]
    assert ids.shape == (1, sizes.row), ids.shape

    with torch.no_grad():
        ref = per_sample_logits(model, ids, lens).float()
        model.set_attn_implementation(impl)
        packed = model(**batch, use_cache=False).logits.float()
        packed_pos = model(input_ids=ids, position_ids=batch["position_ids"], use_cache=False).logits.float()
        # Control 1: no sample boundaries (one long causal sequence): attention crosses samples. (The
        # varlen guard would refuse a row longer than a window; it is off here: this measures the metric.)
        with _guard_off(pa):
            leak = model(input_ids=ids, use_cache=False).logits.float()
        # Control 2 (falling-back families, where the kernel runs): the varlen kernel forced anyway. With
        # its run-time guard it must refuse; with the guard off it drops the window / soft-cap: what the
        # fallback avoids.
        forced = guard = None
        if unfit is not None and varlen_capable:
            model.set_attn_implementation(pa.attention_implementation("varlen"))
            try:
                model(**batch, use_cache=False)
                guard = "did not refuse"
            except RuntimeError as e:
                guard = str(e).split(";")[0]
            with _guard_off(pa):
                forced = model(**batch, use_cache=False).logits.float()
        # The exact answer: the same weights in fp32, eager attention, each sample alone.
        model.set_attn_implementation("eager")
        exact_model = copy.deepcopy(model).float()
        exact = per_sample_logits(exact_model, ids, lens).double()
        del exact_model

    finite = bool(torch.isfinite(packed).all() and torch.isfinite(packed_pos).all() and torch.isfinite(ref).all())
    main = diff(packed, ref)
    pos_only = diff(packed_pos, ref)
    library_err = diff(ref, exact)["rel"]
    bound = max(FACTOR * library_err, FLOOR[dtype])
    err = {"packed": diff(packed, exact)["rel"], "packed_position_ids_only": diff(packed_pos, exact)["rel"],
           "reference": library_err}
    bounds = [0] + list(torch.tensor(lens).cumsum(0).tolist())
    per_sample = [diff(packed[:, s:e], ref[:, s:e])["rel"] for s, e in zip(bounds, bounds[1:])]
    controls = {"no_position_ids": diff(leak, exact)["rel"]}
    if forced is not None:
        controls["varlen_forced_guard_off"] = diff(forced, exact)["rel"]
    rec.update({
        "packed_vs_reference": main,
        "packed_position_ids_only_vs_reference": pos_only,
        "per_sample_rel": [round(x, 6) for x in per_sample],
        "vs_fp32_exact": err,
        "bound": bound,
        "packed_over_library_error": err["packed"] / library_err if library_err else None,
        "controls_vs_fp32_exact": controls,
        "varlen_guard": guard,
        "finite": finite,
    })
    rec["pass"] = finite and err["packed"] <= bound and err["packed_position_ids_only"] <= bound
    # The guard must refuse with its own message (a family that falls back but reached the kernel).
    guard_ok = guard is None or guard.startswith("kubetune varlen attention")
    rec["controls_detected"] = all(c > bound for c in controls.values()) and guard_ok
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


# ---------------------------------------------------------------- main


def versions(device: torch.device) -> dict[str, Any]:
    import transformers

    v: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__}
    try:
        import trl

        v["trl"] = trl.__version__
    except ImportError:
        v["trl"] = None
    if device.type == "cuda":
        v["cuda"] = torch.version.cuda
        v["device"] = torch.cuda.get_device_name(device)
        v["capability"] = list(torch.cuda.get_device_capability(device))
        try:
            import inspect

            from torch.nn.attention.varlen import varlen_attn

            v["varlen_attn_signature"] = str(inspect.signature(varlen_attn))
        except ImportError:
            v["varlen_attn_signature"] = None
    else:
        v["device"] = f"cpu ({platform.machine()})"
    return v


def table(records: list[dict[str, Any]]) -> str:
    """packed vs reference: rel, max abs, max rel; against the fp32 exact answer: the packed path, the
    library's own path, the bound, the controls (no position_ids; varlen forced, guard off)."""
    head = (f"{'case':26s} {'GPU auto':8s} {'runs here':15s} {'ref':5s} | {'rel':>8s} {'max abs':>8s} "
            f"{'max rel':>8s} | {'packed':>8s} {'library':>8s} {'bound':>8s} | {'no-pos':>8s} {'forced':>8s} | verdict")
    lines = [head, "-" * len(head)]
    for r in records:
        m, e, c = r["packed_vs_reference"], r["vs_fp32_exact"], r["controls_vs_fp32_exact"]
        forced = f"{c['varlen_forced_guard_off']:8.2e}" if "varlen_forced_guard_off" in c else f"{'-':>8s}"
        verdict = ("PASS" if r["pass"] else "FAIL") + ("" if r["controls_detected"] else " (control weak)")
        lines.append(f"{r['case']:26s} {r['auto_on_varlen_gpu']:8s} {r['implementation']:15s} "
                     f"{r['library_attention']:5s} | {m['rel']:8.2e} {m['max_abs']:8.2e} {m['max_rel']:8.2e} | "
                     f"{e['packed']:8.2e} {e['reference']:8.2e} {r['bound']:8.2e} | {c['no_position_ids']:8.2e} "
                     f"{forced} | {verdict}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None, *, varlen_capable: Optional[bool] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU tests)")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    ap.add_argument("--no-extra", action="store_true", help="only the seven families' main cases")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                    help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--seed", type=int, default=None, help="default: a fresh one, recorded")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    pa = _project()[0]
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 exact answer must be fp32
        torch.backends.cudnn.allow_tf32 = False
    if varlen_capable is None:
        varlen_capable = device.type == "cuda" and pa.varlen_available()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        ap.error(f"unknown families {sorted(unknown)}")
    sizes = TINY if args.tiny else FULL
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    cases = [c for c in CASES if c.family in families and not (c.extra and args.no_extra)]

    info = versions(device)
    print("VERSIONS " + json.dumps(info), flush=True)
    print(f"dtype {str(dtype).removeprefix('torch.')}, varlen kernel here: {varlen_capable}, seed {seed}, "
          f"{sizes.layers} layers, window {sizes.window}, maxLength {sizes.max_length}, row {sizes.row} tokens",
          flush=True)
    records: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    result: dict[str, Any] = {}
    for i, case in enumerate(cases):
        try:
            r = check_case(case, sizes, device=device, dtype=dtype, varlen_capable=varlen_capable, seed=seed + i)
        except Exception as e:  # noqa: BLE001 - one family's failure must not hide the others'
            import traceback

            traceback.print_exc()
            errors.append({"case": case.name, "error": f"{type(e).__name__}: {e}"})
            print(f"{case.name}: ERROR {type(e).__name__}: {e}", flush=True)
        else:
            records.append(r)
            m = r["packed_vs_reference"]
            print(f"{case.name}: {r['implementation']} vs {r['reference']}: rel {m['rel']:.2e} max abs "
                  f"{m['max_abs']:.2e} -> {'PASS' if r['pass'] else 'FAIL'} ({r['seconds']} s)", flush=True)
        _record(result, args, info, dtype, device, varlen_capable, seed, sizes, records, errors)
    ok = result["ok"]
    print(table(records), flush=True)
    for e in errors:
        print(f"{e['case']}: ERROR {e['error']}", flush=True)
    print("ATTENTION FAMILIES CHECK", "PASSED" if ok else "FAILED", flush=True)
    return 0 if ok else 1


def _record(result, args, info, dtype, device, varlen_capable, seed, sizes, records, errors) -> None:
    """The JSON record, rewritten after every case (a run cut short keeps what it measured)."""
    ok = bool(records) and not errors and all(r["pass"] and r["controls_detected"] for r in records)
    result.clear()
    result.update({
        "check": "bench/check_attention_families.py", "versions": info,
        "conditions": {"dtype": str(dtype).removeprefix("torch."), "device": str(device), "tiny": args.tiny,
                       "varlen_capable": varlen_capable, "seed": seed, "layers": sizes.layers, "vocab": sizes.vocab,
                       "narrow_window": sizes.window, "max_length": sizes.max_length, "row_tokens": sizes.row,
                       "tf32": False, "initializer_range": 0.05},
        "tolerance": {"pass": "||packed - exact|| / ||exact|| <= bound, for the collator's batch and for "
                              "position_ids alone; exact: the same weights in fp32, eager, each sample alone",
                      "bound": f"max({FACTOR:g} x ||reference - exact|| / ||exact||, {FLOOR[dtype]:g})",
                      "reported": "packed_vs_reference: ||packed - reference|| / ||reference||, max abs, "
                                  "max abs / max |reference|"},
        "cases": records, "errors": errors, "ok": ok,
    })
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
