"""The validate stage: check the dataset against the base model before any GPU time is spent.

Writes a machine-readable report (S3 `validation/report.json`, stdout or
--report path), a short human summary, and the pod's termination message.
Exits non-zero when any row is bad or nothing is left to train on.
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
    return {
        "ok": data.ok,
        "dataset": cfg.dataset.uri,
        "format": data.format,
        "rows": data.total_rows,
        "validRows": len(data.train) + len(data.validation),
        "errorCount": len(data.errors),
        "errors": [e.to_dict() for e in data.errors[:1000]],
        "tokens": data.token_stats,
        "split": {"train": len(data.train), "validation": len(data.validation),
                  "validationSplit": cfg.dataset.validation_split, "seed": cfg.training.seed},
    }


def summary(report: dict[str, Any]) -> str:
    lines = [
        f"dataset {report['dataset']}: format={report['format']} rows={report['rows']} "
        f"valid={report['validRows']} errors={report['errorCount']}",
    ]
    t = report.get("tokens") or {}
    if t.get("count"):
        lines.append(
            f"tokens: min={t['min']} p50={t['p50']} p90={t['p90']} p99={t['p99']} max={t['max']}; "
            f"{t['overMaxLength']} rows over maxLength={t['maxLength']} ({t['overLength']})"
        )
    s = report["split"]
    lines.append(f"split: train={s['train']} validation={s['validation']}")
    for e in report["errors"][:FIRST_ERRORS]:
        where = f"row {e['row']}" + (f", field '{e['field']}'" if e["field"] else "")
        lines.append(f"  {where}: {e['message']}")
    if report["errorCount"] > FIRST_ERRORS:
        lines.append(f"  ... and {report['errorCount'] - FIRST_ERRORS} more (see the JSON report)")
    return "\n".join(lines)


def _fail(reason: str, message: str, report_path: Optional[Path]) -> tuple[int, dict[str, Any]]:
    report = {"ok": False, "reason": reason, "message": message}
    print(f"validation failed: {message}", file=sys.stderr)
    if report_path:
        report_path.write_text(json.dumps(report, indent=1))
    write_message(STAGE, False, reason, message)
    return 1, report


def run_validate(cfg: TrainerConfig, report_path: Optional[Path] = None, publish: bool = True) -> tuple[int, dict[str, Any]]:
    from kubetune.trainer.modelio import base_model_dir, load_tokenizer, output_store

    try:
        tokenizer = load_tokenizer(base_model_dir(cfg))
    except (StorageError, OSError, ValueError) as e:
        return _fail("BaseModelUnreadable", f"baseModel.uri {cfg.base_model.uri}: {e}", report_path)
    try:
        data = prepare(cfg, tokenizer)
    except (DatasetError, StorageError, TemplateError) as e:
        return _fail("DatasetUnreadable", f"dataset.uri {cfg.dataset.uri}: {e}", report_path)
    report = build_report(cfg, data)
    if publish:
        artifacts.publish_json(output_store(cfg), artifacts.VALIDATION, report)
    text = json.dumps(report, indent=1)
    if report_path:
        report_path.write_text(text)
    else:
        print(text)
    print(summary(report), file=sys.stderr)
    first = "; ".join(
        f"row {e['row']}" + (f" {e['field']}" if e["field"] else "") + f": {e['message']}"
        for e in report["errors"][:5]
    )
    if data.ok:
        write_message(STAGE, True, "DatasetValid", f"{report['validRows']} rows valid", format=data.format,
                      rows=report["rows"], train=len(data.train), validation=len(data.validation))
        return 0, report
    reason = "InvalidRows" if data.errors else "EmptyDataset"
    message = f"{report['errorCount']} bad rows: {first}" if data.errors else "no rows left to train on"
    write_message(STAGE, False, reason, message, errorCount=report["errorCount"], errors=report["errors"][:20])
    return 1, report
