"""Trainer callbacks: checkpoints to S3, graceful SIGTERM, progress reporting.

They glue transformers' Trainer loop to the project's modules; the logic they
call (artifacts, progress) is testable on its own.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from kubetune.trainer import artifacts
from kubetune.trainer.fast_paths import host_copies_pinned_ahead, keep_attention_outputs, uncheckpoint_last_layers
from kubetune.trainer.progress import ProgressReporter
from kubetune.trainer.storage import Store

EXTRAS_DIR = "kubetune"  # inside a checkpoint: metrics.jsonl + tensorboard/ so a resumed run continues the curve


class GracefulStop:
    """SIGTERM sets a flag; the step in flight finishes, a checkpoint is saved and uploaded, then the run exits."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> "GracefulStop":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """Any rank asked to stop -> every rank stops at the same step (collectives must match)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            import torch

            flag = torch.tensor([1 if self.requested else 0], device=_dist_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.requested = bool(flag.item())
        return self.requested


def _dist_device():
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class StopOnSignal(TrainerCallback):
    def __init__(self, stop: GracefulStop):
        self.stop = stop
        self.stopped_at: Optional[int] = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.agreed():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


class UploadCheckpoints(TrainerCallback):
    """After the Trainer writes checkpoint-N locally, publish it to checkpoints/step-N/ (rank 0).

    `run` (artifacts.run_record) goes into each checkpoint's manifest, so that a later start can
    tell whether the checkpoint belongs to its own run before resuming from it."""

    def __init__(self, store: Store, run_dir: Path, reporter: Optional[ProgressReporter], keep: int, is_main: bool,
                 run: Optional[dict] = None):
        self.store, self.run_dir, self.reporter, self.keep, self.is_main = store, run_dir, reporter, keep, is_main
        self.run = run
        self.last_step: Optional[int] = None

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        _barrier()  # every rank has written its RNG state into the checkpoint before rank 0 uploads it
        _gather_rng_states(local)
        if self.is_main and local.is_dir():
            if self.reporter is not None:
                self.reporter.flush()
            extras = local / EXTRAS_DIR
            extras.mkdir(exist_ok=True)
            metrics = self.run_dir / "metrics.jsonl"
            if metrics.exists():
                shutil.copyfile(metrics, extras / "metrics.jsonl")
            tb = self.run_dir / "tensorboard"
            if tb.is_dir():
                shutil.copytree(tb, extras / "tensorboard", dirs_exist_ok=True)
            prefix = artifacts.checkpoint_prefix(step)
            meta = {"step": step, "epoch": state.epoch}
            if self.run is not None:
                meta["config"] = self.run
            artifacts.publish_dir(self.store, local, prefix, meta=meta)
            self.last_step = step
            if self.reporter is not None:
                self.reporter.checkpoint(step, f"{self.store.uri.rstrip('/')}/{prefix}/")
            artifacts.prune_checkpoints(self.store, self.keep)
        _barrier()
        return control


def _gather_rng_states(local: Path) -> None:
    """Bring every rank's RNG state into rank 0's checkpoint folder.

    Ranks on other machines write `rng_state_<rank>.pth` to their own disk;
    without this, a multi-node resume would restore only the first machine's
    RNG streams. Collective: every rank calls it. Files are a few KiB each.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    rank = dist.get_rank()
    mine = local / f"rng_state_{rank}.pth"
    payload = (mine.name, mine.read_bytes()) if mine.is_file() else None
    gathered: Optional[list] = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    if rank == 0 and gathered is not None:
        local.mkdir(parents=True, exist_ok=True)
        for item in gathered:
            if item is not None and not (local / item[0]).exists():
                (local / item[0]).write_bytes(item[1])


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CountTokens(TrainerCallback):
    """Non-pad tokens trained on, into `state.num_input_tokens_seen`, without a host sync
    per micro-batch.

    The Trainer's own count (`include_num_input_tokens_seen`) calls `.item()` after every
    micro-batch's backward: the host then waits for the GPU to drain and the GPU idles
    while the host runs the optimizer step, callbacks and the next batch's launches.
    Here `training_step` (wrapped by `wrap`) adds the count without waiting (a length
    for padding-free rows, an on-device sum of the mask otherwise), and the total is
    read, and all-reduced across ranks, only at steps that log, save, evaluate or stop,
    which sync anyway. Every rank must have this callback (the all-reduce is collective;
    those steps are the same on every rank).
    """

    def __init__(self):
        self.pending = 0  # an int, or a 0-d device tensor once a mask was summed

    def add(self, inputs) -> None:
        mask = inputs.get("attention_mask")
        if mask is not None:
            self.pending = self.pending + mask.sum()
        elif inputs.get("input_ids") is not None:
            self.pending = self.pending + inputs["input_ids"].numel()

    def wrap(self, training_step):
        def counted(model, inputs, *args, **kwargs):
            self.add(inputs)
            return training_step(model, inputs, *args, **kwargs)

        return counted

    def flush(self) -> int:
        import torch
        import torch.distributed as dist

        n, self.pending = self.pending, 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            t = torch.as_tensor(n, dtype=torch.int64).to(device)
            dist.all_reduce(t)
            return int(t.item())
        return int(n)

    def on_step_end(self, args, state, control, **kwargs):
        if (control.should_log or control.should_save or control.should_evaluate or control.should_training_stop
                or state.global_step >= state.max_steps):
            state.num_input_tokens_seen = (state.num_input_tokens_seen or 0) + self.flush()


class SaveKernelCache(TrainerCallback):
    """Saves the kernels compiled so far (kernel_cache.KernelCache) once the run's first
    step is done, in the background, and at the end when later steps compiled more (a
    batch of another shape). On the main process only: one archive per job and key."""

    def __init__(self, cache):
        self.cache = cache
        self.saved_once = False

    def on_step_end(self, args, state, control, **kwargs):
        if not self.saved_once:
            self.saved_once = True
            self.cache.save(wait=False)

    def on_train_end(self, args, state, control, **kwargs):
        self.cache.save(wait=True)


class SelectiveCheckpointing(TrainerCallback):
    """Applies the plan's `memory_plan.LayerChoices`: leaves the last `layers` decoder layers
    uncheckpointed (fast_paths.uncheckpoint_last_layers), once the Trainer has switched
    checkpointing on for all of them at the start of train(), and lets `kept_attention`
    checkpointed layers keep their attention output for the recompute
    (fast_paths.keep_attention_outputs), in host memory with `kept_on_host`, the output
    projection's beside it with `kept_output`.

    In host memory, from the step after the host buffers are pinned: given `tokens` (the
    micro-batch's), they are pinned on a thread started after the first step
    (`packed_attention.HostCopies.reserve`), so that neither the Trainer's setup nor the
    first step waits for them."""

    def __init__(self, choices, tokens: int = 0):
        self.layers, self.kept_attention, self.kept_on_host, self.kept_output = choices
        self.tokens = tokens
        self.copies = None
        self._waiting = False  # host slots not given yet: their buffers are being pinned

    def _keep(self, model, copies=None) -> None:
        keep_attention_outputs(model, self.kept_attention, uncheckpointed=self.layers, on_host=self.kept_on_host,
                               copies=copies, with_output=self.kept_output)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and args.gradient_checkpointing:
            uncheckpoint_last_layers(model, self.layers)
            if self.kept_attention:
                if self.kept_on_host and self.tokens:
                    self._waiting = True
                else:
                    self._keep(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._waiting or model is None:
            return
        if self.copies is None:
            self.copies = host_copies_pinned_ahead(model, self.kept_attention, self.tokens, with_output=self.kept_output)
        if self.copies.pinned():
            self._keep(model, self.copies)
            self._waiting = False


class ReportProgress(TrainerCallback):
    def __init__(self, reporter: ProgressReporter):
        self.reporter = reporter

    def on_train_begin(self, args, state, control, **kwargs):
        self.reporter.start(state.global_step, state.max_steps, state.num_input_tokens_seen or 0)

    def on_step_end(self, args, state, control, **kwargs):
        self.reporter.step(state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs or "eval_loss" in logs:
            self.reporter.record(state.global_step, state.max_steps, state.epoch or 0.0, logs,
                                 state.num_input_tokens_seen or 0)
