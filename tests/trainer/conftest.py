"""Fixtures of the trainer tests: a tiny model, the example dataset, an S3 bucket per test."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DATA = REPO / "examples" / "data" / "support.jsonl"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def s3_env(s3, monkeypatch):
    """Environment pointing boto3 (in this process and in subprocesses) at the test S3 server."""
    from kubetune.devcluster.s3server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_REGION", REGION)
    return s3


@pytest.fixture
def bucket(s3_env) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_env.client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def support_rows() -> list[dict]:
    return [json.loads(l) for l in EXAMPLE_DATA.read_text(encoding="utf-8").splitlines() if l.strip()]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, support_rows) -> Path:
    """A 2-layer, 64-hidden random Llama with a tokenizer trained on the example dataset."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kubetune.trainer.tinymodel import write_tiny_model

    texts = [m["content"] for r in support_rows for m in r["messages"]]
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"), texts, vocab_size=384)


@pytest.fixture
def upload(s3_env):
    """upload(local file or directory, s3 URI) -> the URI."""

    def put(local: Path, uri: str) -> str:
        bucket, _, key = uri[len("s3://"):].partition("/")
        local = Path(local)
        if local.is_dir():
            for f in sorted(local.iterdir()):
                s3_env.client.upload_file(str(f), bucket, f"{key.rstrip('/')}/{f.name}")
        else:
            s3_env.client.upload_file(str(local), bucket, key)
        return uri

    return put


@pytest.fixture
def train_config(tiny_model, bucket, upload, tmp_path, support_rows):
    """make(**overrides) -> a TrainerConfig on the test bucket (tiny model, a slice of the example data)."""
    from kubetune.trainer.config import parse_config

    def make(rows: int = 96, **sections) -> "object":
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in support_rows[:rows]), encoding="utf-8")
        cfg = {
            "baseModel": {"uri": upload(tiny_model, f"s3://{bucket}/models/tiny/"), "name": "tiny-llama"},
            "dataset": {"uri": upload(data, f"s3://{bucket}/data/train.jsonl"), "validationSplit": 0.15,
                        "maxLength": 128},
            "method": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "training": {"maxSteps": 12, "learningRate": 0.01, "batchSize": 4, "checkpointEvery": 4,
                         "warmupRatio": 0.0, "seed": 7},
            "output": {"uri": f"s3://{bucket}/out/"},
            "storage": {"cacheDir": str(tmp_path / "cache")},
        }
        for key, val in sections.items():
            cfg[key] = {**cfg.get(key, {}), **val}
        return parse_config(cfg)

    return make
