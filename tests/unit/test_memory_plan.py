"""CPU tests of the micro-batch planner (trainer/memory_plan.py): pure arithmetic
on the model's shape, and how its plan reaches the Trainer's arguments."""

from __future__ import annotations

import pytest

from kubetune.trainer import memory_plan

GIB = 2**30
LLAMA8B = memory_plan.ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)


def test_plan_prefers_no_checkpointing_when_it_fits():
    plan = memory_plan.plan_micro_batch(LLAMA8B, max_length=2048, budget_bytes=400 * GIB, fixed_bytes=6 * GIB, fused_loss=True)
    assert plan.checkpointing is False
    assert plan.tokens == memory_plan.MAX_AUTO_TOKENS


def test_plan_checkpoints_on_a_16_gib_budget():
    plan = memory_plan.plan_micro_batch(LLAMA8B, max_length=2048, budget_bytes=int(15.6 * GIB), fixed_bytes=int(5.5 * GIB),
                                    fused_loss=True)
    assert plan.checkpointing is True
    assert 1 <= plan.rows <= memory_plan.MAX_AUTO_TOKENS // 2048
    assert plan.fixed_bytes + plan.tokens * plan.bytes_per_token <= plan.budget_bytes


def test_plan_grows_with_budget_and_shrinks_with_unfused_loss():
    small = memory_plan.plan_micro_batch(LLAMA8B, max_length=1024, budget_bytes=10 * GIB, fixed_bytes=6 * GIB, fused_loss=True)
    large = memory_plan.plan_micro_batch(LLAMA8B, max_length=1024, budget_bytes=14 * GIB, fixed_bytes=6 * GIB, fused_loss=True)
    unfused = memory_plan.plan_micro_batch(LLAMA8B, max_length=1024, budget_bytes=14 * GIB, fixed_bytes=6 * GIB, fused_loss=False)
    assert small.rows < large.rows
    assert unfused.rows < large.rows


def test_plan_leaves_layers_uncheckpointed_only_when_memory_is_left():
    tight = memory_plan.plan_micro_batch(LLAMA8B, max_length=2048, budget_bytes=int(15.6 * GIB), fixed_bytes=int(5.5 * GIB),
                                     fused_loss=True)
    roomy = memory_plan.plan_micro_batch(LLAMA8B, max_length=2048, budget_bytes=72 * GIB, fixed_bytes=int(5.5 * GIB),
                                     fused_loss=True)
    # Not even room for one layer's activations: none (the last layer is free only where it would fit).
    assert tight.uncheckpointed_layers == 0
    assert roomy.checkpointing and roomy.rows == tight.rows and 1 < roomy.uncheckpointed_layers < LLAMA8B.layers
    per_layer = (memory_plan.layer_activation_bytes_per_token(LLAMA8B) - LLAMA8B.hidden * 2) * 5 // 4  # with the margin
    assert per_layer == memory_plan.uncheckpointed_layer_bytes_per_token(LLAMA8B, fused_kernels=False) * 5 // 4
    planned = roomy.fixed_bytes + roomy.tokens * (roomy.bytes_per_token + (roomy.uncheckpointed_layers - 1) * per_layer)
    assert planned <= roomy.budget_bytes < planned + roomy.tokens * per_layer  # as many as fit, not one more
    none_allowed = memory_plan.plan_micro_batch(LLAMA8B, max_length=2048, budget_bytes=72 * GIB, fixed_bytes=int(5.5 * GIB),
                                            fused_loss=True, allow_no_checkpointing=False)
    assert none_allowed.uncheckpointed_layers == 0


def test_plan_that_cannot_fit_one_row_names_the_numbers():
    with pytest.raises(MemoryError, match="maxLength"):
        memory_plan.plan_micro_batch(LLAMA8B, max_length=8192, budget_bytes=7 * GIB, fixed_bytes=6 * GIB, fused_loss=True)


def test_checkpointing_keeps_far_less_per_token():
    with_gc = memory_plan.activation_bytes_per_token(LLAMA8B, checkpointing=True, fused_loss=True)
    without = memory_plan.activation_bytes_per_token(LLAMA8B, checkpointing=False, fused_loss=True)
    assert 5 * with_gc < without


def test_memory_budget():
    assert memory_plan.memory_budget_bytes(80 * GIB) == int(72 * GIB)  # unset: 90% of the device
    assert memory_plan.memory_budget_bytes(80 * GIB, 15.6) == int(15.6 * GIB)
    assert memory_plan.memory_budget_bytes(80 * GIB, 200.0) == 80 * GIB  # never more than the device has


@pytest.mark.parametrize("env, strategy, expected_skip", [
    ({}, "ddp", 5),
    ({"KUBETUNE_SELECTIVE_CHECKPOINTING": "0"}, "ddp", 0),  # every layer checkpointed
    ({}, "deepspeed-zero3", 0),  # partitioned weights: the measured memory says nothing
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "ddp", 0),  # ZeRO-3 set by the launcher
])
def test_tune_sft_arguments_applies_the_plan(monkeypatch, env, strategy, expected_skip):
    from kubetune.trainer.config import parse_config
    from kubetune.trainer.performance import resolve

    plan = memory_plan.MicroBatchPlan(rows=6, tokens=6 * 2048, checkpointing=True, bytes_per_token=1, budget_bytes=2,
                                      fixed_bytes=1, uncheckpointed_layers=5)
    seen = {}

    def fake_plan(model, max_length, budget_gib, **kw):
        seen.update(max_length=max_length, budget_gib=budget_gib)
        return plan

    monkeypatch.setattr(memory_plan, "auto_micro_batch", fake_plan)
    cfg = parse_config({"baseModel": {"uri": "/m"}, "dataset": {"uri": "/d.jsonl", "maxLength": 2048},
                        "output": {"uri": "/o"}, "launch": {"strategy": strategy},
                        "training": {"performance": {"memoryBudgetGiB": 15.6}}})
    perf = resolve(cfg.training.performance, method=cfg.method, strategy=strategy, cuda=True, env=env)
    out, (skip, kept, on_host, kept_output) = memory_plan.tune_sft_arguments({"per_device_train_batch_size": 8}, object(),
                                                                             cfg, perf)
    assert seen == {"max_length": 2048, "budget_gib": 15.6}  # the config's budget reaches the planner
    assert out["per_device_train_batch_size"] == 6 and out["gradient_checkpointing"] is True
    assert out["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert skip == expected_skip and kept == 0 and not on_host and not kept_output  # the plan kept no attention outputs
    explicit = parse_config({**cfg.to_dict(), "training": {"batchSize": 3}})
    fixed, (skip, kept, _, _) = memory_plan.tune_sft_arguments({"per_device_train_batch_size": 3}, object(), explicit, perf)
    assert fixed["per_device_train_batch_size"] == 3 and skip == 0  # an explicit batch size is the user's


# ---------------------------------------------------------------- long context (issue 16 item 3)

def test_fused_estimate_stays_above_what_the_h200_measured():
    """Measured peaks (bench/RESULTS.md, fused kernels, every layer checkpointed): 5.45 GiB +
    7.39 GiB per 16k tokens (12.84 GiB at 16k, 20.23 at 32k). The fused estimate must not
    plan below them; the plain one (14.72 GiB at 16k tokens measured) neither."""
    fused = memory_plan.activation_bytes_per_token(LLAMA8B, checkpointing=True, fused_loss=True, fused_kernels=True)
    plain = memory_plan.activation_bytes_per_token(LLAMA8B, checkpointing=True, fused_loss=True)
    for tokens, measured_gib in ((16384, 12.84 - 5.45), (32768, 20.23 - 5.45)):
        assert measured_gib * GIB < fused * tokens < 1.2 * measured_gib * GIB
    assert (14.72 - 5.45) * GIB < plain * 16384
    assert fused < plain


def test_plan_at_2048_leaves_the_layers_the_h200_measured_room_for():
    """bench/RESULTS.md, issue 16, ninth round (8B, attention-only adapters, 8 x 2048 at a
    15.6 GiB budget): peak 12.22 GiB with 0 and with 1 layer uncheckpointed, 13.66 with 2,
    1.44 GiB per further layer. The plan leaves 2 (1 with adapters on the MLP too, whose
    inputs a layer also keeps), and its per-layer count is the measured one."""
    kw = dict(max_length=2048, budget_bytes=int(15.6 * GIB), fixed_bytes=int(5.52 * GIB), fused_loss=True,
              fused_kernels=True, host_budget_bytes=64 * GIB)
    plan = memory_plan.plan_micro_batch(LLAMA8B, adapted_mlp=False, **kw)
    assert (plan.rows, plan.checkpointing, plan.uncheckpointed_layers, plan.offload) == (8, True, 2, False)
    per_layer = memory_plan.uncheckpointed_layer_bytes_per_token(LLAMA8B, fused_kernels=True, adapted_mlp=False)
    assert abs(per_layer * plan.tokens / GIB - (13.66 - 12.22)) < 0.01
    assert memory_plan.plan_micro_batch(LLAMA8B, **kw).uncheckpointed_layers == 1
    both = memory_plan.uncheckpointed_layer_bytes_per_token(LLAMA8B, fused_kernels=True)
    assert both - per_layer == (LLAMA8B.hidden + LLAMA8B.intermediate) * 2


def test_the_free_last_layer_is_taken_only_where_it_would_fit_anyway():
    """Measured free on 8B only: where the left-over memory could not hold the layer, as for
    70B at 48 GiB (round6-3: 3 x 2048 tokens, 37.05 GiB after the load, 47.0 GiB peak with
    none), the plan leaves none, so an unmeasured shape never goes over its budget by it."""
    llama70b = memory_plan.ModelShape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256)
    plan = memory_plan.plan_micro_batch(llama70b, max_length=2048, budget_bytes=48 * GIB, fixed_bytes=int(37.05 * GIB),
                                        fused_loss=True, fused_kernels=True, adapted_mlp=False)
    spare = plan.budget_bytes - plan.fixed_bytes - plan.tokens * plan.bytes_per_token
    one = plan.tokens * memory_plan.uncheckpointed_layer_bytes_per_token(llama70b, fused_kernels=True, adapted_mlp=False)
    assert plan.rows == 3 and 0 < spare < one and plan.uncheckpointed_layers == 0
    roomier = memory_plan.plan_micro_batch(llama70b, max_length=2048, budget_bytes=48 * GIB + one - spare,
                                           fixed_bytes=int(37.05 * GIB), fused_loss=True, fused_kernels=True,
                                           adapted_mlp=False)
    assert roomier.uncheckpointed_layers == 1  # room for one: the last, at no cost


def test_long_row_that_does_not_fit_offloads_its_checkpoints_when_the_host_has_room():
    kw = dict(budget_bytes=int(13.6 * GIB), fixed_bytes=int(5.52 * GIB), fused_loss=True, fused_kernels=True)
    on_gpu = memory_plan.plan_micro_batch(LLAMA8B, max_length=16384, host_budget_bytes=64 * GIB, **kw)
    assert not on_gpu.offload and on_gpu.rows == 1  # fits with the checkpoints on the GPU: no offload
    plan = memory_plan.plan_micro_batch(LLAMA8B, max_length=32768, host_budget_bytes=64 * GIB, **kw)
    assert plan.offload and plan.rows == 1 and plan.checkpointing and plan.uncheckpointed_layers == 0
    assert plan.host_bytes == 32768 * 32 * 4096 * 2  # the 32 layer inputs of the row, bf16
    assert plan.fixed_bytes + plan.bytes_per_token * 32768 <= kw["budget_bytes"]
    # the host cannot hold them: the planner refuses, naming both memories
    with pytest.raises(MemoryError, match="host"):
        memory_plan.plan_micro_batch(LLAMA8B, max_length=32768, host_budget_bytes=4 * GIB, **kw)
    with pytest.raises(MemoryError):  # nor does a GPU too small for even the offloaded row
        memory_plan.plan_micro_batch(LLAMA8B, max_length=131072, host_budget_bytes=64 * GIB, **kw)


def test_host_budget_is_half_of_what_is_available_shared_by_the_nodes_ranks():
    b = memory_plan.host_budget_bytes({})
    avail = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemAvailable:"))
    assert 0 < b <= avail // 2
    # four ranks on the node plan at once, each from the same available memory: a quarter each
    four = memory_plan.host_budget_bytes({"LOCAL_WORLD_SIZE": "4"})
    assert 0 < four <= avail // 2 // 4 and abs(four - b // 4) < b // 8


def test_tune_sft_arguments_turns_offloading_on_with_the_plan(monkeypatch):
    from kubetune.trainer.config import parse_config
    from kubetune.trainer.performance import resolve

    plan = memory_plan.MicroBatchPlan(rows=1, tokens=32768, checkpointing=True, bytes_per_token=1, budget_bytes=2,
                                      fixed_bytes=1, offload=True, host_bytes=8 * GIB)
    seen = {}

    def fake_plan(model, max_length, budget_gib, **kw):
        seen.update(kw)
        return plan

    monkeypatch.setattr(memory_plan, "auto_micro_batch", fake_plan)
    for strategy, offload_allowed in (("ddp", True), ("deepspeed-zero3", False)):
        cfg = parse_config({"baseModel": {"uri": "/m"}, "dataset": {"uri": "/d.jsonl", "maxLength": 32768},
                            "output": {"uri": "/o"}, "launch": {"strategy": strategy}})
        perf = resolve(cfg.training.performance, method=cfg.method, strategy=strategy, cuda=True, liger_installed=True)
        out, _ = memory_plan.tune_sft_arguments({"per_device_train_batch_size": 8}, object(), cfg, perf)
        assert out["activation_offloading"] is True and out["per_device_train_batch_size"] == 1
        assert seen["allow_offload"] is offload_allowed
        assert seen["fused_kernels"] is (perf.liger and perf.fused_lora)


def test_offload_stash_is_what_the_plan_counted(monkeypatch):
    import sys
    import types

    made = {}
    fake = types.ModuleType("trl.models.activation_offloading")
    fake.get_act_offloading_ctx_manager = lambda model, max_fwd_stash_size: made.setdefault("ctx", (model, max_fwd_stash_size))
    monkeypatch.setitem(sys.modules, "trl.models.activation_offloading", fake)
    trainer = types.SimpleNamespace(args=types.SimpleNamespace(activation_offloading=False), model="m",
                                    maybe_activation_offload_context="default")
    assert not memory_plan.use_offload_stash(trainer) and trainer.maybe_activation_offload_context == "default"
    trainer.args.activation_offloading = True
    assert memory_plan.use_offload_stash(trainer)
    assert trainer.maybe_activation_offload_context == ("m", memory_plan.OFFLOAD_STASH_LAYERS) == made["ctx"]
    # the plan reserves that many layer inputs on the GPU
    shape = LLAMA8B
    off = memory_plan.activation_bytes_per_token(shape, checkpointing=True, fused_loss=True, fused_kernels=True, offload=True)
    on = memory_plan.activation_bytes_per_token(shape, checkpointing=True, fused_loss=True, fused_kernels=True)
    assert on - off == (shape.layers - memory_plan.OFFLOAD_STASH_LAYERS) * shape.hidden * 2


def test_kept_attention_outputs_take_the_memory_left_over():
    shape = memory_plan.ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
    common = dict(max_length=2048, budget_bytes=int(15.6 * GIB), fixed_bytes=int(5.0 * GIB), fused_loss=True,
                  fused_kernels=True)
    off = memory_plan.plan_micro_batch(shape, **common)
    on = memory_plan.plan_micro_batch(shape, keep_attention=True, **common)
    assert off.kept_attention_layers == 0
    assert (on.rows, on.uncheckpointed_layers) == (off.rows, off.uncheckpointed_layers)  # it only uses what is left
    per_layer = on.tokens * memory_plan.attention_output_bytes_per_token(shape) * 5 // 4
    assert per_layer == 16384 * (4096 * 2 + 32 * 4) * 5 // 4  # the output in bf16, an fp32 log-sum-exp per head
    further = on.tokens * memory_plan.uncheckpointed_layer_bytes_per_token(shape, fused_kernels=True) * 5 // 4
    left = on.budget_bytes - on.fixed_bytes - on.tokens * on.bytes_per_token - (on.uncheckpointed_layers - 1) * further
    assert 0 < on.kept_attention_layers == left // per_layer < 32 - on.uncheckpointed_layers
    # room for everything: every checkpointed layer keeps its output, no more
    roomy = memory_plan.plan_micro_batch(shape, keep_attention=True, allow_no_checkpointing=False,
                                         **{**common, "budget_bytes": 60 * GIB})
    assert roomy.checkpointing and roomy.kept_attention_layers == 32
    # long rows with offloaded checkpoints: every layer's output goes to the host with them
    plain = memory_plan.plan_micro_batch(shape, host_budget_bytes=64 * GIB,
                                         **{**common, "max_length": 16384, "budget_bytes": int(9.6 * GIB)})
    long = memory_plan.plan_micro_batch(shape, keep_attention_on_host=True, host_budget_bytes=64 * GIB,
                                        **{**common, "max_length": 16384, "budget_bytes": int(9.6 * GIB)})
    assert plain.offload and long.offload and long.kept_attention_layers == 32
    # outputs and statistics, and the output projections' outputs: 8 GiB
    assert long.host_bytes - plain.host_bytes == 16384 * 32 * (4096 * 2 + 32 * 4 + 4096 * 2) and long.kept_output_on_host
    assert long.bytes_per_token == plain.bytes_per_token  # the GPU's share (the output being fetched) fits what is left
    # a host without room for the outputs, or a GPU without room for the statistics: none kept
    tight_host = memory_plan.plan_micro_batch(shape, keep_attention_on_host=True, host_budget_bytes=plain.host_bytes + GIB,
                                              **{**common, "max_length": 16384, "budget_bytes": int(9.6 * GIB)})
    assert tight_host.offload and tight_host.kept_attention_layers == 0 and tight_host.host_bytes == plain.host_bytes
    gpu_need = 16384 * (4096 * 2 + 32 * 4) * 5 // 4
    tight_gpu = memory_plan.plan_micro_batch(
        shape, keep_attention_on_host=True, host_budget_bytes=64 * GIB,
        **{**common, "max_length": 16384,
           "budget_bytes": common["fixed_bytes"] + 16384 * plain.bytes_per_token + gpu_need - 1})
    assert tight_gpu.offload and tight_gpu.kept_attention_layers == 0
    # room on the GPU for one attention output in flight but not for the projection's beside it:
    # the attention's alone
    attention_only = memory_plan.plan_micro_batch(
        shape, keep_attention_on_host=True, host_budget_bytes=64 * GIB,
        **{**common, "max_length": 16384,
           "budget_bytes": common["fixed_bytes"] + 16384 * plain.bytes_per_token + gpu_need})
    assert attention_only.kept_attention_layers == 32 and not attention_only.kept_output_on_host
    assert attention_only.host_bytes - plain.host_bytes == 16384 * 32 * (4096 * 2 + 32 * 4)


def test_checkpointed_layers_keep_their_attention_output_on_the_host_beside_gpu_checkpoints():
    """8B at 8 x 2,048 under 15.6 GiB: the checkpoints stay on the GPU, and every checkpointed
    layer's attention output goes to the host for its recompute, for one layer's output in
    flight on the GPU (issue 16, thirteenth round)."""
    shape = memory_plan.ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
    common = dict(max_length=2048, budget_bytes=int(15.6 * GIB), fixed_bytes=int(5.0 * GIB), fused_loss=True,
                  fused_kernels=True)
    off = memory_plan.plan_micro_batch(shape, **common)
    host = memory_plan.plan_micro_batch(shape, keep_attention_on_host=True, host_budget_bytes=64 * GIB, **common)
    assert not off.kept_attention_on_host and off.kept_attention_layers == 0 and off.host_bytes == 0
    assert (host.rows, host.uncheckpointed_layers, host.offload) == (off.rows, off.uncheckpointed_layers, False)
    assert host.uncheckpointed_layers > 0 and host.kept_attention_on_host
    assert host.kept_attention_layers == 32 - host.uncheckpointed_layers  # every checkpointed layer, no more
    assert host.kept_output_on_host  # the output projections' outputs beside them
    assert host.host_bytes == 16384 * host.kept_attention_layers * (4096 * 2 + 32 * 4 + 4096 * 2)
    # allowed on the GPU too: the host still takes them all (one in flight instead of many kept)
    both = memory_plan.plan_micro_batch(shape, keep_attention=True, keep_attention_on_host=True,
                                        host_budget_bytes=64 * GIB, **common)
    assert both == host
    # a host with room for the attention's outputs only: those alone
    attention_bytes = 16384 * host.kept_attention_layers * (4096 * 2 + 32 * 4)
    alone = memory_plan.plan_micro_batch(shape, keep_attention_on_host=True, host_budget_bytes=host.host_bytes - 1,
                                         **common)
    assert alone.kept_attention_layers == host.kept_attention_layers and alone.kept_attention_on_host
    assert not alone.kept_output_on_host and alone.host_bytes == attention_bytes
    # not asked to keep the output projections' outputs: the attention's alone, and only their bytes counted
    unasked = memory_plan.plan_micro_batch(shape, keep_attention_on_host=True, keep_output_on_host=False,
                                           host_budget_bytes=64 * GIB, **common)
    assert unasked == alone
    # a host without room: none there; on the GPU only where allowed, in what is left over
    small_host = attention_bytes - 1
    none = memory_plan.plan_micro_batch(shape, keep_attention_on_host=True, host_budget_bytes=small_host, **common)
    assert none == off
    gpu = memory_plan.plan_micro_batch(shape, keep_attention=True, keep_attention_on_host=True,
                                       host_budget_bytes=small_host, **common)
    assert gpu == memory_plan.plan_micro_batch(shape, keep_attention=True, **common)
    assert 0 < gpu.kept_attention_layers < host.kept_attention_layers and not gpu.kept_attention_on_host
    # a GPU without room for the output in flight: none kept
    further = off.tokens * memory_plan.uncheckpointed_layer_bytes_per_token(shape, fused_kernels=True) * 5 // 4
    left = off.budget_bytes - off.fixed_bytes - off.tokens * off.bytes_per_token - (off.uncheckpointed_layers - 1) * further
    in_flight = off.tokens * (4096 * 2 + 32 * 4) * 5 // 4  # the attention's output alone
    assert left >= in_flight  # this budget has room for it
    tight = memory_plan.plan_micro_batch(shape, keep_attention_on_host=True, host_budget_bytes=64 * GIB,
                                         **{**common, "budget_bytes": common["budget_bytes"] - (left - in_flight) - 1})
    assert tight.uncheckpointed_layers == off.uncheckpointed_layers and tight.kept_attention_layers == 0
    # every layer uncheckpointed: nothing to keep
    roomy = memory_plan.plan_micro_batch(shape, keep_attention_on_host=True, host_budget_bytes=64 * GIB,
                                         **{**common, "budget_bytes": 200 * GIB})
    assert not roomy.checkpointing and roomy.kept_attention_layers == 0 and roomy.host_bytes == 0


def test_tune_sft_arguments_says_where_the_outputs_are_kept(monkeypatch):
    from kubetune.trainer.config import parse_config
    from kubetune.trainer.performance import resolve

    seen = {}
    for on_host in (True, False):
        plan = memory_plan.MicroBatchPlan(rows=8, tokens=16384, checkpointing=True, bytes_per_token=1, budget_bytes=2,
                                          fixed_bytes=1, uncheckpointed_layers=2, kept_attention_layers=30,
                                          kept_attention_on_host=on_host, kept_output_on_host=on_host)
        monkeypatch.setattr(memory_plan, "auto_micro_batch", lambda model, max_length, budget_gib, **kw: seen.update(kw) or plan)
        cfg = parse_config({"baseModel": {"uri": "/m"}, "dataset": {"uri": "/d.jsonl", "maxLength": 2048},
                            "output": {"uri": "/o"}})
        perf = resolve(cfg.training.performance, method=cfg.method, strategy="ddp", cuda=True, liger_installed=True)
        _, choices = memory_plan.tune_sft_arguments({"per_device_train_batch_size": 8}, object(), cfg, perf)
        assert choices == (2, 30, on_host, on_host)
        assert seen["keep_attention_on_host"] is (perf.attention == "varlen")
        assert seen["keep_output_on_host"] is True  # KUBETUNE_KEEP_OUTPUT unset
    monkeypatch.setenv("KUBETUNE_KEEP_OUTPUT", "0")
    memory_plan.tune_sft_arguments({"per_device_train_batch_size": 8}, object(), cfg, perf)
    assert seen["keep_output_on_host"] is False  # the plan itself leaves them out (and their host bytes)


def test_keeping_the_output_projections_outputs_is_on_unless_turned_off():
    assert memory_plan.keeps_output_on_host({}) is True
    assert memory_plan.keeps_output_on_host({"KUBETUNE_KEEP_OUTPUT": "1"}) is True
    assert memory_plan.keeps_output_on_host({"KUBETUNE_KEEP_OUTPUT": "0"}) is False
    with pytest.raises(ValueError, match="KUBETUNE_KEEP_OUTPUT='no'"):
        memory_plan.keeps_output_on_host({"KUBETUNE_KEEP_OUTPUT": "no"})


def test_kept_attention_goes_to_the_host_by_default_and_needs_the_varlen_kernel():
    from kubetune.trainer.performance import Resolved

    def perf(attention):
        return Resolved(attention=attention, liger=True, fused_lora=True, fp8=True, compile=False,
                        selective_checkpointing=True, memory_budget_gib=None)

    assert memory_plan.kept_attention_modes(perf("varlen"), {}) == (False, True)
    assert memory_plan.kept_attention_modes(perf("varlen"), {"KUBETUNE_KEEP_ATTENTION": "1"}) == (True, True)
    assert memory_plan.kept_attention_modes(perf("varlen"), {"KUBETUNE_KEEP_ATTENTION": "0"}) == (False, False)
    assert memory_plan.kept_attention_modes(perf("sdpa"), {"KUBETUNE_KEEP_ATTENTION": "1"}) == (False, False)
    with pytest.raises(ValueError, match="KUBETUNE_KEEP_ATTENTION='yes'"):
        memory_plan.kept_attention_modes(perf("varlen"), {"KUBETUNE_KEEP_ATTENTION": "yes"})


def test_adapters_on_the_mlp_are_seen_by_their_path():
    import torch.nn as nn

    def model(*targets):
        root = nn.Module()
        root.layers = nn.ModuleList([nn.Module()])
        block = root.layers[0]
        block.self_attn, block.mlp = nn.Module(), nn.Module()
        for part, proj in targets:
            layer = nn.Linear(2, 2)
            layer.lora_A = nn.ModuleDict()  # what marks a PEFT LoRA layer
            setattr(getattr(block, part), proj, layer)
        return root

    assert not memory_plan.adapts_mlp(model(("self_attn", "q_proj"), ("self_attn", "v_proj")))
    assert memory_plan.adapts_mlp(model(("self_attn", "q_proj"), ("mlp", "down_proj")))
    assert not memory_plan.adapts_mlp(model())


def test_a_set_count_of_uncheckpointed_layers_replaces_the_plans():
    env = memory_plan.UNCHECKPOINTED_ENV
    assert memory_plan.forced_uncheckpointed_layers(2, environ={}) == 2
    assert memory_plan.forced_uncheckpointed_layers(2, environ={env: "0"}) == 0
    assert memory_plan.forced_uncheckpointed_layers(0, environ={env: "5"}) == 5
    with pytest.raises(ValueError, match=env):
        memory_plan.forced_uncheckpointed_layers(0, environ={env: "two"})


def test_the_adapters_kept_products_are_planned_with_the_checkpoints():
    import torch.nn as nn

    root = nn.Module()
    for name, rank in (("q_proj", 16), ("v_proj", 8)):
        layer = nn.Linear(4, 4)
        layer.lora_A = nn.ModuleDict({"default": nn.Linear(4, rank, bias=False)})
        setattr(root, name, layer)
    assert memory_plan.adapter_product_bytes_per_token(root) == (16 + 8) * 2
    shape8b_q_k_v_o = 32 * 4 * 16 * 2  # 4 KiB per token on 8B, rank 16
    kw = dict(max_length=2048, budget_bytes=int(15.6 * GIB), fixed_bytes=int(5.52 * GIB), fused_loss=True,
              fused_kernels=True, adapted_mlp=False)
    without = memory_plan.plan_micro_batch(LLAMA8B, **kw)
    planned = memory_plan.plan_micro_batch(LLAMA8B, adapter_products=shape8b_q_k_v_o, **kw)
    assert planned.bytes_per_token == without.bytes_per_token + shape8b_q_k_v_o
    assert (planned.rows, planned.uncheckpointed_layers) == (without.rows, without.uncheckpointed_layers) == (8, 2)


def test_the_plans_token_cap_can_be_set_for_a_benchmark():
    env = memory_plan.MAX_AUTO_TOKENS_ENV
    assert memory_plan.max_auto_tokens(environ={}) == memory_plan.MAX_AUTO_TOKENS
    assert memory_plan.max_auto_tokens(environ={env: "18432"}) == 18432
    for bad in ("0", "lots", "-5"):
        with pytest.raises(ValueError, match=env):
            memory_plan.max_auto_tokens(environ={env: bad})
    # the cap bounds the rows: 9 of 2,048 tokens where 18,432 are allowed and memory holds them
    shape = memory_plan.ModelShape(4096, 14336, 32, 32, 8, 128256)
    plan = memory_plan.plan_micro_batch(shape, max_length=2048, budget_bytes=80 * memory_plan.GIB,
                                        fixed_bytes=6 * memory_plan.GIB, fused_loss=True, fused_kernels=True,
                                        max_tokens=memory_plan.max_auto_tokens(environ={env: "18432"}))
    assert plan.rows == 9 and plan.tokens == 18432
