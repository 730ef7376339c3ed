"""The LM head's log-probabilities with their gradient made in the forward: two
passes of the 128k-vocabulary product instead of three.

Why: TRL's fused LM head (`trl.kernels.ChunkedLogProbFunction`, which
`sft.py`'s loss calls through `model(..., fused_lm_head=True)`) projects each
tile of tokens x vocabulary in the forward, folds it into the online-logsumexp
statistics, and keeps nothing; the backward projects every tile again, turns it
into the logits' gradient and multiplies that back through the head. On 8B at
16k tokens a step each pass is 17 TFLOP, 74 ms of bf16 products in all
(bench/RESULTS.md, the speed-3 profile).

Here each token chunk is projected over the whole vocabulary at once (a tile of
as many elements as TRL's, so no more memory), folded with TRL's own kernels,
and, the chunk's normaliser now known, turned in place into d log p(target)/d
logits and multiplied back through the head: d log p_t / d h_t for every token,
kept until the backward. That is exact because each token's log-probability
depends on its own hidden state only, and the loss is linear in the
log-probabilities: the backward scales each token's row by the gradient it
receives. The entropy and the other outputs are computed as TRL computes them.

`one_pass()` puts this function in the place TRL's fused head calls, for the
duration of one forward. It is used where it can be: a hidden state that needs
a gradient (training, not evaluation), a frozen head (LoRA, not a trained
`lm_head`) without bias. Anything else goes to TRL's own function, as does a
gradient through the entropy (a metric here: `sft.py` detaches it), which
raises instead of being dropped.
"""

from __future__ import annotations

import contextlib
import functools


def _trl():
    from trl.kernels import chunked_logprob

    return chunked_logprob


def _fits(hidden, weight, bias) -> bool:
    return hidden.requires_grad and not weight.requires_grad and bias is None


@functools.lru_cache(maxsize=1)
def one_pass_function():
    """The autograd function (made once, on first use: it imports torch and TRL)."""
    import torch

    trl = _trl()

    class OnePassLogProb(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                    logit_scale=1.0, outputs=trl.OPTIONAL_OUTPUTS):
            ctx.set_materialize_grads(False)
            device = hidden.device
            n_tokens, vocab = hidden.shape[0], weight.shape[0]
            compute_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
            kernel_args = {"logit_scale": logit_scale, "softcap": final_logit_softcapping or 1.0, "inv_t": 1 / temperature,
                           "HAS_SOFTCAP": final_logit_softcapping is not None}
            flags = {f"HAS_{name.upper()}": name in outputs for name in trl.OPTIONAL_OUTPUTS}

            def stat(fill: float):
                return torch.full((n_tokens,), fill, device=device, dtype=torch.float32)

            running_max, max_before_target = stat(float("-inf")), stat(float("-inf"))
            sum_exp, x_sum_exp, sq_sum_exp, z_sum, target_logit = (stat(0.0) for _ in range(5))
            w = weight.to(compute_dtype)
            unit_grad = torch.empty((n_tokens, hidden.shape[1]), device=device, dtype=compute_dtype)
            ones = torch.ones((n_tokens,), device=device, dtype=torch.float32)
            # As many tile elements as TRL's [TOKEN_CHUNK_SIZE x chunk_size], over the whole vocabulary.
            chunk = max(1, min(n_tokens, trl.TOKEN_CHUNK_SIZE * chunk_size // vocab))
            if chunk > 128:
                chunk -= chunk % 128  # whole tiles of the tensor-core products (1,046 -> 1,024 at 128k)
            buf = torch.empty((chunk, vocab), device=device, dtype=compute_dtype)
            triton = trl._use_triton(device)  # else TRL's torch versions of its kernels (a CPU)
            blocks = (vocab + trl._BLOCK_SIZE - 1) // trl._BLOCK_SIZE
            for s in range(0, n_tokens, chunk):
                e = min(s + chunk, n_tokens)
                n = e - s
                tile = buf[:n]
                torch.mm(hidden[s:e].to(compute_dtype), w.t(), out=tile)
                fold = trl._forward_kernel[(n,)] if triton else trl._forward_tile
                unfold = trl._backward_kernel[(n, blocks)] if triton else trl._backward_tile
                fold(tile, tile.stride(0), targets[s:e], running_max[s:e], sum_exp[s:e], x_sum_exp[s:e], sq_sum_exp[s:e],
                     z_sum[s:e], max_before_target[s:e], target_logit[s:e], 0, vocab, BLOCK_SIZE=trl._BLOCK_SIZE,
                     **flags, **kernel_args)
                log_z = running_max[s:e] + torch.log(sum_exp[s:e])
                # The tile becomes d log p(target) / d logits (a gradient of one per token), in place.
                unfold(tile, tile.stride(0), targets[s:e], log_z, log_z, ones[s:e], ones[s:e], 0, vocab,
                       HAS_LOGPROB_GRAD=True, HAS_ENTROPY_GRAD=False, BLOCK_SIZE=trl._BLOCK_SIZE, **kernel_args)
                # One product over the whole vocabulary: accumulated in fp32 inside it, rounded once.
                torch.mm(tile, w, out=unit_grad[s:e])

            log_z = running_max + torch.log(sum_exp)
            logprobs = target_logit - log_z
            entropy = log_z - x_sum_exp / sum_exp if "entropy" in outputs else None
            log_sum_sq_probs = torch.log(sq_sum_exp) - 2 * torch.log(sum_exp) if "log_sum_sq_probs" in outputs else None
            mean_logits = z_sum / vocab if "mean_logits" in outputs else None
            is_top1 = (target_logit >= running_max) & (target_logit > max_before_target) if "is_top1" in outputs else None
            ctx.save_for_backward(unit_grad)
            ctx.hidden_dtype = hidden.dtype
            ctx.mark_non_differentiable(*(x for x in (log_sum_sq_probs, mean_logits, is_top1) if x is not None))
            return logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1

        @staticmethod
        def backward(ctx, grad_logprobs, grad_entropy, *_):
            if grad_entropy is not None:
                raise RuntimeError("lm_head.one_pass: a gradient through the entropy needs TRL's own fused head "
                                   "(detach the entropy, or compute the loss outside kubetune.trainer.sft)")
            (unit_grad,) = ctx.saved_tensors
            grad_hidden = None
            if grad_logprobs is not None:
                grad_hidden = (unit_grad * grad_logprobs.float().unsqueeze(1)).to(ctx.hidden_dtype)
            return grad_hidden, None, None, None, None, None, None, None, None

    return OnePassLogProb


class _Dispatch:
    """Stands where TRL's fused head looks up its function: ours where it fits, else TRL's.
    Given `rows` (the flat positions whose label counts, known on the host), it scores
    those rows only and puts their outputs back in place, zeros elsewhere."""

    def __init__(self, theirs, ours, rows=None):
        self.theirs, self.ours, self.rows = theirs, ours, rows

    def apply(self, hidden, weight, bias, targets, *args):
        function = self.ours if _fits(hidden, weight, bias) else self.theirs
        if self.rows is None:
            return function.apply(hidden, weight, bias, targets, *args)
        rows, n = self.rows
        if hidden.shape[0] != n:
            raise RuntimeError(f"lm_head.one_pass: {hidden.shape[0]} positions reached the head, the label rows "
                               f"were counted for {n}")
        out = function.apply(hidden.index_select(0, rows), weight, bias, targets.index_select(0, rows), *args)
        # index_copy keeps an all-masked micro-batch connected to the model (a zero that has a
        # gradient), as TRL's masked_scatter does.
        return tuple(None if x is None else x.new_zeros(n).index_copy(0, rows, x) for x in out)


@contextlib.contextmanager
def one_pass(rows=None):
    """Within: `model(..., fused_lm_head=True)` makes the head's gradient in the forward.

    `rows`, optional: (index, n), the positions of the n shifted labels that are not -100,
    as a device tensor whose length the host knows (`sft.label_rows`). Why: TRL's head
    scores only those positions, but finds them with `hidden[mask]`, a nonzero() that waits
    for the GPU to finish the forward, and its backward (masked_scatter's) waits again: the
    GPU idles wherever the host is the slower side (bench/RESULTS.md, issue 16, sixth round:
    the waits gone from the profile, no gain on a GPU-bound machine). With the rows given, TRL is
    told to pass every position (its path for devices without Triton: views and masked_fill,
    no wait) and the rows are picked here with index_select, which does not wait."""
    import trl.trainer.utils as utils

    theirs, use_triton = utils._ChunkedLogProbFunction, utils._use_triton
    utils._ChunkedLogProbFunction = _Dispatch(theirs, one_pass_function(), rows)
    if rows is not None:
        utils._use_triton = lambda device: False
    try:
        yield
    finally:
        utils._ChunkedLogProbFunction, utils._use_triton = theirs, use_triton
