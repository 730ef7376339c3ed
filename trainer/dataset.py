"""The dataset as every stage sees it: fetched, checked, tokenized, split the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.trainer.config import TrainerConfig
from kubetune.trainer.dataformats import RowError, parse_file
from kubetune.trainer.storage import fetch
from kubetune.trainer.tokenization import Encoded, encode_all, split_indices


@dataclass
class PreparedData:
    format: str
    total_rows: int
    train: list[Encoded]
    validation: list[Encoded]
    errors: list[RowError]
    token_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.train)


def dataset_path(cfg: TrainerConfig) -> Path:
    return fetch(cfg.dataset.uri, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region,
                 cache_dir=cfg.storage.cache_dir, max_concurrency=cfg.storage.max_concurrency)


def prepare(cfg: TrainerConfig, tokenizer, path: Path | None = None) -> PreparedData:
    parsed = parse_file(path or dataset_path(cfg), cfg.dataset.format)
    encoded, enc_errors, stats = encode_all(
        tokenizer, parsed.examples, max_length=cfg.dataset.max_length,
        over_length=cfg.dataset.over_length, completion_only=cfg.training.completion_only_loss,
    )
    errors = sorted(parsed.errors + enc_errors, key=lambda e: e.row)
    train_idx, val_idx = split_indices(len(encoded), cfg.dataset.validation_split, cfg.training.seed)
    return PreparedData(parsed.format, parsed.total_rows, [encoded[i] for i in train_idx],
                        [encoded[i] for i in val_idx], errors, stats)


def to_hf_dataset(rows: list[Encoded]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]})
