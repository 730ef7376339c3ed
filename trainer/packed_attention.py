"""Attention over packed rows without a quadratic mask.

Why: the trainer packs the samples of a micro-batch into one row, with
`position_ids` restarting at 0 for each sample. transformers' `sdpa` then
needs a dense block-diagonal mask, quadratic in batch x length; PyTorch's
variable-length flash kernel (`torch.nn.attention.varlen.varlen_attn`) takes
the sample boundaries instead, and its cost grows with the sum of the squared
sample lengths. Each token attends only to earlier tokens of its own sample.

The kernel computes plain causal softmax attention and nothing else. A model
family whose attention is more than that (a sliding window narrower than a
sample, logit soft-capping as in Gemma 2, attention sinks) keeps the
library's own implementation: `varlen_unfit` says why a family cannot use the
fast path, `library_attention` which implementation it falls back to, and
`varlen_attention_forward` refuses at run time what it cannot reproduce
rather than drop it silently.

The CUDA kernel is imported only when first called; everything here can be
imported and tested on a CPU.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Optional

VARLEN_ATTENTION = "kubetune_varlen"


# --------------------------------------------------------------------------
# Packed sequences: boundaries from position_ids (pure, CPU-testable)
# --------------------------------------------------------------------------

def cu_seqlens_from_position_ids(position_ids):
    """Cumulative sample boundaries of a packed batch, for a varlen kernel.

    `position_ids` is (batch, seq) or (seq,). A new sample starts at the
    beginning of every row and wherever the position does not continue the
    previous one by exactly +1 (usually a reset to 0). Rows are concatenated
    in order, so the result indexes the flattened (batch * seq) tokens.

    Returns `(cu_seqlens, max_len)`: an int32 tensor [0, e1, e2, ..., total]
    on the same device, and the longest sample length as a Python int.
    """
    import torch

    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be 1-D or 2-D, got shape {tuple(position_ids.shape)}")
    rows, seq = position_ids.shape
    if rows == 0 or seq == 0:
        raise ValueError(f"position_ids is empty (shape {tuple(position_ids.shape)})")
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    start_idx = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    total = torch.tensor([rows * seq], device=position_ids.device, dtype=start_idx.dtype)
    cu = torch.cat([start_idx, total]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max().item())
    return cu, max_len


class _BoundaryCache:
    """Every layer of one forward pass sees the same position_ids tensor, and
    finding the boundaries syncs with the host: compute them once per tensor.
    Holds one entry; the reference keeps the tensor alive only until the next
    batch replaces it."""

    def __init__(self) -> None:
        self._key: Any = None
        self._value: Any = None

    def get(self, position_ids, rows: int):
        # Keyed on the tensor object itself (plus its version counter, bumped
        # by in-place writes), not on its address, which a later batch reuses.
        key = (rows, tuple(position_ids.shape), position_ids._version)
        if self._key is not None and self._key[0] is position_ids and self._key[1] == key:
            return self._value
        expanded = position_ids.expand(rows, -1) if position_ids.shape[0] != rows else position_ids
        value = cu_seqlens_from_position_ids(expanded)
        self._key, self._value = (position_ids, key), value
        return value


_boundaries = _BoundaryCache()


# --------------------------------------------------------------------------
# Which families the kernel reproduces exactly (pure, CPU-testable)
# --------------------------------------------------------------------------

def _text_config(config):
    # Multimodal configs (Gemma 3) keep the decoder's settings in a nested text config.
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def varlen_unfit(config, max_length: int) -> Optional[str]:
    """Why the varlen kernel cannot give this model family's attention exactly,
    or None when it can. `max_length` is the longest sample (dataset.maxLength):
    packed samples never exceed it, so a sliding window at least that wide
    never masks anything.

    transformers passes `softcap=` and `sliding_window=` to the attention
    function of the families that use them (Gemma 2/3, Mistral, Phi-3,
    Qwen2/3 with windows, Cohere 2); the kernel has neither."""
    c = _text_config(config)
    softcap = getattr(c, "attn_logit_softcapping", None)
    if softcap is not None:
        return f"{c.model_type} soft-caps attention logits (attn_logit_softcapping={softcap})"
    window = getattr(c, "sliding_window", None)
    if window is not None and window < max_length:
        layer_types = getattr(c, "layer_types", None)
        # Without layer_types (Mistral, Phi-3) the window applies to every layer.
        if layer_types is None or "sliding_attention" in layer_types:
            return (f"{c.model_type} uses a sliding window of {window} tokens, narrower than "
                    f"dataset.maxLength={max_length}")
    if getattr(c, "model_type", "") == "gpt_oss":
        return "gpt_oss adds attention sinks (s_aux)"
    return None


def library_attention(config) -> str:
    """The library's own implementation for a family that cannot use varlen:
    sdpa (which builds the block-diagonal and sliding-window masks from
    position_ids), or eager where sdpa cannot soft-cap (transformers refuses
    sdpa for Gemma 2)."""
    if config is not None and getattr(_text_config(config), "attn_logit_softcapping", None) is not None:
        return "eager"
    return "sdpa"


# --------------------------------------------------------------------------
# The varlen attention function (registered with transformers)
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _varlen_kernel():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _kernel_options(params: set[str], n_heads: int, n_kv_heads: int, scaling: Optional[float], head_dim: int) -> tuple[dict, bool]:
    """Keyword arguments for the installed `varlen_attn` (its signature changed
    between PyTorch releases) and whether its wrapper cannot take grouped-query
    key/value heads as they are (no `enable_gqa`: PyTorch before 2.12)."""
    kw: dict[str, Any] = {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)  # causal
    elif "is_causal" in params:
        kw["is_causal"] = True
    else:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn takes neither window_size nor is_causal")
    if scaling is not None and not math.isclose(scaling, head_dim**-0.5, rel_tol=1e-6):
        if "scale" not in params:
            raise RuntimeError(f"this varlen_attn has no scale argument and the model needs scaling={scaling}")
        kw["scale"] = scaling
    repeat_kv = False
    if n_kv_heads != n_heads:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            repeat_kv = True
    return kw, repeat_kv


def _refuse_what_varlen_cannot_do(kwargs: dict, max_len: int) -> None:
    """The last guard: a family that reached this kernel although `varlen_unfit`
    should have kept it away (an explicit KUBETUNE_ATTENTION, a new family) fails
    loudly instead of training with the wrong attention."""
    if kwargs.get("softcap") is not None:
        raise RuntimeError(f"kubetune varlen attention cannot soft-cap logits (softcap={kwargs['softcap']}); "
                           "use training.performance.attention: auto")
    if kwargs.get("s_aux") is not None:
        raise RuntimeError("kubetune varlen attention has no attention sinks (s_aux); use training.performance.attention: auto")
    window = kwargs.get("sliding_window")
    if window is not None and max_len > window:
        raise RuntimeError(f"kubetune varlen attention has no sliding window ({window} tokens) and a sample is "
                           f"{max_len} tokens long; use training.performance.attention: auto")


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: (batch, heads, seq, dim) in,
    (batch, seq, heads, dim) out, like the sdpa integration.

    Sample boundaries come from `cu_seq_lens_q` / `max_length_q` when the
    collator provides them, else from `position_ids`, else each row is one
    sample. Anything that is not self-attention over unpadded rows (a KV
    cache during generation, a padding mask) goes to sdpa with the mask that
    `varlen_mask` built for it.
    """
    import torch

    bsz, n_heads, seq, head_dim = query.shape
    if attention_mask is not None or key.shape[2] != seq:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("kubetune varlen attention does not implement attention dropout")
    n_kv = key.shape[1]
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None or max_len is None:
        pos = kwargs.get("position_ids")
        if pos is not None:
            cu, max_len = _boundaries.get(pos, bsz)
        else:
            cu = torch.arange(0, (bsz + 1) * seq, seq, device=query.device, dtype=torch.int32)
            max_len = seq
    cu = cu.to(device=query.device, dtype=torch.int32)
    max_len = int(max_len)
    _refuse_what_varlen_cannot_do(kwargs, max_len)

    kernel, params = _varlen_kernel()
    opts, no_gqa = _kernel_options(params, n_heads, n_kv, scaling, head_dim)
    q = query.transpose(1, 2).reshape(bsz * seq, n_heads, head_dim)
    k = key.transpose(1, 2).reshape(bsz * seq, n_kv, head_dim)
    v = value.transpose(1, 2).reshape(bsz * seq, n_kv, head_dim)
    # Only a training forward keeps its output for the recompute (evaluation has no backward).
    kept = getattr(module, KEPT_ATTR, None) if module.training and torch.is_grad_enabled() else None
    if (no_gqa or kept is not None) and q.is_cuda:
        out = flash_varlen_gqa(q, k, v, cu, max_len, opts.get("scale"), kept)
    else:
        if no_gqa:  # CPU stand-ins of old signatures: repeat the heads
            k = k.repeat_interleave(n_heads // n_kv, dim=1)
            v = v.repeat_interleave(n_heads // n_kv, dim=1)
        out = kernel(q, k, v, cu, cu, max_len, max_len, **opts)
    return out.reshape(bsz, seq, n_heads, head_dim), None


@functools.lru_cache(maxsize=1)
def _flash_varlen_gqa_fn():
    import torch

    class FlashVarlenGQA(torch.autograd.Function):
        """Causal varlen flash attention with fewer key/value heads than query
        heads, straight on ATen's flash kernels (which take grouped-query heads).
        What `varlen_attn(enable_gqa=True)` does in PyTorch 2.12+; on older
        releases its wrapper would need the key/value heads repeated 4x (Llama-3),
        a copy of k and v per layer and pass and a reduction of their gradients:
        about 26 ms of a 1.05 s 8B step (bench/RESULTS.md)."""

        @staticmethod
        def forward(ctx, q, k, v, cu, max_len: int, scale, kept=None):
            value = kept.take(cu) if kept is not None else None
            if value is None:
                out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
                    q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)
                if kept is not None:
                    kept.keep(cu, (out.detach(), lse, rng, unused))
            else:  # the recompute of a checkpointed layer: the first forward's output, not the kernel again
                out, lse, rng, unused = value
            ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
            ctx.max_len, ctx.scale = max_len, scale
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
            dq, dk, dv = torch.ops.aten._flash_attention_backward(
                dout.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, rng, unused,
                scale=ctx.scale)
            return dq, dk, dv, None, None, None, None

    return FlashVarlenGQA


def flash_varlen_gqa(q, k, v, cu, max_len: int, scale: Optional[float], kept: "KeptAttention | None" = None):
    """(tokens, heads, dim) causal attention over the packed samples `cu`, with
    (tokens, kv_heads, dim) keys and values, kv_heads dividing heads. With `kept`, the
    output of a forward is kept for the next call on the same `cu` (`KeptAttention`)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    return _flash_varlen_gqa_fn().apply(q, k, v, cu, max_len, scale, kept)


KEPT_ATTR = "_kubetune_kept_attention"
# On a layer's output projection: its layer's kept attention slot (`KeptAttention.keep_output`).
KEPT_OUTPUT_ATTR = "_kubetune_kept_output"


class KeptAttention:
    """One checkpointed layer's attention output (and the statistics its backward needs),
    kept from the layer's forward for its recompute.

    Why: under activation checkpointing the backward runs each layer's forward again,
    attention included: 22 ms of an 8B step at 16k tokens, 161 ms of a step of one
    16k-token row of long documents (bench/RESULTS.md, issue 16, third round). Keeping
    the output costs 2 bytes per query value and 4 per head for the log-sum-exp (130 MiB
    a layer at 16k tokens on 8B), which the memory plan grants layers in the memory it
    leaves over (`memory_plan.plan_micro_batch`, `keep_attention`).

    Keyed on the boundaries tensor `cu` itself (held here, so its identity cannot be
    reused): the recompute sees the same object (one per batch, `_boundaries`), the
    next batch another, so a value left by a forward that had no backward is dropped,
    never reused. `take` empties the slot."""

    def __init__(self) -> None:
        self._cu = None
        self._value = None

    def keep(self, cu, value) -> None:
        self._cu, self._value = cu, value

    def take(self, cu):
        value = self._value if self._cu is cu else None
        self._cu = self._value = None
        return value

    def keep_output(self, y) -> None:
        """The layer's output projection's output too (only `HostKeptAttention` keeps it)."""

    def take_output(self):
        """The output projection's output kept beside the attention's, once the recompute has
        taken the attention's (`take`): its node then skips its product. Else None."""
        return None


class HostCopies:
    """One side stream that moves kept attention outputs to pinned host memory in the
    forward and back to the GPU in the backward, shared by the layers that keep theirs
    there (`HostKeptAttention`). Off the GPU (tests), plain copies.

    No `record_stream`: a tensor being copied to the host stays referenced here until its
    copy is done (at most `in_flight` of them; past that the compute stream waits for the
    oldest), and a tensor coming back is allocated on the compute stream, which waits for
    its copy before using it. Freed memory then goes straight back to the compute stream's
    pool: with `record_stream` the allocator reserved about 3 GiB more at 16k tokens and 7
    GiB more at 32k on 8B than without kept outputs, for 0.1-0.3 GiB more allocated
    (bench/RESULTS.md, issue 16, fourth round). `in_flight` is two layers' worth (the
    attention's output and log-sum-exp, the output projection's output): with fewer, the
    compute stream would wait for a layer's attention output to reach the host while the
    layer's output projection runs."""

    def __init__(self, in_flight: int = 6) -> None:
        import threading

        self.stream = None
        self.in_flight = in_flight
        self._copying: list = []  # (GPU tensor, copy done) on their way to the host
        self._reserved = None  # queue of buffer sets pinned ahead (`reserve`)
        self._unclaimed = 0
        self._pinned = threading.Event()
        self._pinned.set()  # nothing reserved: nothing to wait for

    def reserve(self, count: int, sizes: list, pin: bool = True, device=None) -> None:
        """Allocates `count` sets of flat host buffers, one per (numel, dtype) of `sizes`, on
        a background thread, for the layers' first `keep`s to claim in order (`claim`);
        `pinned()` says when all are there.

        Why: pinning host memory is slow: 2 s for 30 layers' attention outputs at 16k tokens
        on 8B, layer by layer in the first step; on a thread beside the Trainer's setup it
        slowed the setup by 3-4 s (bench/RESULTS.md, issue 16, thirteenth round). So the
        layers start keeping once the buffers are pinned, on this thread, after the first
        step (`callbacks.SelectiveCheckpointing`). A set that could not be allocated is None:
        its layer allocates its own."""
        import queue
        import threading

        import torch

        self._reserved, self._unclaimed = queue.Queue(), count
        self._pinned.clear()

        def pin_all():
            made = 0
            try:
                if device is not None:
                    torch.cuda.set_device(device)
                for _ in range(count):
                    try:
                        bufs = [torch.empty(n, dtype=dtype, pin_memory=pin) for n, dtype in sizes]
                    except (RuntimeError, MemoryError):
                        bufs = None
                    self._reserved.put(bufs)
                    made += 1
            finally:
                for _ in range(count - made):  # whatever failed: every claim still gets an answer
                    self._reserved.put(None)
                self._pinned.set()

        threading.Thread(target=pin_all, name="kubetune-pin-host", daemon=True).start()

    def pinned(self, timeout: float = 0.0) -> bool:
        """Whether every buffer set `reserve` started is allocated (waiting up to `timeout` s)."""
        return self._pinned.wait(timeout)

    def claim(self):
        """The next set `reserve` pinned (waiting for it), or None once all are claimed."""
        if self._unclaimed <= 0:
            return None
        self._unclaimed -= 1
        return self._reserved.get()

    def to_host(self, t, buf):
        """`t` copied into `buf` (a flat host buffer, reused while it is large enough; pinned
        for a CUDA tensor); returns the buffer and the copy's view of it."""
        import torch

        if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype:
            buf = torch.empty(t.numel(), dtype=t.dtype, pin_memory=t.is_cuda)
        view = buf[: t.numel()].view(t.shape)
        if not t.is_cuda:
            view.copy_(t)
            return buf, view
        if self.stream is None:
            self.stream = torch.cuda.Stream(t.device)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))  # once `t` is written
        with torch.cuda.stream(self.stream):
            view.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        self._copying.append((t, done))
        self._release(self.in_flight)
        return buf, view

    def _release(self, keep: int) -> None:
        """Drop the tensors whose copies are done, and the oldest beyond `keep` once the
        compute stream has been told to wait for their copies (so their memory is not
        written before the copy has read it)."""
        import torch

        still = []
        for i, (t, done) in enumerate(self._copying):
            if done.query():
                continue
            if len(self._copying) - i > keep:
                torch.cuda.current_stream(t.device).wait_event(done)
                continue
            still.append((t, done))
        self._copying = still

    def settle(self) -> None:
        """Nothing left on its way to the host (before the backward fetches outputs back)."""
        if self._copying:
            self._release(0)

    def to_device(self, view, device):
        """Starts the copy of `view` back to `device`; `ready` hands it over."""
        import torch

        if device.type != "cuda":
            return view.clone(), None
        t = torch.empty(view.shape, dtype=view.dtype, device=device)  # on the compute stream
        self.stream.wait_stream(torch.cuda.current_stream(device))  # its memory's earlier users first
        with torch.cuda.stream(self.stream):
            t.copy_(view, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return t, done

    @staticmethod
    def ready(t, done):
        """`t` for the compute stream, once its copy is done (also before dropping it unused)."""
        import torch

        if done is not None:
            torch.cuda.current_stream(t.device).wait_event(done)
        return t


class HostKeptAttention(KeptAttention):
    """A kept attention output and its log-sum-exp that wait in pinned host memory
    (`HostCopies`) instead of the GPU; the kernel's random state stays there.

    Why: the GPU has no room for every checkpointed layer's output (130 MiB a layer at 16k
    tokens on 8B), but the host has. Each copy (about 2.5 ms a layer over PCIe) runs on a
    side stream while the GPU goes on with the layer, so the attention forward it saves is
    all gain: about 0.6 ms a layer in rows of 2,048 (+1.6% on the 8B step), 5 ms in one row
    of 16k, more as rows grow (bench/RESULTS.md, issue 16, fourth and thirteenth rounds).
    Taking one output starts fetching the output of `previous`, the layer whose recompute
    the backward reaches next, so the copy runs behind this layer's backward: the GPU holds
    one layer's output in flight, what one layer kept there would cost."""

    MOVED = 2  # the output and the log-sum-exp; the rest of the kept value is a few bytes
    OUTPUT = 2  # where the output projection's output goes, when its node keeps it (`keep_output`)

    def __init__(self, copies: HostCopies, previous: "HostKeptAttention | None" = None) -> None:
        super().__init__()
        self.copies, self.previous = copies, previous
        self._bufs: list = [None] * (self.OUTPUT + 1)
        self._fetched = None
        self._output = None

    def keep(self, cu, value) -> None:
        if self._bufs[0] is None:  # this layer's first output: buffers pinned ahead, if any
            claimed = list(self.copies.claim() or [])
            self._bufs = claimed + [None] * (self.OUTPUT + 1 - len(claimed))
        views = []
        for i, t in enumerate(value[: self.MOVED]):
            self._bufs[i], view = self.copies.to_host(t, self._bufs[i])
            views.append(view)
        self._drop_fetched()
        self._output = None
        super().keep(cu, (views, value[0].device, value[self.MOVED:]))

    def keep_output(self, y) -> None:
        """Called by the output projection's node in the forward that kept the attention's output
        (`lora_kernels`): its output goes to the host beside it, and comes back with it.

        Why: in the recompute the projection is then not run again (an 8B layer's o_proj: a
        16k x 4,096 x 4,096 FP8 product, its input's quantisation and the adapter's add, about
        0.5 ms); its backward needs only its input, the attention's output, already here."""
        if self._value is None or len(self._value[0]) != self.MOVED:
            return  # no attention output kept in this forward, or this one's already kept
        self._bufs[self.OUTPUT], view = self.copies.to_host(y, self._bufs[self.OUTPUT])
        self._value[0].append(view)

    def take_output(self):
        y, self._output = self._output, None
        return y

    def prefetch(self) -> None:
        if self._value is not None and self._fetched is None:
            views, device, _ = self._value
            self._fetched = [self.copies.to_device(v, device) for v in views]

    def _drop_fetched(self) -> None:
        # Not used, but its memory is not reused before its copy ends.
        for f in self._fetched or []:
            self.copies.ready(*f)
        self._fetched = None

    def take(self, cu):
        value = super().take(cu)
        self.copies.settle()
        self._output = None
        if value is None:
            self._drop_fetched()
            return None
        fetched, self._fetched = self._fetched, None
        views, device, rest = value
        moved = [self.copies.ready(*f) for f in (fetched or [self.copies.to_device(v, device) for v in views])]
        if len(moved) > self.OUTPUT:
            self._output = moved[self.OUTPUT]
        if self.previous is not None:
            self.previous.prefetch()
        return (*moved[: self.MOVED], *rest)


def varlen_mask(batch_size, q_length, kv_length, attention_mask=None, **kwargs):
    """transformers mask function for the varlen implementation: no mask at
    all for self-attention over unpadded rows (sample boundaries travel in
    position_ids; a dense block-diagonal mask is what we avoid), the sdpa
    mask otherwise (generation with a cache, padded batches)."""
    if q_length == kv_length and (attention_mask is None or bool(attention_mask.all())):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, **kwargs)


def varlen_available() -> bool:
    """A CUDA device of compute capability >= 8.0 and a PyTorch with varlen_attn."""
    try:
        import torch

        if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
            return False
        _varlen_kernel()
        return True
    except Exception:  # ImportError on older PyTorch; a broken driver is the same answer
        return False


def without_packed_scan(preprocess):
    """transformers' mask preprocessing, minus its scan for packed rows where the varlen
    kernel runs. Why: without an attention mask it scans position_ids for sample
    boundaries (`find_packed_sequence_indices`) and asks the device whether there are any,
    `(packed[:, -1] == 0).all()`: a host wait at the start of every forward, the GPU's lead
    lost. The scan only serves a dense block-diagonal mask, which varlen_mask never builds
    for self-attention over unpadded rows (it returns None either way), and the kernel
    reads the boundaries from position_ids itself."""
    if getattr(preprocess, "kubetune_varlen", False):
        return preprocess

    @functools.wraps(preprocess)
    def preprocess_mask_arguments(config, inputs_embeds, attention_mask, cache, position_ids, *args, **kwargs):
        if getattr(config, "_attn_implementation", None) == VARLEN_ATTENTION and attention_mask is None and cache is None:
            position_ids = None
        return preprocess(config, inputs_embeds, attention_mask, cache, position_ids, *args, **kwargs)

    preprocess_mask_arguments.kubetune_varlen = True
    return preprocess_mask_arguments


def register_varlen_attention(skip_packed_scan: bool = True) -> str:
    from transformers import AttentionInterface, masking_utils

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    masking_utils.AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)
    preprocess = masking_utils._preprocess_mask_arguments
    if skip_packed_scan:
        masking_utils._preprocess_mask_arguments = without_packed_scan(preprocess)
    elif getattr(preprocess, "kubetune_varlen", False):  # the scan back, after an earlier registration skipped it
        masking_utils._preprocess_mask_arguments = preprocess.__wrapped__
    return VARLEN_ATTENTION


def attention_implementation(choice: str, skip_packed_scan: bool = True) -> str:
    """The `attn_implementation` to load the model with, for the attention that
    `performance.resolve` chose: "varlen" registers the kernel with transformers
    and returns its name; any other name is transformers' own."""
    return register_varlen_attention(skip_packed_scan) if choice == "varlen" else choice
