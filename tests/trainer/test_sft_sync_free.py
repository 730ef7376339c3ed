"""The trainer's SFTTrainer (trainer/sft.py) against TRL's own on the same tiny
run: the same losses, entropy, token accuracy and token counts at every logged
step, for padding-free rows and padded ones. A TRL release that changes its
default loss path makes this fail instead of silently training differently."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")


def _run(trainer_cls, model_dir, tmp_path, padding_free: bool, steps: int = 4):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"prompt": f"question {i} about {'cats ' * (i % 5)}", "completion": f" answer {i}{' dogs' * (i % 3)}"}
            for i in range(32)]
    args = SFTConfig(output_dir=str(tmp_path / trainer_cls.__name__), max_steps=steps, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, logging_steps=1, learning_rate=1e-2, seed=3, report_to=[],
                     packing=padding_free, padding_free=padding_free, use_cpu=True, save_strategy="no", max_length=64,
                     dataloader_num_workers=0, disable_tqdm=True)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    assert trainer.args.logging_nan_inf_filter  # the caller's setting, back after train()
    keys = ("loss", "entropy", "mean_token_accuracy", "num_tokens")
    logs = [{k: h[k] for k in keys} for h in trainer.state.log_history if "loss" in h]
    return logs, trainer.state.total_flos


@pytest.mark.parametrize("padding_free", [True, False])
def test_the_sync_free_trainer_trains_and_logs_like_trls(tiny_model, tmp_path, padding_free, monkeypatch):
    from trl import SFTTrainer

    from kubetune.trainer import lm_head
    from kubetune.trainer.sft import sft_trainer_class

    counted = []  # the label rows each micro-batch's head got (counted on the host by the collator)
    one_pass = lm_head.one_pass
    monkeypatch.setattr(lm_head, "one_pass", lambda rows=None: counted.append(rows) or one_pass(rows))
    ours, our_flos = _run(sft_trainer_class(), tiny_model, tmp_path, padding_free)
    assert len(counted) == 4 * 2 and all(r is not None and 0 < len(r[0]) < r[1] for r in counted)
    theirs, their_flos = _run(SFTTrainer, tiny_model, tmp_path, padding_free)
    assert our_flos == their_flos > 0  # the parameter count is taken once, not after every micro-batch
    assert len(ours) == len(theirs) == 4
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        assert a["num_tokens"] == b["num_tokens"] > 0, step
        for k in ("loss", "entropy", "mean_token_accuracy"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (step, k)
    assert ours[-1]["loss"] < ours[0]["loss"]  # it trained


def test_a_non_finite_loss_is_filtered_like_the_trainers(tiny_model, tmp_path, monkeypatch):
    """The Trainer replaces a NaN/inf micro-batch loss by the mean of the losses since the
    last log, testing it on the host; ours does it on the device. Same logged losses."""
    from trl import SFTTrainer

    from kubetune.trainer.sft import sft_trainer_class

    def nan_at_third_call(step):
        calls = []

        def training_step(self, *args, **kwargs):
            loss = step(self, *args, **kwargs)
            calls.append(1)
            return loss * float("nan") if len(calls) == 3 else loss

        return training_step

    monkeypatch.setattr(SFTTrainer, "training_step", nan_at_third_call(SFTTrainer.training_step))
    ours, _ = _run(sft_trainer_class(), tiny_model, tmp_path, padding_free=True)
    monkeypatch.setattr(SFTTrainer, "training_step", nan_at_third_call(SFTTrainer.training_step))
    theirs, _ = _run(SFTTrainer, tiny_model, tmp_path, padding_free=True)
    assert len(ours) == len(theirs) == 4
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        assert math.isfinite(a["loss"]), step
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), step


def test_other_loss_paths_stay_trls(tiny_model, tmp_path):
    """A custom loss function (or label smoothing, DFT, MoE aux loss) is TRL's business."""
    from kubetune.trainer.sft import sft_trainer_class

    cls = sft_trainer_class()
    trainer = cls.__new__(cls)
    trainer.compute_loss_func, trainer.label_smoother, trainer.aux_loss_enabled = None, None, False

    class Args:
        loss_type = "nll"

    class Acc:
        parallelism_config = None

    trainer.args, trainer.accelerator = Args(), Acc()
    assert trainer._plain_loss_path(return_outputs=False)
    assert not trainer._plain_loss_path(return_outputs=True)
    Args.loss_type = "dft"
    assert not trainer._plain_loss_path(return_outputs=False)
    Args.loss_type = "nll"
    trainer.compute_loss_func = lambda *a, **k: None
    assert not trainer._plain_loss_path(return_outputs=False)
