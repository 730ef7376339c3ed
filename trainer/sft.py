"""TRL's SFTTrainer without a host sync per micro-batch.

Why: TRL 1.16's `compute_loss` reads four numbers back to the host after every
micro-batch (`num_valid > 0`, the entropy and token-accuracy `.item()`s, and the
token count's `.item()`). Each one makes the host wait until the GPU has run the
whole forward; the GPU then idles while the host launches the backward, and the
lead the host had built up in the forward is lost. On an 8B QLoRA step the host
is barely faster than the GPU (bench/RESULTS.md, the FP8 profile: 967 ms of host
time in a 1.05 s step), so that lead is what keeps the GPU busy.

This subclass computes the same loss on TRL's default path (the fused LM head,
`loss_type: nll`, no custom loss function, label smoothing, MoE aux loss or
sequence parallelism: everything else goes to TRL's own method) and keeps the
metrics as device tensors until a step logs, when they are read in one transfer.
The Trainer's own loop reads one more, its NaN/inf filter of each micro-batch's
loss: the same filter runs on the device here (`training_step`).
tests/trainer/test_sft_sync_free.py trains the same steps with TRL's class and this
one and compares the losses, logged metrics and FLOP counts, so a TRL or
transformers release that changes the default path fails there.

The fused head's own host waits (it finds the positions to score with a
nonzero()) are avoided by counting those positions on the host, where the
collator makes the batch (`LabelRows`, `lm_head.one_pass`).
"""

from __future__ import annotations

import functools

# The batch key under which LabelRows hands the label positions to the trainer (removed
# before the batch reaches the model).
LABEL_ROWS = "kubetune_label_rows"


def label_rows(labels):
    """The flat positions of the shifted labels (labels[:, 1:]) that are not -100: the rows
    TRL's fused head scores, counted where the labels are still on the host."""
    return (labels[:, 1:] != -100).reshape(-1).nonzero().squeeze(1)


class LabelRows:
    """Wraps a collator: each batch also carries `label_rows` of its labels. Only for
    labels on the CPU and without pre-shifted `shift_labels` (context parallelism scores
    those unshifted): anything else goes to the model as the collator made it."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples):
        import torch

        batch = self.collate(examples)
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if (isinstance(labels, torch.Tensor) and labels.device.type == "cpu" and labels.dim() == 2
                and "shift_labels" not in batch):
            batch[LABEL_ROWS] = label_rows(labels)
        return batch


@functools.lru_cache(maxsize=1)
def sft_trainer_class():
    import torch
    from trl import SFTTrainer

    from kubetune.trainer import lm_head

    class SyncFreeSFTTrainer(SFTTrainer):
        _pending_tokens = 0  # int, or a 0-d device tensor when several processes count
        # While train() runs: the caller's `logging_nan_inf_filter`, applied on the device by
        # training_step (the args' flag is off then, so the Trainer's loop does not test the loss
        # on the host); None otherwise.
        _nonfinite_filter = None
        _flop_params = None  # the parameter count floating_point_ops multiplies by, counted once
        _label_rows = None  # the micro-batch's LABEL_ROWS, from _prepare_inputs to compute_loss
        count_label_rows = True  # performance.Resolved.avoid_host_waits

        def _get_dataloader(self, *args, **kwargs):
            # The loaders' batches carry LABEL_ROWS; `self.data_collator` stays TRL's (its
            # checks look at the collator's class).
            if not self.count_label_rows:
                return super()._get_dataloader(*args, **kwargs)
            collate = self.data_collator
            self.data_collator = LabelRows(collate)
            try:
                return super()._get_dataloader(*args, **kwargs)
            finally:
                self.data_collator = collate

        def _prepare_inputs(self, inputs):
            # Every path to the model (training_step, prediction_step) passes here: the key
            # never reaches a forward.
            self._label_rows = inputs.pop(LABEL_ROWS, None) if isinstance(inputs, dict) else None
            return super()._prepare_inputs(inputs)

        def train(self, *args, **kwargs):
            self._nonfinite_filter, self.args.logging_nan_inf_filter = self.args.logging_nan_inf_filter, False
            try:
                return super().train(*args, **kwargs)
            finally:
                self.args.logging_nan_inf_filter, self._nonfinite_filter = self._nonfinite_filter, None

        def evaluation_loop(self, *args, **kwargs):
            # Evaluation inside train() filters its losses as the caller asked.
            if self._nonfinite_filter is None:
                return super().evaluation_loop(*args, **kwargs)
            self.args.logging_nan_inf_filter = self._nonfinite_filter
            try:
                return super().evaluation_loop(*args, **kwargs)
            finally:
                self.args.logging_nan_inf_filter = False

        def training_step(self, model, inputs, num_items_in_batch=None):
            """The Trainer's NaN/inf filter, on the device. Its loop tests every micro-batch's
            loss with `torch.isnan(loss) or torch.isinf(loss)`: a read to the host that waits
            for the whole backward, after which the GPU idles while the host clips the gradients
            and launches the optimizer step (about 30 ms of an 8B step, bench/RESULTS.md). The
            same replacement without the wait: a non-finite loss counts as the mean of the
            losses summed since the last log."""
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not self._nonfinite_filter:
                return loss
            mean = self._tr_loss / (1 + self.state.global_step - self._globalstep_last_logged)
            return torch.where(torch.isfinite(loss), loss, mean.to(loss.dtype))

        def floating_point_ops(self, inputs):
            # The Trainer counts the model's parameters after every micro-batch, a walk over
            # every module and parameter (thousands with LoRA): host time in each step.
            main = getattr(self.model, "main_input_name", "input_ids")
            if main not in inputs or not hasattr(self.model, "num_parameters"):
                return 0
            if self._flop_params is None:
                self._flop_params = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main].numel() * self._flop_params

        def _plain_loss_path(self, return_outputs: bool) -> bool:
            pc = getattr(self.accelerator, "parallelism_config", None)
            sequence_parallel = pc is not None and getattr(pc, "sp_enabled", False)
            return not (return_outputs or self.compute_loss_func is not None or self.label_smoother is not None
                        or self.args.loss_type != "nll" or self.aux_loss_enabled or sequence_parallel)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self._plain_loss_path(return_outputs):
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            inputs["use_cache"] = False
            rows, self._label_rows = self._label_rows, None
            labels = inputs.get("labels")
            if rows is not None and labels is not None and "shift_labels" not in inputs:
                rows = (rows.to(labels.device, non_blocking=True), labels.shape[0] * (labels.shape[1] - 1))
            else:
                rows = None
            with lm_head.one_pass(rows):  # the head's gradient made in its forward: two vocabulary passes, not three
                outputs = model(**inputs, fused_lm_head=True)
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = (-outputs.log_probs).sum() / torch.as_tensor(num_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())

            gather = self.accelerator.gather_for_metrics
            num_valid = gather(outputs.label_mask.sum()).sum()
            entropy_sum = gather(outputs.entropy.detach().sum()).sum()
            num_correct = gather(outputs.is_top1.sum()).sum()
            # x / max(n, 1) is TRL's "x / n if n > 0 else 0": x is 0 whenever n is.
            denominator = num_valid.clamp(min=1)
            self._metrics[mode]["entropy"].append((entropy_sum / denominator).float())
            self._metrics[mode]["mean_token_accuracy"].append((num_correct / denominator).float())
            if mode == "train":
                self._count_tokens(inputs)
            return loss

        def _count_tokens(self, inputs) -> None:
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:
                local = inputs["position_ids"].size(1)  # a host number: padding-free rows
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
            if self.accelerator.num_processes > 1:
                local = self.accelerator.gather_for_metrics(torch.as_tensor(local, device=self.accelerator.device)).sum()
            self._pending_tokens = self._pending_tokens + local

        def log(self, logs, start_time=None):
            mode = "train" if self.model.training else "eval"
            metrics = self._metrics[mode]
            keys = [k for k, v in metrics.items() if v and isinstance(v[0], torch.Tensor)]
            if keys:  # every pending device number in one transfer
                flat = torch.cat([torch.stack(metrics[k]).reshape(-1) for k in keys]).tolist()
                for k in keys:
                    n = len(metrics[k])
                    metrics[k], flat = flat[:n], flat[n:]
            pending, self._pending_tokens = self._pending_tokens, 0
            self._total_train_tokens += int(pending) // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]
            super().log(logs, start_time)

    return SyncFreeSFTTrainer
