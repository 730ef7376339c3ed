"""The fast paths, wired into a loaded model: what `training.performance` turned on.

Why one place: each path patches the model in place, and their order
matters. After the PEFT adapter is attached, `apply_fast_paths` (a no-op on a
model that is not on a CUDA device):

- casts frozen fp32 copies of embeddings / lm_head (left by k-bit
  preparation) back to the compute dtype, so that the 128k-vocab output
  projection runs on the tensor cores;
- applies Liger kernels (fused RMSNorm, RoPE, SwiGLU);
- routes each LoRA linear through one fused autograd node
  (`lora_kernels.lora_linear`; not DoRA or LoRA-bias layers, which keep PEFT's
  forward);
- with FP8, routes the frozen base products of the decoder layers through
  e4m3 products (`fp8.py`);
- last, over the fused layers, compiles each decoder layer (regional
  torch.compile).

`uncheckpoint_last_layers` runs later, once the Trainer has turned gradient
checkpointing on (callbacks.SelectiveCheckpointing). Which paths run is
decided in `performance.resolve`; nothing here reads the environment.
GPU-only packages (liger-kernel, bitsandbytes) are imported when used.
"""

from __future__ import annotations

import logging

from kubetune.trainer import fp8, rms_norm
from kubetune.trainer.lora_kernels import frozen_linear_fp8, lora_linear, plain_or_4bit_linear
from kubetune.trainer.packed_attention import KEPT_OUTPUT_ATTR
from kubetune.trainer.performance import Resolved

log = logging.getLogger(__name__)


def liger_installed() -> bool:
    """liger-kernel imports (an optional GPU dependency: `kubetune[gpu]`)."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _model_device_is_cuda(model) -> bool:
    try:
        return next(model.parameters()).is_cuda
    except StopIteration:
        return False


# --------------------------------------------------------------------------
# Fused LoRA and FP8 routing
# --------------------------------------------------------------------------

def _fusable(layer) -> bool:
    """A PEFT LoRA layer over a plain or bitsandbytes-4-bit linear, with one
    vanilla adapter (no DoRA or other variant, no LoRA bias)."""
    import torch.nn as nn

    if not plain_or_4bit_linear(layer.get_base_layer()):
        return False
    if getattr(layer, "lora_variant", None) or any(getattr(layer, "lora_bias", {}).values()):
        return False
    if any(getattr(layer, "use_dora", {}).values()):
        return False
    return all(isinstance(d, (nn.Dropout, nn.Identity)) for d in layer.lora_dropout.values())


def _fused_lora_forward(layer, original):
    import torch.nn as nn

    def forward(x, *args, **kwargs):
        x = rms_norm.readers.take(layer, x)
        active = layer.active_adapters
        if args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1 or active[0] not in layer.lora_A:
            return original(x, *args, **kwargs)
        name = active[0]
        drop = layer.lora_dropout[name]
        p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
        return lora_linear(x, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.get_base_layer(),
                           layer.scaling[name], p, getattr(layer, "_kubetune_fp8", False),
                           getattr(layer, "_kubetune_fp8_share", None), getattr(layer, KEPT_OUTPUT_ATTR, None))

    forward._kubetune_fused = forward._kubetune_takes_alias = forward._kubetune_keeps_output = True
    return forward


def fuse_lora_layers(model) -> int:
    """Route every fusable PEFT LoRA linear through `lora_linear`; returns how
    many. Idempotent; unfusable layers keep PEFT's forward."""
    from peft.tuners.lora.layer import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and _fusable(module):
            if getattr(module.forward, "_kubetune_fused", False):
                n += 1
                continue
            module.forward = _fused_lora_forward(module, module.forward)
            n += 1
    return n


def _frozen_linear(module) -> bool:
    """A plain or bitsandbytes-4-bit linear layer with every parameter frozen."""
    return plain_or_4bit_linear(module) and not any(p.requires_grad for p in module.parameters())


def fp8_base_products(model, fuse_swiglu: bool = False) -> int:
    """Route the frozen base products of the decoder layers through FP8 (`fp8`):
    the fused LoRA layers' base product, and every other frozen linear (the MLP
    without adapters). Not the LM head (the loss stays in bf16). Layers whose
    dimensions are off cuBLASLt's grid (`fp8.pays`) keep bf16. `fuse_swiglu`: an MLP
    whose down_proj went FP8 this way quantises its SwiGLU product where it makes it
    (`fuse_swiglu_down`). Idempotent; returns how many layers run in FP8."""
    from peft.tuners.lora.layer import LoraLayer

    n = 0
    for block in decoder_layers(model):
        lora_bases = set()
        for m in block.modules():
            if isinstance(m, LoraLayer):
                base = m.get_base_layer()
                lora_bases.add(id(base))
                if getattr(m.forward, "_kubetune_fused", False) and fp8.pays(base.in_features, base.out_features):
                    m._kubetune_fp8 = True
                    n += 1
        for m in block.modules():
            if id(m) in lora_bases or not _frozen_linear(m) or not fp8.pays(m.in_features, m.out_features):
                continue
            if not getattr(m.forward, "_kubetune_fp8", False):
                m.forward = _fp8_forward(m)
            n += 1
        mark_fp8_siblings(block)
        if fuse_swiglu:
            fuse_swiglu_down(block)
    return n


def _silu_mlp(m) -> bool:
    """An MLP computing down_proj(silu(gate_proj(x)) * up_proj(x)) (Llama, Mistral, Qwen),
    whose down_proj runs in FP8 as a frozen linear (not an adapted one)."""
    act = getattr(m, "act_fn", None)
    down = getattr(m, "down_proj", None)
    return (type(act).__name__ in ("SiLU", "SiLUActivation") and getattr(m, "gate_proj", None) is not None
            and getattr(m, "up_proj", None) is not None and down is not None
            and getattr(down.forward, "_kubetune_fp8", False))


def fuse_swiglu_down(block) -> int:
    """Each SwiGLU MLP of `block` whose down_proj is a frozen FP8 linear runs as
    down(swiglu) in one node (`lora_kernels.swiglu_down_fp8`), in place of its own (or
    Liger's) forward; where gate_proj and up_proj are frozen FP8 linears too, the whole
    MLP is one node (`lora_kernels.frozen_swiglu_mlp_fp8`). Idempotent; returns how many."""
    n = 0
    for m in block.modules():
        if not _silu_mlp(m):
            continue
        if not getattr(m.forward, "_kubetune_swiglu_fp8", False):
            m.forward = _swiglu_down_forward(m)
        n += 1
    return n


def _swiglu_down_forward(mlp):
    from kubetune.trainer.lora_kernels import frozen_swiglu_mlp_fp8, swiglu_down_fp8

    # Decided when called, not when wired: an adapter attached to gate / up later changes it.
    def forward(x, *args, **kwargs):
        x_up = rms_norm.readers.take(mlp, x)  # an alias of x for up's product, where one is offered
        if getattr(mlp.gate_proj.forward, "_kubetune_fp8", False) and getattr(mlp.up_proj.forward, "_kubetune_fp8", False):
            return frozen_swiglu_mlp_fp8(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj, x_up)
        return swiglu_down_fp8(mlp.gate_proj(x), mlp.up_proj(x_up), mlp.down_proj)

    forward._kubetune_swiglu_fp8 = forward._kubetune_takes_alias = True
    return forward


# Projections that the decoder families of transformers call one after the other on the
# same input tensor (Llama, Mistral, Qwen, Gemma; fused qkv_proj / gate_up_proj families
# have nothing to share).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _routed_to_fp8(m) -> bool:
    return getattr(m, "_kubetune_fp8", False) or getattr(m.forward, "_kubetune_fp8", False)


# The norm whose output each sibling group reads, in the decoder families of SIBLINGS.
NORM_BEFORE = {"q_proj": "input_layernorm", "gate_proj": "post_attention_layernorm"}


def mark_fp8_siblings(block) -> int:
    """Tell each FP8 sibling projection whether it opens, uses or closes the
    shared quantised input (`fp8.SharedRows`), and mark the norm whose output the
    group reads (q/k/v after input_layernorm, gate/up after post_attention_layernorm)
    to make those e4m3 rows in its own kernel and leave them there
    (`rms_norm.frozen_rms_norm`'s offer_rows; only a norm routed there reads the
    mark); returns how many groups."""
    groups = 0
    for parent in block.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if any(m is None or not _routed_to_fp8(m) for m in members):
                continue
            for m, role in zip(members, share_roles(len(members))):
                m._kubetune_fp8_share = role
            norm = getattr(block, NORM_BEFORE[names[0]], None)
            if norm is not None:
                norm._kubetune_offer_rows = True
            groups += 1
    return groups


def share_roles(n: int) -> list:
    """The `fp8.SharedRows` role of each of n sibling projections, in call order: the first
    quantises the input, the last lets it go."""
    return [fp8.OPEN if i == 0 else fp8.CLOSE if i == n - 1 else fp8.USE for i in range(n)]


def _fp8_forward(module):
    def forward(x, *args, **kwargs):
        return frozen_linear_fp8(rms_norm.readers.take(module, x), module, getattr(module, "_kubetune_fp8_share", None),
                                 getattr(module, KEPT_OUTPUT_ATTR, None))

    forward._kubetune_fp8 = forward._kubetune_takes_alias = forward._kubetune_keeps_output = True
    return forward


# --------------------------------------------------------------------------
# dtype clean-up, the wiring, compile, checkpointing per layer
# --------------------------------------------------------------------------

def downcast_frozen_fp32(model, dtype) -> int:
    """Cast frozen floating-point parameters held in fp32 to `dtype`.

    k-bit preparation upcasts every non-quantized weight to fp32 for
    stability; for frozen weights that buys nothing (they get no update) and
    makes the 128k x 4096 output projection run in fp32, off the tensor
    cores, several times slower. Trainable (LoRA) weights keep fp32.
    Returns the number of parameters cast.
    """
    import torch

    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.dtype == torch.float32 and p.is_floating_point():
            p.data = p.data.to(dtype)
            n += p.numel()
    return n


def _compute_dtype(model):
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dt = getattr(base.config, "dtype", None) or getattr(base.config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    if dt not in (torch.bfloat16, torch.float16):
        dt = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    return dt


def apply_fast_paths(model, perf: Resolved) -> None:
    """Swap in the fast kernels `perf` asks for on a CUDA model; a no-op on CPU.

    Safe to call before and after the PEFT adapter is attached (the LoRA
    fusion only finds layers once it is). The loss is left alone: TRL's
    SFTTrainer computes it with its own chunked LM head (no full logits),
    which bypasses a patched model forward anyway.
    """
    if not _model_device_is_cuda(model):
        return
    dtype = _compute_dtype(model)
    if dtype is not None:
        n = downcast_frozen_fp32(model, dtype)
        if n:
            log.info("cast %d frozen fp32 parameters to %s", n, dtype)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if perf.liger and not getattr(base, "_kubetune_liger", False):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(
            model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
        base._kubetune_liger = True
        log.info("liger kernels applied to %s", type(base).__name__)
    if perf.liger:
        n = frozen_norms(base)
        if n:
            log.info("%d RMSNorm layers with the frozen-weight backward", n)
        # The layer's forward then reads the norms' weights itself, outside the norm modules'
        # own calls: not under ZeRO-3, whose gather hooks fire per module call (the fused LoRA
        # node's condition, which resolve turns off there); nor compiled (a compiled layer
        # keeps its own forward).
        if n and perf.fused_lora and not perf.compile:
            from kubetune.trainer.rms_norm import use_skip_norms

            n = sum(use_skip_norms(layer) for layer in decoder_layers(base))
            if n:
                log.info("%d decoder layers add the residual stream's gradient in their norms' backward", n)
    # Not under ZeRO-3 (resolve turns it off there): a base weight is only gathered when its
    # own module runs its forward (DeepSpeed's hooks), and the fused node reads it directly.
    if perf.fused_lora:
        n = fuse_lora_layers(model)
        if n:
            log.info("fused %d LoRA linear layers", n)
    if perf.fp8:
        log.info("FP8 base products in %d linear layers", fp8_base_products(model, fuse_swiglu=perf.fp8_swiglu))
    fp8.set_fast_accum(perf.fp8_fast_accum, perf.fp8_fast_accum_grad)  # resolve grants them only with fp8
    # Last, over the fused layers.
    if perf.compile:
        log.info("compiled %d decoder layers", compile_layers(model))


def frozen_norms(model) -> int:
    """Route every norm Liger patched with Llama's casting through `rms_norm.frozen_rms_norm`
    while its weight is frozen (`rms_norm.use_frozen_backward`); returns how many. Idempotent."""
    from kubetune.trainer.rms_norm import use_frozen_backward

    return sum(use_frozen_backward(m) for m in model.modules() if hasattr(m, "casting_mode")
               and hasattr(m, "variance_epsilon"))


def decoder_layers(model) -> list:
    """The transformer blocks of a (PEFT-wrapped) causal LM: the modules transformers
    runs under gradient checkpointing, one per layer."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]


def host_copies_pinned_ahead(model, layers: int, tokens: int, with_output: bool = True):
    """A `packed_attention.HostCopies` that starts pinning, now and in the background, the host
    buffers of `layers` layers' attention outputs, log-sum-exps and (`with_output`) output
    projections' outputs for micro-batches of up to `tokens` tokens (for
    `keep_attention_outputs(..., copies=...)`)."""
    import torch

    from kubetune.trainer.packed_attention import HostCopies

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    embed = base.get_input_embeddings().weight  # the activations' dtype, so the outputs'
    copies = HostCopies()
    cuda = embed.device.type == "cuda"
    sizes = [(tokens * heads * head_dim, embed.dtype), (heads * tokens, torch.float32)]
    if with_output:
        sizes.append((tokens * config.hidden_size, embed.dtype))
    copies.reserve(layers, sizes, pin=cuda, device=embed.device if cuda else None)
    return copies


def keep_attention_outputs(model, n: int, uncheckpointed: int = 0, on_host: bool = False, copies=None,
                           with_output: bool = False) -> int:
    """The `n` checkpointed decoder layers nearest the end (before the `uncheckpointed`
    last ones) keep their attention output for the recompute (`packed_attention.KeptAttention`,
    read by the varlen kernel); the others drop a slot an earlier call gave them. Nearest
    the end, because the backward reaches them, and frees their outputs, first. `on_host`:
    the outputs wait in host memory (`HostKeptAttention`), each layer's fetched back while
    the backward runs through the layer after it, through `copies` where given (buffers
    pinned ahead: `host_copies_pinned_ahead`), and with `with_output` so does the output
    projection's output where its node can keep it. Returns how many keep one."""
    from kubetune.trainer.packed_attention import KEPT_ATTR, HostCopies, HostKeptAttention, KeptAttention

    layers = decoder_layers(model)
    checkpointed = layers[:max(0, len(layers) - uncheckpointed)]
    chosen = checkpointed[len(checkpointed) - min(max(n, 0), len(checkpointed)):] if n > 0 else []
    copies, previous = ((copies or HostCopies()) if on_host else None), None
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            continue
        slot = None
        if layer in chosen:
            slot = previous = HostKeptAttention(copies, previous) if on_host else KeptAttention()
        setattr(attn, KEPT_ATTR, slot)
        # The output projection keeps its output in the slot too, where its node can (the fused
        # LoRA node, the frozen FP8 one): on the host only (`HostKeptAttention.keep_output`).
        o_proj = getattr(attn, "o_proj", None)
        if o_proj is not None and getattr(o_proj.forward, "_kubetune_keeps_output", False):
            setattr(o_proj, KEPT_OUTPUT_ATTR, slot if on_host and with_output else None)
    return sum(1 for layer in chosen if getattr(layer, "self_attn", None) is not None)


def compile_layers(model) -> int:
    """torch.compile every decoder layer in place (regional compilation).

    All layers share one code object, so one compilation serves all of them
    (plus one recompile when the packed length first changes: dynamic shapes),
    instead of the minutes a whole-model graph takes; the matrix products stay
    cuBLAS calls, and what Inductor gains is fusing the element-wise work around
    them (residual adds, norms, casts, dropout). `Module.compile` keeps module
    identity, so PEFT, gradient checkpointing and DDP wrap the same objects.
    Returns how many layers were compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def uncheckpoint_last_layers(model, n: int) -> int:
    """Run the last `n` decoder layers without activation checkpointing (their
    activations stay; no recompute). transformers checks the flag per layer on
    every call, so this works once the Trainer has turned checkpointing on.
    The last layers, because their activations are the first the backward frees.
    Returns how many layers were switched."""
    layers = decoder_layers(model)
    chosen = layers[len(layers) - min(n, len(layers)):] if n > 0 else []
    for layer in chosen:
        layer.gradient_checkpointing = False
    return len(chosen)
