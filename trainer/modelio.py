"""Where the base model comes from and how stages open it and the output store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from kubetune.trainer.config import TrainerConfig
from kubetune.trainer.storage import Store, fetch, open_store


def base_model_dir(cfg: TrainerConfig) -> Path:
    return fetch(cfg.base_model.uri, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region,
                 cache_dir=cfg.storage.cache_dir, max_concurrency=cfg.storage.max_concurrency)


def output_store(cfg: TrainerConfig) -> Store:
    return open_store(cfg.output.uri, cfg.storage.endpoint_url, cfg.storage.region, cfg.storage.max_concurrency)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def fetch_adapter(cfg: TrainerConfig, store: Store, dest: Path, stage: str) -> Optional[str]:
    """Fetches the manifested adapter into `dest` for a stage that needs one.

    Returns None on success, or the error (already written to stderr and the
    termination message) when no complete adapter exists yet.
    """
    import sys

    from kubetune.trainer import artifacts
    from kubetune.trainer.termination import write_message

    try:
        artifacts.fetch_dir(store, artifacts.ADAPTER, dest)
    except FileNotFoundError:
        msg = f"no complete adapter under {cfg.output.uri} (run train first)"
        write_message(stage, False, "AdapterMissing", msg)
        print(msg, file=sys.stderr)
        return msg
    return None
