"""The LM head with its gradient made in the forward (trainer/lm_head.py) against TRL's
own fused head: the same log-probabilities, entropy and top-1 flags, the same gradient
for any per-token weighting of the log-probabilities, over several token chunks and
vocabulary tiles, with soft-capping and temperature. On a CPU both run TRL's torch folds;
the Triton folds are the same code on the GPU (bench/check_lm_head.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from trl.kernels import chunked_logprob

from kubetune.trainer import lm_head

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # in the order returned


def _inputs(seed: int, n: int = 37, hidden: int = 24, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float32)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float32) * 0.5
    targets = torch.randint(0, vocab, (n,), generator=g)
    row_weights = torch.rand(n, generator=g, dtype=torch.float32) - 0.3  # any sign, a different one per token
    return h, w, targets, row_weights


def _run(fn, h, w, targets, row_weights, temperature, softcap, logit_scale, chunk):
    h = h.clone().requires_grad_(True)
    out = fn.apply(h, w, None, targets, temperature, chunk, softcap, logit_scale,
                   ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    (out[0] * row_weights).sum().backward()
    return [None if x is None else x.detach() for x in out], h.grad


@pytest.mark.parametrize("temperature,softcap,logit_scale", [(1.0, None, 1.0), (0.7, 30.0, 1.0), (1.0, None, 0.25)])
@pytest.mark.parametrize("token_chunk", [4096, 16, 1])
def test_one_pass_matches_trls_fused_head(monkeypatch, temperature, softcap, logit_scale, token_chunk):
    # Small chunks: TRL folds 7 vocabulary tiles a chunk; ours 1 to 37 token chunks over the whole vocabulary.
    monkeypatch.setattr(chunked_logprob, "TOKEN_CHUNK_SIZE", token_chunk)
    h, w, targets, row_weights = _inputs(0)
    theirs, their_grad = _run(chunked_logprob.ChunkedLogProbFunction, h, w, targets, row_weights,
                              temperature, softcap, logit_scale, chunk=8)
    ours, our_grad = _run(lm_head.one_pass_function(), h, w, targets, row_weights, temperature, softcap, logit_scale, chunk=8)
    for name, a, b in zip(OUTPUTS, ours, theirs):
        if name == "is_top1":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-6)
    assert our_grad.abs().sum() > 0


def test_a_gradient_through_the_entropy_is_refused_not_dropped():
    h, w, targets, _ = _inputs(1)
    h.requires_grad_(True)
    logprobs, entropy, *_ = lm_head.one_pass_function().apply(h, w, None, targets, 1.0, 8, None, 1.0, ("entropy",))
    with pytest.raises(RuntimeError, match="entropy"):
        (logprobs.sum() + entropy.sum()).backward()


def test_trls_function_serves_what_one_pass_does_not(monkeypatch):
    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def apply(self, *args):
            calls.append(self.name)

    dispatch = lm_head._Dispatch(Recorder("trl"), Recorder("ours"))
    h, w, targets, _ = _inputs(2)
    dispatch.apply(h.clone().requires_grad_(True), w, None, targets)
    dispatch.apply(h, w, None, targets)  # evaluation: no gradient wanted, TRL's single pass
    dispatch.apply(h.clone().requires_grad_(True), w.clone().requires_grad_(True), None, targets)  # a trained head
    dispatch.apply(h.clone().requires_grad_(True), w, torch.zeros(w.shape[0]), targets)  # a head with a bias
    assert calls == ["ours", "trl", "trl", "trl"]


def test_one_pass_is_in_place_only_within_its_block():
    import trl.trainer.utils as utils

    theirs = utils._ChunkedLogProbFunction
    with pytest.raises(ValueError):
        with lm_head.one_pass():
            assert isinstance(utils._ChunkedLogProbFunction, lm_head._Dispatch)
            raise ValueError("a failing forward")
    assert utils._ChunkedLogProbFunction is theirs


def test_a_model_forward_through_trls_fused_head_uses_it(tiny_model, monkeypatch):
    """Through the real path: TRL's add_fused_lm_head on a model, as SFTTrainer sets it up."""
    chosen = []
    fits = lm_head._fits
    monkeypatch.setattr(lm_head, "_fits", lambda *a: chosen.append(fits(*a)) or chosen[-1])
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model.lm_head.weight.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :5] = -100
    losses, grads = [], []
    for one_pass in (False, True):
        model.zero_grad()
        with lm_head.one_pass() if one_pass else contextlib.nullcontext():
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        loss = (-out.log_probs).sum() / out.label_mask.sum()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert chosen == [True]  # the one-pass head ran, once, in the second forward only
    torch.testing.assert_close(losses[1], losses[0])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def _device_waits(run):
    """The aten ops of `run` (forward and backward) whose output size depends on tensor
    values: each is a wait for the device on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    waits = {"nonzero", "masked_select", "masked_scatter", "masked_scatter_backward", "_local_scalar_dense"}
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in waits:
                seen.append(name)
            return func(*args, **(kwargs or {}))

    with Record():
        result = run()
    return result, seen


@pytest.mark.parametrize("masked", ["prompt and padding", "everything"])
def test_label_rows_counted_on_the_host_score_what_trls_compact_path_scores(tiny_model, monkeypatch, masked):
    """TRL's head, on a GPU, scores only the labelled positions and finds them with
    hidden[mask] (a device wait); with the rows counted where the collator made the batch
    (sft.label_rows) the same positions are scored without one: the same loss, outputs and
    gradients, an all-masked micro-batch included (a zero loss that still back-propagates)."""
    import trl.trainer.utils as utils
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from kubetune.trainer.sft import label_rows

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model.lm_head.weight.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[:, :6] = -100
    labels[1, 31:] = -100
    if masked == "everything":
        labels[:] = -100
    rows = label_rows(labels)
    assert rows.tolist() == [i for i, keep in enumerate((labels[:, 1:] != -100).reshape(-1).tolist()) if keep]

    def step(rows_given):
        def run():
            model.zero_grad()
            with lm_head.one_pass((rows, 2 * 39) if rows_given else None):
                out = model(input_ids=ids, labels=labels, fused_lm_head=True)
            loss = (-out.log_probs).sum() / out.label_mask.sum().clamp(min=1)
            loss.backward()
            return out, loss.detach()

        return _device_waits(run)

    monkeypatch.setattr(utils, "_use_triton", lambda device: True)  # TRL's GPU path, on this CPU
    # The backbone's own wait (transformers' scan for packed rows: one sequence per row here,
    # None is its answer) is not the head's (packed_attention.skip_packed_scan, for varlen).
    import transformers.masking_utils as masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    (theirs, their_loss), their_waits = step(rows_given=False)
    their_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    (ours, our_loss), our_waits = step(rows_given=True)
    assert "masked_scatter" in their_waits  # the detector sees TRL's waits
    assert our_waits == []
    assert utils._use_triton(None) is True  # one_pass put back what it found
    torch.testing.assert_close(our_loss, their_loss)
    for name in ("log_probs", "entropy", "is_top1"):
        torch.testing.assert_close(getattr(ours, name).detach(), getattr(theirs, name).detach(), msg=name)
    if masked == "everything":
        assert our_loss == 0
    for name, grad in their_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


def test_label_rows_counted_for_another_shape_are_refused():
    rows = torch.tensor([0, 2])
    with lm_head.one_pass((rows, 5)):
        import trl.trainer.utils as utils

        with pytest.raises(RuntimeError, match="counted for 5"):
            utils._ChunkedLogProbFunction.apply(torch.zeros(6, 4, requires_grad=True), torch.zeros(3, 4), None,
                                                torch.zeros(6, dtype=torch.long), 1.0, 16)
