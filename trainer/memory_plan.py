"""How many rows a micro-batch holds, and which layers skip checkpointing.

Why: the right micro-batch depends on the GPU's memory, the model's shape and
dataset.maxLength; too small wastes the tensor cores, too large is a CUDA OOM
an hour in. With `training.batchSize: auto` the trainer sizes it from an
estimate of the activations per token (`activation_bytes_per_token`) against a
memory budget (training.performance.memoryBudgetGiB, default 90% of the GPU),
prefers no activation checkpointing when that fits 16k tokens, and otherwise
checkpoints and leaves as many of the last layers uncheckpointed as the
spare memory holds (selective checkpointing). When not even one row fits with
checkpointing (long context under a tight budget), the checkpointed layer
inputs go to host memory (TRL's activation offloading, on a side stream): one
row then needs about half the GPU memory, as long as the host has room. Either way the
checkpointed layers keep their attention outputs (and their output projections') in host
memory for the recompute where the host has room and the GPU has room for one layer's in
flight (`plan_micro_batch`, `keep_attention_on_host`).

`plan_micro_batch` is pure arithmetic on the model's shape, unit tested on a
CPU; `auto_micro_batch` feeds it the device's numbers (torch is imported
there, when called).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

from kubetune.trainer.performance import Resolved

log = logging.getLogger(__name__)

# A micro-batch past this many tokens gains almost nothing in throughput on an
# 8B model (the matrix products are already large) and only costs memory.
MAX_AUTO_TOKENS = 16384
GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            vocab=config.vocab_size,
        )


def layer_activation_bytes_per_token(shape: ModelShape, bytes_per_value: int = 2) -> int:
    """What one decoder layer keeps for its backward, per token, when it is not
    checkpointed (see `activation_bytes_per_token`)."""
    kv = shape.hidden // shape.heads * shape.kv_heads
    return (7 * shape.hidden + 2 * kv + 4 * shape.intermediate) * bytes_per_value


def uncheckpointed_layer_bytes_per_token(shape: ModelShape, *, fused_kernels: bool, adapted_mlp: bool = True,
                                         bytes_per_value: int = 2) -> int:
    """What one more decoder layer left uncheckpointed keeps per token beyond its checkpointed
    input. With the fused kernels (Liger, the fused LoRA node; FP8 or not) that is known
    tensor by tensor: the attention block keeps the first norm's output (its LoRA input), q,
    k, v and the attention output (also o_proj's LoRA input); the second norm its input; the
    SwiGLU its gate and up outputs; and with adapters on the MLP, their inputs too (the
    second norm's output, the SwiGLU product). Measured on one H200, 8B with attention-only
    adapters: 1.44 GiB per 16,384 tokens, this count exactly (bench/RESULTS.md, issue 16,
    ninth round). Otherwise `layer_activation_bytes_per_token` less the input."""
    if not fused_kernels:
        return max(1, layer_activation_bytes_per_token(shape, bytes_per_value) - shape.hidden * bytes_per_value)
    kv = shape.hidden // shape.heads * shape.kv_heads
    values = 4 * shape.hidden + 2 * kv + 2 * shape.intermediate
    if adapted_mlp:
        values += shape.hidden + shape.intermediate
    return values * bytes_per_value


# With checkpointing, how many layers' worth of activations are live at once besides the
# checkpoints (the recomputed layer and the gradients flowing through it). Measured on one
# H200 (bench/RESULTS.md, issue 16): 1.17 with the fused kernels (Liger + fused LoRA; 12.84
# GiB at 16k tokens, 20.23 GiB at 32k, both 5.45 GiB + 0.46 MiB per token), 1.79 on the
# plain path (14.72 GiB at 16k tokens). Planned with a margin over each.
LIVE_LAYERS_FUSED = 1.25
LIVE_LAYERS_PLAIN = 2.0
# With offloading, the last few offloaded tensors stay on the GPU until their copy is done
# (OffloadActivations' max_fwd_stash_size; TRL's default 5, the trainer sets this): that many
# layer inputs. A layer input's copy (8 KiB per token over PCIe) takes a fraction of the
# layer's forward, so two in flight keep the copies hidden.
OFFLOAD_STASH_LAYERS = 2


def checkpoint_bytes_per_token(shape: ModelShape, bytes_per_value: int = 2) -> int:
    """The checkpointed layer inputs kept for the whole step (what offloading moves to the host)."""
    return shape.layers * shape.hidden * bytes_per_value


def attention_output_bytes_per_token(shape: ModelShape, bytes_per_value: int = 2) -> int:
    """What keeping one layer's attention output for its recompute costs per token: the
    output (query heads x head dim, the hidden size) and a fp32 log-sum-exp per head
    (`packed_attention.KeptAttention`)."""
    return shape.hidden * bytes_per_value + shape.heads * 4


def host_kept_bytes_per_token(shape: ModelShape, bytes_per_value: int = 2) -> int:
    """What one layer keeping its attention output in host memory moves there per token: the
    output and its statistics, and the output projection's output (hidden-sized), which the
    recompute takes too (`packed_attention.HostKeptAttention.keep_output`). The GPU holds as
    much for the layer being fetched."""
    return attention_output_bytes_per_token(shape, bytes_per_value) + shape.hidden * bytes_per_value


def activation_bytes_per_token(shape: ModelShape, *, checkpointing: bool, fused_loss: bool, bytes_per_value: int = 2,
                               fused_kernels: bool = False, offload: bool = False) -> int:
    """Estimated training memory per token of a micro-batch (bf16 activations).

    One decoder layer keeps about 7 hidden-sized tensors (norm inputs, the
    q/k/v/o/gate/up inputs, attention output), 2 kv-sized ones and 4
    intermediate-sized ones (gate, up, their product, the SwiGLU
    intermediate). With gradient checkpointing only each layer's input stays
    for the whole step (on the host with `offload`) and about one layer is live
    at a time (`LIVE_LAYERS_*`: fewer with the fused kernels). Without a fused
    loss the fp32 logits and their gradient add 2 x 4 bytes x vocab.
    Deliberately a little generous: the planner should not plan an OOM.
    """
    per_layer = layer_activation_bytes_per_token(shape, bytes_per_value)
    if checkpointing:
        live_layers = LIVE_LAYERS_FUSED if fused_kernels else LIVE_LAYERS_PLAIN
        kept = (min(OFFLOAD_STASH_LAYERS, shape.layers) * shape.hidden * bytes_per_value if offload
                else checkpoint_bytes_per_token(shape, bytes_per_value))
        live = kept + int(live_layers * per_layer)
    else:
        live = shape.layers * per_layer
    loss = 2 * shape.hidden * bytes_per_value if fused_loss else 2 * 4 * shape.vocab
    return live + loss


@dataclass(frozen=True)
class MicroBatchPlan:
    rows: int
    tokens: int
    checkpointing: bool
    bytes_per_token: int
    budget_bytes: int
    fixed_bytes: int
    # With checkpointing: how many of the last layers keep their activations instead
    # (no recompute for them), in the memory the micro-batch leaves over.
    uncheckpointed_layers: int = 0
    # The checkpointed layer inputs live in host memory (one row did not fit otherwise).
    offload: bool = False
    host_bytes: int = 0  # what the plan puts in host memory: offloaded checkpoints, kept attention outputs
    # With checkpointing: how many checkpointed layers keep their attention output for the
    # recompute, in host memory (`kept_attention_on_host`) or the GPU memory left after the above.
    kept_attention_layers: int = 0
    kept_attention_on_host: bool = False
    # On the host, the output projection's output is kept beside it (its recompute skipped).
    kept_output_on_host: bool = False


def plan_micro_batch(
    shape: ModelShape,
    *,
    max_length: int,
    budget_bytes: int,
    fixed_bytes: int,
    fused_loss: bool,
    allow_no_checkpointing: bool = True,
    max_tokens: int = MAX_AUTO_TOKENS,
    fused_kernels: bool = False,
    host_budget_bytes: int = 0,
    keep_attention: bool = False,
    keep_attention_on_host: bool = False,
    keep_output_on_host: bool = True,
    adapted_mlp: bool = True,
    adapter_products: int = 0,
) -> MicroBatchPlan:
    """Rows of `max_length` tokens per micro-batch that fit `budget_bytes`.

    `fixed_bytes` is what is already taken (weights, adapter, optimizer
    state). Without checkpointing is preferred (a third less compute) when at
    least `max_tokens` fit that way; otherwise checkpointing and as many rows
    as fit, up to `max_tokens`, and then as many of the last layers left
    uncheckpointed as the remaining memory holds. At least one row: if even
    that does not fit, the checkpoints go to the host (`offload`) when
    `host_budget_bytes` holds them; otherwise raise with the numbers, rather
    than fail later with a CUDA OOM. `fused_kernels`: Liger and the fused LoRA
    node run (they keep less per layer); `adapted_mlp`: adapters on the MLP's projections
    (their inputs are kept too); `adapter_products`: bytes per token of every adapter's
    rank-r product, which checkpointed layers keep for their recompute
    (`adapter_product_bytes_per_token`). `keep_attention`: the memory left after all
    that goes to checkpointed layers that keep their attention output for the recompute
    (`kept_attention_layers`; the attention kernel can, `packed_attention.KeptAttention`).
    `keep_attention_on_host`: every checkpointed layer keeps its attention output in host
    memory when host and GPU have room (`packed_attention.HostKeptAttention`), beside the
    checkpoints wherever they are; where it does, `keep_attention` is not needed.
    `keep_output_on_host`: the output projection's output goes there beside it where both fit
    (`kept_output_on_host`); False, the attention's alone.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    free = budget_bytes - fixed_bytes
    cap_rows = max(1, max_tokens // max_length)
    if allow_no_checkpointing:
        per_tok = activation_bytes_per_token(shape, checkpointing=False, fused_loss=fused_loss, fused_kernels=fused_kernels)
        rows = min(cap_rows, free // (per_tok * max_length)) if free > 0 else 0
        if rows >= cap_rows:
            return MicroBatchPlan(rows, rows * max_length, False, per_tok, budget_bytes, fixed_bytes)
    # Checkpointed, the adapters' rank-r products stay from each first forward to its
    # recompute (`lora_dropout.KeptProducts`).
    per_tok = activation_bytes_per_token(shape, checkpointing=True, fused_loss=fused_loss,
                                         fused_kernels=fused_kernels) + adapter_products
    rows = min(cap_rows, free // (per_tok * max_length)) if free > 0 else 0
    if rows >= 1:
        # Selective checkpointing: the recompute is a third of the step's matrix work, so
        # every layer that fits uncheckpointed in the left-over memory is one less to redo.
        # The last layer costs nothing: its backward comes first, and holds the same
        # activations whether kept or recomputed (measured: the same peak with it on 8B). It
        # is taken only where it would fit anyway, since that was measured on one shape. Each
        # further one keeps its activations in place of its saved input until its backward:
        # planned a quarter over `uncheckpointed_layer_bytes_per_token`, since a layer too
        # many costs an OOM and a retry.
        spare = free - rows * max_length * per_tok
        kept_by_one = rows * max_length * uncheckpointed_layer_bytes_per_token(
            shape, fused_kernels=fused_kernels, adapted_mlp=adapted_mlp)
        extra = kept_by_one * 5 // 4
        skip = 0
        if allow_no_checkpointing and spare >= kept_by_one:
            skip = int(min(shape.layers, 1 + spare // extra))
        spare -= max(0, skip - 1) * extra
        tokens = int(rows) * max_length
        # Kept on the host first: every checkpointed layer's, for the GPU memory of one in flight.
        kept = shape.layers - skip
        moved = (_host_kept_per_token(shape, spare, host_budget_bytes, tokens, kept, keep_output_on_host)
                 if keep_attention_on_host else 0)
        if kept and moved:
            return MicroBatchPlan(int(rows), tokens, True, per_tok, budget_bytes, fixed_bytes, skip,
                                  host_bytes=tokens * kept * moved, kept_attention_layers=kept,
                                  kept_attention_on_host=True,
                                  kept_output_on_host=moved == host_kept_bytes_per_token(shape))
        kept = _kept_attention(shape, spare, tokens, shape.layers - skip) if keep_attention else 0
        return MicroBatchPlan(int(rows), tokens, True, per_tok, budget_bytes, fixed_bytes, skip,
                              kept_attention_layers=kept)
    # Not one row: the checkpoints to the host, one row at a time (a long-context run).
    off_tok = activation_bytes_per_token(shape, checkpointing=True, fused_loss=fused_loss, fused_kernels=fused_kernels,
                                         offload=True) + adapter_products
    host = max_length * checkpoint_bytes_per_token(shape)
    if free >= off_tok * max_length and host <= host_budget_bytes:
        # The checkpoints on the host: so are the kept attention outputs, for every layer or none.
        moved = (_host_kept_per_token(shape, free - off_tok * max_length, host_budget_bytes - host, max_length,
                                      shape.layers, keep_output_on_host) if keep_attention_on_host else 0)
        kept = shape.layers if moved else 0
        return MicroBatchPlan(1, max_length, True, off_tok, budget_bytes, fixed_bytes, 0, offload=True,
                              host_bytes=host + max_length * kept * moved, kept_attention_layers=kept,
                              kept_attention_on_host=kept > 0,
                              kept_output_on_host=kept > 0 and moved == host_kept_bytes_per_token(shape))
    host_note = (f"; with the checkpoints in host memory it would need {off_tok * max_length / GIB:.1f} GiB here and "
                 f"{host / GIB:.1f} GiB of the host's {host_budget_bytes / GIB:.1f} GiB") if host_budget_bytes else ""
    raise MemoryError(
        f"one row of {max_length} tokens needs about {per_tok * max_length / GIB:.1f} GiB of activations "
        f"but only {max(free, 0) / GIB:.1f} GiB of the {budget_bytes / GIB:.1f} GiB budget is left after "
        f"{fixed_bytes / GIB:.1f} GiB of weights{host_note}; lower dataset.maxLength or raise "
        "training.performance.memoryBudgetGiB"
    )


def _kept_attention(shape: ModelShape, spare: int, tokens: int, checkpointed: int) -> int:
    # A quarter over the estimate, as for uncheckpointed layers: a layer too many is an OOM.
    per_layer = tokens * attention_output_bytes_per_token(shape) * 5 // 4
    return int(min(checkpointed, max(0, spare // per_layer)))


def _host_kept_per_token(shape: ModelShape, spare: int, host_spare: int, tokens: int, layers: int,
                         with_output: bool = True) -> int:
    """What `layers` layers keeping their attention output in host memory
    (`packed_attention.HostKeptAttention`) move there per token and layer: with the output
    projection's output (`host_kept_bytes_per_token`) where that fits and `with_output`, else
    the attention's alone, else 0. Fits: the host holds every layer's, and the GPU the next
    layer's while it is fetched (the one in use stands in for what the recompute would have
    made, already counted): what one layer kept on the GPU costs, with the same quarter over
    the estimate."""
    tried = (host_kept_bytes_per_token(shape),) if with_output else ()
    for per_token in (*tried, attention_output_bytes_per_token(shape)):
        per_layer = tokens * per_token
        if per_layer * 5 // 4 <= spare and layers * per_layer <= host_spare:
            return per_token
    return 0


def memory_budget_bytes(device_total_bytes: int, budget_gib: Optional[float] = None) -> int:
    """What the plan may use: `budget_gib` (training.performance.memoryBudgetGiB, or its
    environment override) capped at the device, else 90% of the device (the rest: the
    CUDA context, the allocator's fragmentation, NCCL buffers)."""
    if budget_gib is None:
        return int(device_total_bytes * 0.9)
    return min(int(budget_gib * GIB), device_total_bytes)


def host_budget_bytes(environ: Optional[dict] = None) -> int:
    """Host memory this process's offloaded checkpoints and kept attention outputs may take:
    half of what is available now (the container's cgroup limit where it is lower than the
    machine's), leaving the rest to the data loader, pinned staging buffers and the page
    cache, shared with the node's other ranks (LOCAL_WORLD_SIZE, set by the launcher), which
    plan at the same time from the same figure."""
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        return 0
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                raw = f.read().strip()
            if raw != "max" and int(raw) < 2**60:
                with open(usage_file) as f:
                    avail = min(avail, int(raw) - int(f.read().strip()))
            break
        except (OSError, ValueError):
            continue
    env = os.environ if environ is None else environ
    ranks = env.get("LOCAL_WORLD_SIZE") or "1"
    return max(0, avail // 2 // (int(ranks) if ranks.isdigit() and int(ranks) > 0 else 1))


def auto_micro_batch(model, max_length: int, budget_gib: Optional[float] = None, fused_kernels: bool = False,
                     allow_offload: bool = True, keep_attention: bool = False,
                     keep_attention_on_host: bool = False, keep_output_on_host: bool = True,
                     max_tokens: int = MAX_AUTO_TOKENS) -> MicroBatchPlan:
    """Plan the micro-batch on the current CUDA device, after the model
    (and adapter) are loaded there."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    fixed = torch.cuda.memory_allocated()
    # LoRA parameters get fp32 grads and two Adam moments: 3 more copies.
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    fixed += 3 * trainable
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return plan_micro_batch(
        ModelShape.from_config(base.config),
        max_length=max_length,
        budget_bytes=memory_budget_bytes(total, budget_gib),
        fixed_bytes=fixed,
        fused_loss=True,  # TRL's SFTTrainer computes the loss with a chunked LM head
        fused_kernels=fused_kernels,
        host_budget_bytes=host_budget_bytes() if allow_offload else 0,
        keep_attention=keep_attention,
        keep_attention_on_host=keep_attention_on_host,
        keep_output_on_host=keep_output_on_host,
        max_tokens=max_tokens,
        adapted_mlp=adapts_mlp(base),
        adapter_products=adapter_product_bytes_per_token(base) if fused_kernels else 0,
    )


def adapter_product_bytes_per_token(model, bytes_per_value: int = 2) -> int:
    """Per token, the rank-r products x @ A^T of every LoRA layer's adapters (what
    `lora_dropout.KeptProducts` holds for the checkpointed layers, in the compute dtype):
    4 KiB on 8B with rank 16 on q/k/v/o."""
    total = 0
    for m in model.modules():
        for adapter in getattr(m, "lora_A", {}).values():
            total += adapter.weight.shape[0] * bytes_per_value
    return total


def adapts_mlp(model) -> bool:
    """Whether any adapter (a LoRA layer: one with `lora_A`) sits outside the attention
    blocks (no `attn` or `attention` in its path), which counts as on the MLP: the safe side."""
    return any(hasattr(m, "lora_A") and "attn" not in name and "attention" not in name
               for name, m in model.named_modules())


# Kept attention outputs (bench/RESULTS.md, issue 16, fourth round): on the host beside
# offloaded checkpoints by default (7-9% faster at 16k and 32k tokens on 8B); in the GPU
# memory the plan leaves over only when asked (0.8% faster at 2,048 for 1.8 GiB more).
KEEP_ATTENTION_ENV = "KUBETUNE_KEEP_ATTENTION"


# "0": the output projections' outputs are not kept beside the attention's on the host (a
# benchmark knob, for what keeping them gains: bench/run.py's "nokeepout" variant).
KEEP_OUTPUT_ENV = "KUBETUNE_KEEP_OUTPUT"


def kept_attention_modes(perf: Resolved, environ: Optional[dict] = None) -> tuple[bool, bool]:
    """Where checkpointed layers may keep their attention output for the recompute:
    (in the GPU memory the plan leaves over, in host memory). Only with the varlen kernel,
    whose autograd node can reuse them. KUBETUNE_KEEP_ATTENTION: unset, the host only; "1",
    both (the GPU where the host has no room); "0", neither."""
    env = os.environ if environ is None else environ
    value = env.get(KEEP_ATTENTION_ENV) or ""
    if value not in ("", "0", "1"):
        raise ValueError(f"{KEEP_ATTENTION_ENV}={value!r}: expected 1 (also on the GPU) or 0 (never)")
    if perf.attention != "varlen":
        return False, False
    return value == "1", value != "0"


def keeps_output_on_host(environ: Optional[dict] = None) -> bool:
    """Whether the plan may keep the output projections' outputs beside the attention's on
    the host: yes unless KUBETUNE_KEEP_OUTPUT is "0"."""
    env = os.environ if environ is None else environ
    value = env.get(KEEP_OUTPUT_ENV) or ""
    if value not in ("", "0", "1"):
        raise ValueError(f"{KEEP_OUTPUT_ENV}={value!r}: expected 0 (the attention's outputs alone) or 1 (the default)")
    return value != "0"


# A set count of uncheckpointed layers in place of the plan's, for measuring what each one
# costs and saves (bench/run.py's "unckpt<N>" variants); unset, the plan decides.
UNCHECKPOINTED_ENV = "KUBETUNE_UNCHECKPOINTED_LAYERS"


def forced_uncheckpointed_layers(planned: int, model=None, environ: Optional[dict] = None) -> int:
    """`planned`, or the count KUBETUNE_UNCHECKPOINTED_LAYERS sets (at most the model's layers)."""
    env = os.environ if environ is None else environ
    value = env.get(UNCHECKPOINTED_ENV) or ""
    if not value:
        return planned
    if not value.isdigit():
        raise ValueError(f"{UNCHECKPOINTED_ENV}={value!r}: expected a count of layers (0 or more)")
    n = int(value)
    if model is not None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        n = min(n, ModelShape.from_config(base.config).layers)
    log.info("%s=%s: %d last layers uncheckpointed (the plan had %d)", UNCHECKPOINTED_ENV, value, n, planned)
    return n


MAX_AUTO_TOKENS_ENV = "KUBETUNE_MAX_AUTO_TOKENS"


def max_auto_tokens(environ: Optional[dict] = None) -> int:
    """MAX_AUTO_TOKENS, or the cap KUBETUNE_MAX_AUTO_TOKENS sets (a benchmark knob)."""
    env = os.environ if environ is None else environ
    value = env.get(MAX_AUTO_TOKENS_ENV) or ""
    if not value:
        return MAX_AUTO_TOKENS
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{MAX_AUTO_TOKENS_ENV}={value!r}: expected a count of tokens (1 or more)")
    return int(value)


class LayerChoices(NamedTuple):
    """What the plan chose per decoder layer (`callbacks.SelectiveCheckpointing` applies it):
    how many of the last layers run without checkpointing, how many checkpointed layers keep
    their attention output for the recompute, whether in host memory, and whether the output
    projection's output is kept beside it there."""

    uncheckpointed: int = 0
    kept_attention: int = 0
    on_host: bool = False
    kept_output: bool = False


def tune_sft_arguments(kwargs: dict, model, cfg: Any, perf: Resolved) -> tuple[dict, LayerChoices]:
    """Adjust trl.SFTConfig keyword arguments to this GPU, after the model is
    loaded: with `training.batchSize: auto`, the micro-batch (rows of
    dataset.maxLength tokens) and whether to checkpoint activations come from
    `auto_micro_batch` within `perf.memory_budget_gib`; an explicit batch size is
    left alone. Checkpointing always uses the non-reentrant implementation (no
    need for inputs that require grad, works with frozen embeddings).

    Returns the arguments and the `LayerChoices`: how many of the last decoder layers should
    run without checkpointing (`uncheckpoint_last_layers`, after the Trainer has turned
    checkpointing on): 0 unless the plan leaves memory for them and
    `perf.selective_checkpointing` (off under ZeRO-3, where partitioned weights
    make the measured memory meaningless; `performance.resolve`); and how many checkpointed
    layers keep their attention output for the recompute (`keep_attention_outputs`; 0
    unless `kept_attention_modes` allows it), and where."""
    out = dict(kwargs)
    skip = kept = 0
    on_host = kept_output = False
    t = cfg.training
    if t.batch_size == "auto":
        from kubetune.trainer.deepspeed import zero3_enabled

        # Not under ZeRO-3: its partitioned weights make the measured memory meaningless.
        on_gpu, on_host = (False, False) if zero3_enabled(cfg.launch.strategy) else kept_attention_modes(perf)
        plan = auto_micro_batch(model, cfg.dataset.max_length, perf.memory_budget_gib,
                                fused_kernels=perf.liger and perf.fused_lora,
                                allow_offload=not zero3_enabled(cfg.launch.strategy),
                                keep_attention=on_gpu, keep_attention_on_host=on_host,
                                keep_output_on_host=keeps_output_on_host(), max_tokens=max_auto_tokens())
        out["per_device_train_batch_size"] = plan.rows
        out["per_device_eval_batch_size"] = plan.rows
        out["gradient_checkpointing"] = bool(plan.checkpointing or t.gradient_checkpointing)
        if plan.checkpointing and perf.selective_checkpointing:
            skip = forced_uncheckpointed_layers(plan.uncheckpointed_layers, model)
        if plan.checkpointing:
            kept, on_host = plan.kept_attention_layers, plan.kept_attention_on_host
            kept_output = plan.kept_output_on_host
        if plan.offload:
            out["activation_offloading"] = True  # trl.SFTConfig: saved tensors to pinned host memory, side stream
        log.info("micro-batch plan: %d x %d tokens, checkpointing=%s, %d last layers without, %d keeping their "
                 "attention output (%s), checkpoints %s, %.1f GiB of host memory (%.1f of %.1f GiB budget fixed)",
                 plan.rows, cfg.dataset.max_length, out["gradient_checkpointing"], skip, kept,
                 ("on the host, with the output projection's" if kept_output else "on the host") if on_host
                 else "on the GPU", "offloaded to the host" if plan.offload else "on the GPU",
                 plan.host_bytes / GIB, plan.fixed_bytes / GIB, plan.budget_bytes / GIB)
    if out.get("gradient_checkpointing"):
        out["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    return out, LayerChoices(skip, kept, on_host, kept_output)


def use_offload_stash(trainer, layers: int = OFFLOAD_STASH_LAYERS) -> bool:
    """With activation offloading on, give the trainer an offloading context that keeps
    `layers` tensors in flight instead of TRL's default five (what the plan counted).
    Returns whether it did (False when offloading is off)."""
    if not getattr(trainer.args, "activation_offloading", False):
        return False
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    trainer.maybe_activation_offload_context = get_act_offloading_ctx_manager(model=trainer.model,
                                                                              max_fwd_stash_size=layers)
    return True
