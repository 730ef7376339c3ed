"""`training.performance` on this machine: every `auto` made concrete, once.

Why: the speed switches (attention kernel, Liger, fused LoRA, FP8, compile,
selective checkpointing, memory budget) are part of the recipe
(`kubetune.contract.recipe.PerformanceSpec`); whether each can run depends on
the machine (a CUDA GPU, FP8 tensor cores, the varlen kernel, Liger
installed), the strategy (ZeRO-3 gathers weights only through module hooks)
and the model (a family whose attention the varlen kernel cannot reproduce).
`resolve` decides all of it in one pure function, before the model loads, so
that an `on` that cannot be honoured is an error naming the field within
seconds instead of a silent no-op or a failure an hour in; the rest of the
trainer only reads the booleans of `Resolved`.

`auto` is the measured best (bench/RESULTS.md): varlen attention where the
kernel and the family allow it, else the library's own; Liger on CUDA when
installed; fused LoRA unless ZeRO-3 (and not for DoRA); FP8 for QLoRA on GPUs
with FP8 tensor cores unless ZeRO-3; compile off; selective checkpointing
unless ZeRO-3; the budget 90% of the device.

The KUBETUNE_* variables (`kubetune.contract.facts`) override the config, for
debugging and benchmarks; an override set in the environment wins. A toggle
set to 1 turns its path on where this machine can run it and is never an
error (a debugging knob, as before); 0 turns it off.
`KUBETUNE_ATTENTION` takes an implementation name ("varlen" or
"kubetune_varlen" for the packed kernel, else any name transformers knows),
`KUBETUNE_MEMORY_BUDGET_GIB` a number of GiB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from kubetune.contract import facts
from kubetune.contract.recipe import MethodSpec, PerformanceSpec
from kubetune.trainer.packed_attention import VARLEN_ATTENTION, library_attention, varlen_unfit

FIELD = "training.performance"
# deepspeed.zero3_enabled's rule, over the environment given here: `accelerate launch
# --zero_stage 3` partitions the weights whatever the config's strategy says.
ZERO_STAGE_ENV = "ACCELERATE_DEEPSPEED_ZERO_STAGE"


class PerformanceError(ValueError):
    """A performance setting this machine cannot honour; the message names the field."""


@dataclass(frozen=True)
class Resolved:
    attention: str  # "varlen", or the transformers implementation to load with ("sdpa", "eager", ...)
    liger: bool
    fused_lora: bool
    fp8: bool
    compile: bool
    selective_checkpointing: bool
    memory_budget_gib: Optional[float]  # None: 90% of the device
    overrides: tuple[str, ...] = ()  # the KUBETUNE_* variables that were applied, for the log
    # With fp8 (on unless KUBETUNE_FP8_SWIGLU=0): an MLP whose down_proj is frozen takes its
    # SwiGLU product straight to e4m3, and with gate and up frozen too their output gradients.
    fp8_swiglu: bool = False
    # With fp8 (on unless KUBETUNE_FP8_FAST_ACCUM=0): the forward products use cuBLASLt's fast
    # FP8 accumulation (torchao's recipe).
    fp8_fast_accum: bool = False
    # With fp8 (on unless KUBETUNE_FP8_FAST_ACCUM_GRAD=0): the input gradients' products too.
    fp8_fast_accum_grad: bool = False
    # On unless KUBETUNE_AVOID_HOST_WAITS=0: the label rows the fused LM head scores are
    # counted on the host (sft.LabelRows), and under varlen transformers' scan for packed rows
    # is skipped (packed_attention.without_packed_scan): no host waits in a step's forward.
    avoid_host_waits: bool = True

    def describe(self) -> str:
        on = [n for n in ("liger", "fused_lora", "fp8", "fp8_swiglu", "fp8_fast_accum", "fp8_fast_accum_grad",
                        "avoid_host_waits", "compile",
                        "selective_checkpointing")
              if getattr(self, n)]
        budget = f"{self.memory_budget_gib:g} GiB" if self.memory_budget_gib is not None else "90% of the GPU"
        text = f"attention={self.attention}, on: {', '.join(on) or 'none'}, memory budget {budget}"
        return text + (f" (environment: {' '.join(self.overrides)})" if self.overrides else "")


def _name(field: str) -> str:
    return f"{FIELD}.{PerformanceSpec.model_fields[field].alias or field}"


def _env_toggle(env: Mapping[str, str], var: str) -> Optional[bool]:
    raw = env.get(var, "").strip()
    if raw == "":
        return None
    if raw not in ("0", "1"):
        raise PerformanceError(f"{var} must be 0 or 1 (or unset), got {raw!r}")
    return raw == "1"


def resolve(
    perf: PerformanceSpec,
    *,
    method: MethodSpec,
    strategy: str,
    cuda: bool,
    fp8_capable: bool = False,
    varlen_capable: bool = False,
    liger_installed: bool = False,
    model_config: Any = None,
    max_length: int = 0,
    env: Mapping[str, str] = os.environ,
) -> Resolved:
    """The settings this run uses. `fp8_capable`: a GPU with FP8 tensor cores
    (`fp8.supported`); `varlen_capable`: the varlen kernel runs here
    (`packed_attention.varlen_available`); `liger_installed`: liger-kernel
    imports; `model_config` / `max_length`: the model's transformers config and
    dataset.maxLength, for whether the varlen kernel reproduces its attention.
    Raises PerformanceError for an `on` (or an explicit attention) this machine
    cannot honour."""
    zero3 = strategy == "deepspeed-zero3" or env.get(ZERO_STAGE_ENV) == "3"
    # Under ZeRO-3 a bf16 LoRA model is loaded on the CPU and placed by DeepSpeed later
    # (train.model_load_kwargs): nothing can patch it on the GPU at load time.
    on_gpu_at_load = cuda and not (zero3 and method.type == "lora")
    overrides: list[str] = []

    def toggle(field: str, var: str, runs_here: bool, why_not: str, auto: bool) -> bool:
        forced = _env_toggle(env, var)
        if forced is not None:
            overrides.append(f"{var}={int(forced)}")
            return forced and runs_here
        mode = getattr(perf, field)
        if mode == "on":
            if not runs_here:
                raise PerformanceError(f"{_name(field)}=on {why_not}; use 'auto' or 'off'")
            return True
        return mode == "auto" and auto and runs_here

    # ---- attention
    unfit = varlen_unfit(model_config, max_length) if model_config is not None else None
    fallback = library_attention(model_config)
    raw = env.get(facts.ENV_ATTENTION, "").strip()
    if raw and raw != "auto":
        overrides.append(f"{facts.ENV_ATTENTION}={raw}")
        choice, field = ("varlen" if raw in ("varlen", VARLEN_ATTENTION) else raw), facts.ENV_ATTENTION
    else:
        choice, field = perf.attention, _name("attention")
    if choice == "auto":
        attention = "varlen" if varlen_capable and unfit is None else fallback
    elif choice == "varlen":
        if not varlen_capable:
            raise PerformanceError(f"{field}=varlen needs a CUDA GPU of compute capability 8.0 or newer and a PyTorch "
                                   "with torch.nn.attention.varlen; use 'auto'")
        if unfit is not None:
            raise PerformanceError(f"{field}=varlen cannot reproduce this model's attention: {unfit}; use 'auto' "
                                   f"({fallback} for this model)")
        attention = "varlen"
    else:
        attention = choice

    # ---- the paths that patch the loaded model
    liger = toggle(
        "liger", facts.ENV_LIGER, on_gpu_at_load and liger_installed,
        "needs a CUDA GPU and liger-kernel installed" if not (cuda and liger_installed) else
        "cannot be applied under deepspeed-zero3 with method.type=lora (DeepSpeed places the weights on the GPU "
        "after the model is loaded)",
        auto=True,
    )
    fused_runs = on_gpu_at_load and not zero3 and not method.use_dora
    fused_lora = toggle(
        "fused_lora", facts.ENV_FUSED_LORA, fused_runs,
        "needs a CUDA GPU" if not cuda else
        "cannot be combined with deepspeed-zero3 (the fused node reads the base weight outside ZeRO-3's gather hooks)"
        if zero3 else "cannot be combined with method.useDora (the fused node does not compute DoRA's magnitude)",
        auto=True,
    )
    fp8 = toggle(
        "fp8", facts.ENV_FP8, fp8_capable and not zero3,
        "needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or newer: L4, L40S, H100, H200)"
        if not fp8_capable else
        "is not supported with strategy deepspeed-zero3 (the backward re-reads the weight outside its gather hooks)",
        # QLoRA's NF4 rounding moves a product 2.5x more than e4m3's (bench/check_fp8_h200.json);
        # bf16 LoRA keeps bf16, the choice of someone who did not want quantised weights.
        auto=method.type == "qlora",
    )
    compile_ = toggle(
        "compile", facts.ENV_COMPILE, on_gpu_at_load and not zero3,
        "needs a CUDA GPU" if not cuda else "cannot be combined with deepspeed-zero3 (DeepSpeed's gather hooks fire per module)",
        # Off: under activation checkpointing torch 2.11 fails it ("a different number of
        # tensors was saved during the original forward and recomputation", bench/RESULTS.md).
        auto=False,
    )
    selective = toggle(
        "selective_checkpointing", facts.ENV_SELECTIVE_CHECKPOINTING, cuda and not zero3,
        "needs a CUDA GPU" if not cuda else
        "cannot be combined with deepspeed-zero3 (partitioned weights make the measured memory meaningless)",
        auto=True,
    )

    # Parts of the FP8 recipe: those on wherever FP8 is were measured on an H200 (bench/RESULTS.md,
    # issue 16, fifth and sixth rounds); the variables turn a part on or off to measure or to rule it out.
    fp8_only = {}
    for var, name, default in ((facts.ENV_FP8_SWIGLU, "fp8_swiglu", True),
                               (facts.ENV_FP8_FAST_ACCUM, "fp8_fast_accum", True),
                               (facts.ENV_FP8_FAST_ACCUM_GRAD, "fp8_fast_accum_grad", True)):
        on = _env_toggle(env, var)
        if on is not None:
            overrides.append(f"{var}={int(on)}")
        fp8_only[name] = bool(fp8 and (default if on is None else on))
    avoid_host_waits = _env_toggle(env, facts.ENV_AVOID_HOST_WAITS)
    if avoid_host_waits is not None:
        overrides.append(f"{facts.ENV_AVOID_HOST_WAITS}={int(avoid_host_waits)}")

    # ---- memory budget
    budget = perf.memory_budget_gib
    raw_budget = env.get(facts.ENV_MEMORY_BUDGET_GIB, "").strip()
    if raw_budget:
        try:
            budget = float(raw_budget)
        except ValueError:
            raise PerformanceError(f"{facts.ENV_MEMORY_BUDGET_GIB} must be a number of GiB, got {raw_budget!r}") from None
        if not budget > 0:
            raise PerformanceError(f"{facts.ENV_MEMORY_BUDGET_GIB} must be > 0, got {raw_budget!r}")
        overrides.append(f"{facts.ENV_MEMORY_BUDGET_GIB}={raw_budget}")

    return Resolved(attention=attention, liger=liger, fused_lora=fused_lora, fp8=fp8, compile=compile_,
                    selective_checkpointing=selective, memory_budget_gib=budget, overrides=tuple(overrides),
                    avoid_host_waits=avoid_host_waits is not False, **fp8_only)
