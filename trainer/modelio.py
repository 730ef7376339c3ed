"""Where the base model comes from and how stages open it and the output store.

Base models are read from s3:// (or a local directory for a local run) only.
A Hugging Face id (`org/name`) is refused with a message naming baseModel.uri
instead of being downloaded: a pod that pulls from the Hub at every stage would
need a token, egress and a mirror setting, and could train and serve two
different snapshots. The way in is to copy the snapshot to the bucket once.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from kubetune.trainer.config import TrainerConfig
from kubetune.trainer.storage import Store, fetch, is_s3, open_store

# What the API accepts as a Hugging Face id (org/name).
HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class ModelSourceError(ValueError):
    """baseModel names something the trainer cannot load; the message says which field and what to do."""


def check_model_source(cfg: TrainerConfig) -> None:
    """Refuse Hugging Face ids and a revision (which only a Hub download could honour)."""
    b = cfg.base_model
    if not is_s3(b.uri) and not Path(b.uri).exists() and HF_ID.fullmatch(b.uri.rstrip("/")):
        rev = f" --revision {b.revision}" if b.revision else ""
        raise ModelSourceError(
            f"baseModel.uri {b.uri!r} is a Hugging Face id, and kubetune reads base models from s3:// only "
            f"(a local directory for a local run): copy the snapshot once (huggingface-cli download {b.uri}{rev} "
            "--local-dir DIR, then upload DIR to s3://BUCKET/PREFIX/) and set baseModel.uri to that prefix"
        )
    if b.revision:
        raise ModelSourceError(
            f"baseModel.revision {b.revision!r} applies to Hugging Face ids, which kubetune does not download; "
            f"the files under baseModel.uri {b.uri} are the version trained; remove baseModel.revision"
        )


def base_model_dir(cfg: TrainerConfig) -> Path:
    check_model_source(cfg)
    path = fetch(cfg.base_model.uri, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region,
                 cache_dir=cfg.storage.cache_dir, max_concurrency=cfg.storage.max_concurrency)
    if not (Path(path) / "config.json").is_file():
        raise ModelSourceError(f"baseModel.uri {cfg.base_model.uri} holds no config.json: "
                               "not a Hugging Face model directory (save_pretrained's layout)")
    return path


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
