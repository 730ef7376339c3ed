"""The resolver of training.performance (trainer/performance.py), table-driven, on a CPU:
what `auto` gives on each kind of machine and strategy, the explicit values, the
KUBETUNE_* overrides (the environment wins), and the errors that name the field."""

from __future__ import annotations

import pytest

from kubetune.contract.recipe import MethodSpec, PerformanceSpec
from kubetune.trainer.performance import PerformanceError, Resolved, resolve

# Machines: what the trainer probes before the load.
H200 = dict(cuda=True, fp8_capable=True, varlen_capable=True, liger_installed=True)
A100 = dict(cuda=True, fp8_capable=False, varlen_capable=True, liger_installed=True)  # no FP8 tensor cores
NO_LIGER = dict(cuda=True, fp8_capable=True, varlen_capable=True, liger_installed=False)
OLD_TORCH = dict(cuda=True, fp8_capable=True, varlen_capable=False, liger_installed=True)  # no varlen_attn
CPU = dict(cuda=False)

QLORA = MethodSpec(type="qlora")
LORA = MethodSpec(type="lora")
DORA = MethodSpec(type="qlora", use_dora=True)

# The fields of Resolved a row checks, in this order.
FIELDS = ("attention", "liger", "fused_lora", "fp8", "compile", "selective_checkpointing", "memory_budget_gib")


def run(perf=None, method=QLORA, strategy="ddp", machine=H200, env=None, **kw) -> Resolved:
    return resolve(PerformanceSpec.model_validate(perf or {}), method=method, strategy=strategy, env=env or {},
                   **machine, **kw)


def fields(r: Resolved) -> tuple:
    return tuple(getattr(r, f) for f in FIELDS)


# ---------------------------------------------------------------- auto: today's behaviour

@pytest.mark.parametrize("method, strategy, machine, expected", [
    # the measured default on an H200: every fast path but compile, FP8 for QLoRA
    (QLORA, "ddp", H200, ("varlen", True, True, True, False, True, None)),
    (QLORA, "deepspeed-zero2", H200, ("varlen", True, True, True, False, True, None)),
    (LORA, "ddp", H200, ("varlen", True, True, False, False, True, None)),  # bf16 LoRA keeps bf16 products
    # ZeRO-3 gathers weights through module hooks: nothing that reads a weight directly
    (QLORA, "deepspeed-zero3", H200, ("varlen", True, False, False, False, False, None)),
    # ... and a bf16 LoRA model is placed on the GPU by DeepSpeed after the load: no Liger either
    (LORA, "deepspeed-zero3", H200, ("varlen", False, False, False, False, False, None)),
    (QLORA, "ddp", A100, ("varlen", True, True, False, False, True, None)),
    (QLORA, "ddp", NO_LIGER, ("varlen", False, True, True, False, True, None)),
    (QLORA, "ddp", OLD_TORCH, ("sdpa", True, True, True, False, True, None)),
    (LORA, "ddp", CPU, ("sdpa", False, False, False, False, False, None)),
    # DoRA's magnitude is not computed by the fused node: its layers keep PEFT's forward
    (DORA, "ddp", H200, ("varlen", True, False, True, False, True, None)),
])
def test_auto(method, strategy, machine, expected):
    assert fields(run(method=method, strategy=strategy, machine=machine)) == expected


def test_zero3_set_by_the_launcher_counts_as_zero3():
    # accelerate launch --zero_stage 3 partitions the weights whatever the config's strategy says
    r = run(strategy="ddp", env={"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert fields(r) == ("varlen", True, False, False, False, False, None)
    with pytest.raises(PerformanceError, match="fp8=on .*deepspeed-zero3"):
        run({"fp8": "on"}, env={"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})


# ---------------------------------------------------------------- explicit values

@pytest.mark.parametrize("perf, method, field, value", [
    ({"attention": "sdpa"}, QLORA, "attention", "sdpa"),
    ({"attention": "eager"}, QLORA, "attention", "eager"),
    ({"attention": "varlen"}, QLORA, "attention", "varlen"),
    ({"liger": "off"}, QLORA, "liger", False),
    ({"fusedLora": "off"}, QLORA, "fused_lora", False),
    ({"fusedLora": "on"}, QLORA, "fused_lora", True),
    ({"fp8": "on"}, LORA, "fp8", True),
    ({"fp8": "off"}, QLORA, "fp8", False),
    ({"compile": "on"}, QLORA, "compile", True),
    ({"compile": "off"}, QLORA, "compile", False),
    ({"selectiveCheckpointing": "off"}, QLORA, "selective_checkpointing", False),
    ({"memoryBudgetGiB": 24}, QLORA, "memory_budget_gib", 24.0),
])
def test_explicit_values(perf, method, field, value):
    r = run(perf, method=method)
    assert getattr(r, field) == value
    default = run(method=method)
    # only the field set moves
    assert {f: getattr(r, f) for f in FIELDS if f != field} == {f: getattr(default, f) for f in FIELDS if f != field}


# ---------------------------------------------------------------- environment overrides (they win)

@pytest.mark.parametrize("perf, env, machine, strategy, field, value", [
    ({}, {"KUBETUNE_LIGER": "0"}, H200, "ddp", "liger", False),
    ({"liger": "on"}, {"KUBETUNE_LIGER": "0"}, H200, "ddp", "liger", False),
    ({}, {"KUBETUNE_FUSED_LORA": "0"}, H200, "ddp", "fused_lora", False),
    ({}, {"KUBETUNE_COMPILE": "1"}, H200, "ddp", "compile", True),
    ({"compile": "on"}, {"KUBETUNE_COMPILE": "0"}, H200, "ddp", "compile", False),
    ({}, {"KUBETUNE_SELECTIVE_CHECKPOINTING": "0"}, H200, "ddp", "selective_checkpointing", False),
    ({"fp8": "on"}, {"KUBETUNE_FP8": "0"}, H200, "ddp", "fp8", False),
    ({"fp8": "off"}, {"KUBETUNE_FP8": "1"}, H200, "ddp", "fp8", True),
    ({"attention": "varlen"}, {"KUBETUNE_ATTENTION": "eager"}, H200, "ddp", "attention", "eager"),
    ({"attention": "sdpa"}, {"KUBETUNE_ATTENTION": "kubetune_varlen"}, H200, "ddp", "attention", "varlen"),
    ({}, {"KUBETUNE_ATTENTION": "varlen"}, H200, "ddp", "attention", "varlen"),
    ({}, {"KUBETUNE_ATTENTION": "flex_attention"}, H200, "ddp", "attention", "flex_attention"),  # any transformers name
    ({}, {"KUBETUNE_ATTENTION": "auto"}, OLD_TORCH, "ddp", "attention", "sdpa"),
    ({"memoryBudgetGiB": 24}, {"KUBETUNE_MEMORY_BUDGET_GIB": "15.6"}, H200, "ddp", "memory_budget_gib", 15.6),
    ({}, {"KUBETUNE_LIGER": ""}, H200, "ddp", "liger", True),  # empty: unset
    # A toggle forced to 1 turns its path on only where it can run: never an impossible run.
    ({}, {"KUBETUNE_FP8": "1"}, A100, "ddp", "fp8", False),
    ({}, {"KUBETUNE_FP8": "1"}, H200, "deepspeed-zero3", "fp8", False),
    ({}, {"KUBETUNE_COMPILE": "1"}, H200, "deepspeed-zero3", "compile", False),
    ({}, {"KUBETUNE_COMPILE": "1"}, CPU, "ddp", "compile", False),
    ({}, {"KUBETUNE_FUSED_LORA": "1"}, H200, "deepspeed-zero3", "fused_lora", False),
    # The SwiGLU product quantised where it is made and fast FP8 accumulation: parts of the
    # FP8 recipe, on wherever FP8 is, each turned off by its variable.
    ({}, {}, H200, "ddp", "fp8_swiglu", True),
    ({}, {"KUBETUNE_FP8_SWIGLU": "0"}, H200, "ddp", "fp8_swiglu", False),
    ({"fp8": "off"}, {"KUBETUNE_FP8_SWIGLU": "1"}, H200, "ddp", "fp8_swiglu", False),
    ({}, {"KUBETUNE_FP8_SWIGLU": "1"}, A100, "ddp", "fp8_swiglu", False),
    ({}, {}, H200, "ddp", "fp8_fast_accum", True),
    ({}, {"KUBETUNE_FP8_FAST_ACCUM": "0"}, H200, "ddp", "fp8_fast_accum", False),
    ({}, {"KUBETUNE_FP8_FAST_ACCUM": "0"}, H200, "ddp", "fp8_swiglu", True),  # one part off, not the other
    ({"fp8": "off"}, {}, H200, "ddp", "fp8_fast_accum", False),
    ({}, {}, A100, "ddp", "fp8_fast_accum", False),
    ({}, {}, H200, "ddp", "fp8_fast_accum_grad", True),
    ({}, {"KUBETUNE_FP8_FAST_ACCUM_GRAD": "0"}, H200, "ddp", "fp8_fast_accum_grad", False),
    ({}, {"KUBETUNE_FP8_FAST_ACCUM_GRAD": "0"}, H200, "ddp", "fp8_fast_accum", True),
    ({}, {}, A100, "ddp", "fp8_fast_accum_grad", False),
    ({}, {}, H200, "ddp", "avoid_host_waits", True),
    ({"fp8": "off"}, {}, A100, "ddp", "avoid_host_waits", True),  # not a part of the FP8 recipe
    ({}, {"KUBETUNE_AVOID_HOST_WAITS": "0"}, H200, "ddp", "avoid_host_waits", False),
    ({"fp8": "off"}, {"KUBETUNE_FP8_FAST_ACCUM_GRAD": "1"}, H200, "ddp", "fp8_fast_accum_grad", False),
])
def test_environment_overrides(perf, env, machine, strategy, field, value):
    assert getattr(run(perf, env=env, machine=machine, strategy=strategy), field) == value


def test_applied_overrides_are_listed_for_the_log():
    r = run(env={"KUBETUNE_LIGER": "0", "KUBETUNE_MEMORY_BUDGET_GIB": "15.6", "UNRELATED": "1"})
    assert r.overrides == ("KUBETUNE_LIGER=0", "KUBETUNE_MEMORY_BUDGET_GIB=15.6")
    assert "KUBETUNE_LIGER=0" in r.describe() and "15.6 GiB" in r.describe()
    assert run().overrides == () and "90% of the GPU" in run().describe()


# ---------------------------------------------------------------- what cannot be honoured

@pytest.mark.parametrize("perf, method, strategy, machine, env, message", [
    ({"fp8": "on"}, QLORA, "ddp", A100, {}, "training.performance.fp8=on needs a CUDA GPU with FP8 tensor cores"),
    ({"fp8": "on"}, LORA, "ddp", CPU, {}, "training.performance.fp8=on needs a CUDA GPU with FP8 tensor cores"),
    ({"fp8": "on"}, QLORA, "deepspeed-zero3", H200, {}, "training.performance.fp8=on is not supported with strategy deepspeed-zero3"),
    ({"liger": "on"}, LORA, "ddp", CPU, {}, "training.performance.liger=on needs a CUDA GPU and liger-kernel"),
    ({"liger": "on"}, QLORA, "ddp", NO_LIGER, {}, "training.performance.liger=on needs a CUDA GPU and liger-kernel"),
    ({"liger": "on"}, LORA, "deepspeed-zero3", H200, {}, "training.performance.liger=on cannot be applied under deepspeed-zero3"),
    ({"fusedLora": "on"}, LORA, "ddp", CPU, {}, "training.performance.fusedLora=on needs a CUDA GPU"),
    ({"fusedLora": "on"}, QLORA, "deepspeed-zero3", H200, {}, "training.performance.fusedLora=on cannot be combined with deepspeed-zero3"),
    ({"fusedLora": "on"}, DORA, "ddp", H200, {}, "training.performance.fusedLora=on cannot be combined with method.useDora"),
    ({"compile": "on"}, LORA, "ddp", CPU, {}, "training.performance.compile=on needs a CUDA GPU"),
    ({"compile": "on"}, QLORA, "deepspeed-zero3", H200, {}, "training.performance.compile=on cannot be combined with deepspeed-zero3"),
    ({"selectiveCheckpointing": "on"}, LORA, "ddp", CPU, {}, "training.performance.selectiveCheckpointing=on needs a CUDA GPU"),
    ({"selectiveCheckpointing": "on"}, QLORA, "deepspeed-zero3", H200, {},
     "training.performance.selectiveCheckpointing=on cannot be combined with deepspeed-zero3"),
    ({"attention": "varlen"}, QLORA, "ddp", OLD_TORCH, {}, "training.performance.attention=varlen needs a CUDA GPU"),
    ({"attention": "varlen"}, LORA, "ddp", CPU, {}, "training.performance.attention=varlen needs a CUDA GPU"),
    ({}, QLORA, "ddp", OLD_TORCH, {"KUBETUNE_ATTENTION": "kubetune_varlen"}, "KUBETUNE_ATTENTION=varlen needs a CUDA GPU"),
    ({}, QLORA, "ddp", H200, {"KUBETUNE_LIGER": "yes"}, "KUBETUNE_LIGER must be 0 or 1"),
    ({}, QLORA, "ddp", H200, {"KUBETUNE_FP8": "true"}, "KUBETUNE_FP8 must be 0 or 1"),
    ({}, QLORA, "ddp", H200, {"KUBETUNE_MEMORY_BUDGET_GIB": "lots"}, "KUBETUNE_MEMORY_BUDGET_GIB must be a number of GiB"),
    ({}, QLORA, "ddp", H200, {"KUBETUNE_MEMORY_BUDGET_GIB": "0"}, "KUBETUNE_MEMORY_BUDGET_GIB must be > 0"),
])
def test_what_cannot_be_honoured_is_an_error_naming_the_field(perf, method, strategy, machine, env, message):
    with pytest.raises(PerformanceError) as e:
        run(perf, method=method, strategy=strategy, machine=machine, env=env)
    assert message in str(e.value)
    if "training.performance." in message:
        assert "use 'auto'" in str(e.value)  # and says what to write instead


# ---------------------------------------------------------------- the model family decides varlen

def _family(name):
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    small = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    return {
        "llama": lambda: LlamaConfig(**small),
        "gemma2": lambda: Gemma2Config(**small, head_dim=16, sliding_window=4096),  # soft-caps whatever the window
        "gemma3-window-512": lambda: Gemma3TextConfig(**small, head_dim=16, sliding_window=512),
        "mistral-window-4096": lambda: MistralConfig(**small, sliding_window=4096),
        "qwen2-no-window": lambda: Qwen2Config(**small),  # use_sliding_window defaults to false
        "phi3-window-2047": lambda: Phi3Config(**small, sliding_window=2047, pad_token_id=0),
    }[name]()


@pytest.mark.parametrize("family, max_length, machine, attention", [
    ("llama", 2048, H200, "varlen"),
    ("qwen2-no-window", 8192, H200, "varlen"),
    ("gemma2", 2048, H200, "eager"),  # sdpa cannot soft-cap (transformers refuses it for Gemma 2)
    ("gemma2", 2048, CPU, "eager"),
    ("gemma3-window-512", 2048, H200, "sdpa"),  # a window narrower than a sample: sdpa's mask has it
    ("gemma3-window-512", 512, H200, "varlen"),  # no sample is longer than the window: nothing to mask
    ("mistral-window-4096", 2048, H200, "varlen"),
    ("mistral-window-4096", 8192, H200, "sdpa"),
    ("phi3-window-2047", 2048, H200, "sdpa"),  # a 2048-token sample reaches past a 2047-token window
])
def test_auto_attention_falls_back_for_families_varlen_cannot_reproduce(family, max_length, machine, attention):
    assert run(machine=machine, model_config=_family(family), max_length=max_length).attention == attention


def test_varlen_asked_for_a_family_it_cannot_reproduce_is_an_error():
    with pytest.raises(PerformanceError, match="attention=varlen cannot reproduce this model's attention: "
                                               "gemma2 soft-caps attention logits.*eager for this model"):
        run({"attention": "varlen"}, model_config=_family("gemma2"), max_length=2048)
    with pytest.raises(PerformanceError, match="KUBETUNE_ATTENTION=varlen cannot reproduce.*sliding window of 512"):
        run(env={"KUBETUNE_ATTENTION": "kubetune_varlen"}, model_config=_family("gemma3-window-512"), max_length=2048)


# ---------------------------------------------------------------- in the trainer: before the model loads

def test_the_trainer_refuses_before_loading_the_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kubetune.trainer.config import parse_config
    from kubetune.trainer.train import TrainingError, load_model

    LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4).save_pretrained(tmp_path)
    loads = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: loads.append(a))
    for var in ("KUBETUNE_FP8", "KUBETUNE_LIGER", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(var, raising=False)
    for perf, message in [({"fp8": "on"}, "training.performance.fp8=on needs a CUDA GPU with FP8 tensor cores"),
                          ({"liger": "on"}, "training.performance.liger=on needs a CUDA GPU")]:
        cfg = parse_config({"baseModel": {"uri": str(tmp_path)}, "dataset": {"uri": "d.jsonl"}, "output": {"uri": "o"},
                            "method": {"type": "lora"}, "training": {"performance": perf}})
        with pytest.raises(TrainingError, match=message.replace(".", r"\.")):
            load_model(cfg, tmp_path, cuda=False, precision="fp32", local_rank=0)
    assert loads == []  # refused before from_pretrained was reached


def test_an_environment_override_is_announced(tmp_path, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from kubetune.trainer.config import parse_config
    from kubetune.trainer.train import load_model

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config.save_pretrained(tmp_path)
    seen = {}

    def fake_load(path, **kwargs):
        seen.update(kwargs)
        return LlamaForCausalLM(config)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_load)
    monkeypatch.setenv("KUBETUNE_LIGER", "0")
    monkeypatch.setenv("KUBETUNE_ATTENTION", "eager")
    cfg = parse_config({"baseModel": {"uri": str(tmp_path)}, "dataset": {"uri": "d.jsonl"}, "output": {"uri": "o"},
                        "method": {"type": "lora"}})
    with caplog.at_level("WARNING", logger="kubetune.trainer.train"):
        load_model(cfg, tmp_path, cuda=False, precision="fp32", local_rank=0)
    assert seen["attn_implementation"] == "eager"  # the override reached the load
    assert "overridden by the environment: KUBETUNE_ATTENTION=eager KUBETUNE_LIGER=0" in caplog.text
