"""The validate stage: check the dataset against the base model before any GPU time is spent.

Writes a machine-readable report (stdout or --report path), a short human
summary, and the pod's termination message. Exits non-zero when any row is bad
or nothing is left to train on.

`validation/report.json` under output.uri is published only for a dataset that
passed: its presence means "this data trains". For bad data the report goes to
stdout (the pod log) or --report, the first bad rows into the termination
message (the FineTuneJob's status), and a report left by an earlier run is
withdrawn, so that it cannot vouch for data that no longer passes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from kubetune.trainer import artifacts
from kubetune.trainer.config import TrainerConfig
from kubetune.trainer.dataformats import DatasetError
from kubetune.trainer.dataset import PreparedData, prepare
from kubetune.trainer.storage import StorageError
from kubetune.trainer.termination import write_message
from kubetune.trainer.tokenization import TemplateError

STAGE = "validate"
FIRST_ERRORS = 10


def build_report(cfg: TrainerConfig, data: PreparedData) -> dict[str, Any]:
    """Pure: the JSON report of a prepared dataset."""
    report = {
        "ok": data.ok,
        "dataset": cfg.dataset.uri,
        "format": data.format,
        "rows": data.total_rows,
        "validRows": len(data.train) + len(data.validation),
        "badRows": data.bad_rows,
        "errorCount": len(data.errors),
        "errors": [e.to_dict() for e in data.errors[:1000]],
        "tokens": data.token_stats,
        "split": {"train": len(data.train), "validation": len(data.validation),
                  "validationSplit": cfg.dataset.validation_split, "seed": cfg.training.seed},
        "duplicates": {"count": len(data.duplicates), "policy": data.duplicate_policy,
                       "rows": [{"row": r, "sameAs": first} for r, first in data.duplicates[:1000]]},
    }
    if data.mixed_formats:
        report["mixedFormats"] = {fmt: rows[:1000] for fmt, rows in data.mixed_formats.items()}
    return report


def summary(report: dict[str, Any], data: Optional[PreparedData] = None) -> str:
    lines = [
        f"dataset {report['dataset']}: format={report['format']} rows={report['rows']} "
        f"valid={report['validRows']} bad rows={report['badRows']} (errors={report['errorCount']})",
    ]
    t = report.get("tokens") or {}
    if t.get("count"):
        lines.append(
            f"tokens: min={t['min']} p50={t['p50']} p90={t['p90']} p99={t['p99']} max={t['max']}; "
            f"{t['overMaxLength']} rows over maxLength={t['maxLength']} ({t['overLength']})"
        )
    s = report["split"]
    lines.append(f"split: train={s['train']} validation={s['validation']}")
    if data is not None and data.mixed_formats:
        lines.append(data.mixed_formats_line())
    if data is not None and data.duplicates:
        lines.append(f"warning: {data.duplicates_line()}")
    for e in report["errors"][:FIRST_ERRORS]:
        where = f"row {e['row']}" + (f", field '{e['field']}'" if e["field"] else "")
        lines.append(f"  {where}: {e['message']}")
    if report["errorCount"] > FIRST_ERRORS:
        lines.append(f"  ... and {report['errorCount'] - FIRST_ERRORS} more (see the JSON report)")
    return "\n".join(lines)


def _withdraw(cfg: TrainerConfig) -> None:
    """Remove an earlier run's validation/ report: it must not stand for data that now fails."""
    from kubetune.trainer.modelio import output_store

    store = output_store(cfg)
    store.delete(f"{artifacts.VALIDATION}/{artifacts.MANIFEST}")  # manifest first: the report is then invisible
    store.delete(artifacts.VALIDATION_REPORT)


def _fail(cfg: TrainerConfig, reason: str, message: str, report_path: Optional[Path],
          publish: bool) -> tuple[int, dict[str, Any]]:
    report = {"ok": False, "reason": reason, "message": message}
    print(f"validation failed: {message}", file=sys.stderr)
    if report_path:
        report_path.write_text(json.dumps(report, indent=1))
    write_message(STAGE, False, reason, message)
    if publish:
        try:
            _withdraw(cfg)
        except StorageError:
            pass  # the output store itself is unreachable: the failure above is the one to report
    return 1, report


def serving_problem(cfg: TrainerConfig, model_dir: Path) -> Optional[str]:
    """Why vLLM could not shard the base model over serving.gpus (read from its config.json), or None.
    Found here, before training, rather than by the serving pod after hours of GPU time."""
    from kubetune.contract.vllm import tensor_parallel_problem

    tp = cfg.serve.tensor_parallel_size
    config = Path(model_dir) / "config.json"
    if not tp or tp == 1 or not config.exists():
        return None
    problem = tensor_parallel_problem(json.loads(config.read_text()), tp)
    return f"serving.gpus {tp}: {problem}" if problem else None


def run_validate(cfg: TrainerConfig, report_path: Optional[Path] = None, publish: bool = True) -> tuple[int, dict[str, Any]]:
    from kubetune.trainer.modelio import ModelSourceError, base_model_dir, load_tokenizer, output_store

    try:
        model_dir = base_model_dir(cfg)
        tokenizer = load_tokenizer(model_dir)
    except ModelSourceError as e:
        return _fail(cfg, "BaseModelUnusable", str(e), report_path, publish)
    except (StorageError, OSError, ValueError) as e:
        return _fail(cfg, "BaseModelUnreadable", f"baseModel.uri {cfg.base_model.uri}: {e}", report_path, publish)
    problem = serving_problem(cfg, model_dir)
    if problem:
        return _fail(cfg, "TensorParallelMismatch", problem, report_path, publish)
    try:
        data = prepare(cfg, tokenizer)
    except TemplateError as e:
        return _fail(cfg, "ChatTemplateUnusable", str(e), report_path, publish)
    except (DatasetError, StorageError) as e:
        return _fail(cfg, "DatasetUnreadable", f"dataset.uri {cfg.dataset.uri}: {e}", report_path, publish)
    report = build_report(cfg, data)
    if publish:
        if data.ok:
            artifacts.publish_json(output_store(cfg), artifacts.VALIDATION, report)
        else:
            _withdraw(cfg)
    text = json.dumps(report, indent=1)
    if report_path:
        report_path.write_text(text)
    else:
        print(text)
    print(summary(report, data), file=sys.stderr)
    if data.ok:
        extra = {"duplicates": len(data.duplicates)} if data.duplicates else {}
        message = f"{report['validRows']} rows valid"
        if data.duplicates:
            message += f"; {data.duplicates_line()}"
        write_message(STAGE, True, "DatasetValid", message, format=data.format,
                      rows=report["rows"], train=len(data.train), validation=len(data.validation), **extra)
        return 0, report
    reason = "InvalidRows" if data.errors else "EmptyDataset"
    message = data.problem()
    if data.mixed_formats:
        message = f"{data.mixed_formats_line()}; {message}"
    write_message(STAGE, False, reason, message, badRows=report["badRows"], errorCount=report["errorCount"],
                  errors=report["errors"][:20])
    return 1, report
