"""The dataset as every stage sees it: fetched, checked, tokenized, split the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.trainer.config import TrainerConfig
from kubetune.trainer.dataformats import RowError, parse_file, row_ranges
from kubetune.trainer.storage import fetch
from kubetune.trainer.tokenization import (OVERRIDE_TEMPLATE, TOKENIZER_TEMPLATE, Encoded, encode_all,
                                           install_chat_template, split_rows)


@dataclass
class PreparedData:
    format: str
    total_rows: int
    train: list[Encoded]
    validation: list[Encoded]
    errors: list[RowError]
    token_stats: dict[str, Any] = field(default_factory=dict)
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (row, first row with the same content)
    duplicate_policy: str = "warn"
    mixed_formats: dict[str, list[int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.train)

    @property
    def bad_rows(self) -> int:
        """Rows with at least one error; a row missing two fields is one bad row with two errors."""
        return len({e.row for e in self.errors})

    def problem(self) -> str:
        """One line saying why the data cannot train (empty when it can)."""
        if self.ok:
            return ""
        if not self.errors:
            return "no rows left to train on"
        n, bad = len(self.errors), self.bad_rows
        counted = f"{bad} bad row{'s' if bad != 1 else ''}" + (f" ({n} errors)" if n != bad else "")
        return f"{counted}: " + "; ".join(str(e) for e in self.errors[:5])

    def mixed_formats_line(self) -> str:
        if not self.mixed_formats:
            return ""
        parts = [f"{fmt} in rows {row_ranges(rows)}" for fmt, rows in self.mixed_formats.items()]
        return f"the file mixes formats: {'; '.join(parts)} (format {self.format} taken)"

    def duplicates_line(self) -> str:
        if not self.duplicates:
            return ""
        kept = {"warn": "kept", "drop": "dropped", "error": "reported as bad rows"}[self.duplicate_policy]
        pairs = ", ".join(f"row {r} = row {first}" for r, first in self.duplicates[:5])
        more = f" and {len(self.duplicates) - 5} more" if len(self.duplicates) > 5 else ""
        n = len(self.duplicates)
        return (f"{n} row{'s' if n != 1 else ''} repeat{'s' if n == 1 else ''} an earlier row exactly ({kept}, dataset.duplicates: "
                f"{self.duplicate_policy}): {pairs}{more}")


def dataset_path(cfg: TrainerConfig) -> Path:
    return fetch(cfg.dataset.uri, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region,
                 cache_dir=cfg.storage.cache_dir, max_concurrency=cfg.storage.max_concurrency)


def prepare(cfg: TrainerConfig, tokenizer, path: Path | None = None) -> PreparedData:
    """Parse, tokenize and split the dataset.

    Also installs dataset.chatTemplate on `tokenizer` (when set), so that the tokenizer the train
    stage saves with the adapter and the one evaluate generates with render the template the rows
    were trained on."""
    install_chat_template(tokenizer, cfg.dataset.chat_template)
    parsed = parse_file(path or dataset_path(cfg), cfg.dataset.format, cfg.dataset.duplicates)
    encoded, enc_errors, stats = encode_all(
        tokenizer, parsed.examples, max_length=cfg.dataset.max_length,
        over_length=cfg.dataset.over_length, completion_only=cfg.training.completion_only_loss,
        template_origin=OVERRIDE_TEMPLATE if cfg.dataset.chat_template else TOKENIZER_TEMPLATE,
    )
    errors = sorted(parsed.errors + enc_errors, key=lambda e: e.row)
    train, validation = split_rows(encoded, cfg.dataset.validation_split, cfg.training.seed)
    return PreparedData(parsed.format, parsed.total_rows, train, validation, errors, stats,
                        parsed.duplicates, parsed.duplicate_policy, parsed.mixed_formats)


def to_hf_dataset(rows: list[Encoded]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]})
