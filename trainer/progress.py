"""Training progress: one record per logging step, fanned out to the console, metrics.jsonl,
TensorBoard and (in-cluster) the FineTuneJob status. Only rank 0 creates a reporter.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kubetune.trainer.kubestatus import StatusPatcher


@dataclass
class RateMeter:
    """Tokens/s and ETA from (time, step, tokens) samples since training (re)started."""

    start_time: float = field(default_factory=time.monotonic)
    start_step: int = 0
    start_tokens: int = 0

    def tokens_per_second(self, tokens: int, now: Optional[float] = None) -> Optional[float]:
        dt = (now or time.monotonic()) - self.start_time
        return round((tokens - self.start_tokens) / dt, 1) if dt > 0 and tokens > self.start_tokens else None

    def eta_seconds(self, step: int, total: int, now: Optional[float] = None) -> Optional[int]:
        done = step - self.start_step
        if done <= 0 or total <= 0:
            return None
        per_step = ((now or time.monotonic()) - self.start_time) / done
        return int(per_step * max(0, total - step))


def format_line(p: dict[str, Any]) -> str:
    """Pure: the log line printed when stdout is not a terminal."""
    parts = [f"step {p['step']}/{p['totalSteps']}", f"epoch {p.get('epoch', 0):.2f}"]
    for key, label, fmt in (("loss", "loss", ".4f"), ("evalLoss", "eval_loss", ".4f"), ("learningRate", "lr", ".2e"),
                            ("tokensPerSecond", "tok/s", ".0f")):
        if p.get(key) is not None:
            parts.append(f"{label} {p[key]:{fmt}}")
    if p.get("etaSeconds") is not None:
        parts.append(f"eta {p['etaSeconds'] // 60}m{p['etaSeconds'] % 60:02d}s")
    return " | ".join(parts)


class ProgressReporter:
    def __init__(self, metrics_path: Path, tensorboard_dir: Optional[Path] = None,
                 patcher: Optional[StatusPatcher] = None, tty: Optional[bool] = None):
        self.metrics_path = Path(metrics_path)
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self.tensorboard_dir = tensorboard_dir
        self.patcher = patcher
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.rate = RateMeter()
        self.last: dict[str, Any] = {}
        self._tb = None
        self._tb_missing = False
        self._tb_purge_step: Optional[int] = None
        self._bar = None
        self._task = None

    # -- lifecycle
    def start(self, step: int, total: int, tokens: int = 0) -> None:
        self.rate = RateMeter(start_step=step, start_tokens=tokens)
        self.last = {"step": step, "totalSteps": total}
        # The TensorBoard writer is made at the first record, not here: its import (about a
        # second) would otherwise delay the first optimizer step.
        self._tb_purge_step = step or None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=step, info="")
        else:
            print(f"training: resuming at step {step}/{total}" if step else f"training: {total} steps", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.patcher is not None:
            self.patcher.flush()

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    # -- events
    def record(self, step: int, total: int, epoch: float, logs: dict[str, Any], tokens: int = 0) -> dict[str, Any]:
        p: dict[str, Any] = {"step": step, "totalSteps": total, "epoch": round(epoch or 0.0, 4)}
        if "loss" in logs:
            p["loss"] = float(logs["loss"])
        if "eval_loss" in logs:
            p["evalLoss"] = float(logs["eval_loss"])
        if "learning_rate" in logs:
            p["learningRate"] = float(logs["learning_rate"])
        p["tokensPerSecond"] = self.rate.tokens_per_second(tokens)
        p["etaSeconds"] = self.rate.eta_seconds(step, total)
        p["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: v for k, v in p.items() if v is not None}) + "\n")
        tb = self._writer()
        if tb is not None:
            for key in ("loss", "evalLoss", "learningRate", "tokensPerSecond"):
                if p.get(key) is not None:
                    tb.add_scalar(f"train/{key}" if key != "evalLoss" else "eval/loss", p[key], step)
        self.last.update({k: v for k, v in p.items() if v is not None and k != "time"})
        self._show()
        return p

    def _writer(self):
        """The TensorBoard writer (None without a directory or without tensorboard installed)."""
        if self._tb is None and self.tensorboard_dir is not None and not self._tb_missing:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.tensorboard_dir), purge_step=self._tb_purge_step)
            except ImportError:
                self._tb_missing = True
        return self._tb

    def step(self, step: int, total: int) -> None:
        self.last.update(step=step, totalSteps=total)
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def checkpoint(self, step: int, uri: str) -> None:
        self.last["lastCheckpoint"] = {"step": step, "uri": uri, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._patch(force=True)

    def _show(self) -> None:
        if self._bar is not None:
            info = " ".join(f"{k}={self.last[k]:.4f}" for k in ("loss", "evalLoss") if k in self.last)
            self._bar.update(self._task, completed=self.last["step"], info=info)
        else:
            print(format_line(self.last), flush=True)
        self._patch()

    def _patch(self, force: bool = False) -> None:
        if self.patcher is not None:
            body = dict(self.last)
            body["updatedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.patcher.update(body, force=force)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    return [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]


def truncate_metrics(path: Path, max_step: int) -> None:
    """Drop records after `max_step` (a resumed run continues the curve from its checkpoint)."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= max_step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def plot_loss_curve(metrics: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    evals = [(r["step"], r["evalLoss"]) for r in metrics if "evalLoss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
