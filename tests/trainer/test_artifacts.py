"""Manifested artifacts on a real S3 server: atomic from a reader's view, checksummed, resumable downloads."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kubetune.trainer import artifacts
from kubetune.trainer.storage import LocalStore, S3Store, fetch, s3_client


def _ckpt_dir(root: Path, step: int, files: int = 4, size: int = 1000) -> Path:
    d = root / f"ckpt-{step}"
    (d / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (d / ("sub" if i % 2 else "") / f"f{i}.bin").write_bytes(bytes([step % 256, i]) * size)
    return d


@pytest.fixture
def store(bucket, s3_env):
    return S3Store(f"s3://{bucket}/job", s3_client(s3_env.endpoint_url))


def test_publish_and_fetch_round_trip(store, tmp_path):
    src = _ckpt_dir(tmp_path, 4)
    manifest = artifacts.publish_dir(store, src, artifacts.checkpoint_prefix(4), meta={"step": 4})
    assert set(manifest["files"]) == {"f0.bin", "sub/f1.bin", "f2.bin", "sub/f3.bin"}
    assert artifacts.complete_checkpoints(store) == [4]
    got = tmp_path / "got"
    artifacts.fetch_dir(store, artifacts.checkpoint_prefix(4), got)
    for name in manifest["files"]:
        assert (got / name).read_bytes() == (src / name).read_bytes()


def test_interrupted_upload_is_invisible(store, tmp_path, s3_env, bucket):
    """A writer SIGKILLed mid-upload leaves files but no manifest: readers keep seeing the previous checkpoint."""
    artifacts.publish_dir(store, _ckpt_dir(tmp_path, 4), artifacts.checkpoint_prefix(4))
    src = _ckpt_dir(tmp_path, 8, files=6)
    script = textwrap.dedent(f"""
        import sys, time
        from kubetune.trainer import artifacts
        from kubetune.trainer.storage import S3Store, s3_client
        store = S3Store("s3://{bucket}/job", s3_client("{s3_env.endpoint_url}"))
        def slow(name):
            print("uploaded", name, flush=True)
            time.sleep(30)  # killed here, after the first file
        artifacts.publish_dir(store, sys.argv[1], artifacts.checkpoint_prefix(8), on_file=slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(src)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("uploaded")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    keys = [o.key for o in store.list(artifacts.checkpoint_prefix(8))]
    assert keys and artifacts.MANIFEST not in [k.rsplit("/", 1)[-1] for k in keys]  # a torn upload is there...
    assert artifacts.complete_checkpoints(store) == [4]  # ...but nobody trusts it
    assert artifacts.latest_checkpoint(store) == 4
    with pytest.raises(FileNotFoundError, match="not a complete artifact"):
        artifacts.fetch_dir(store, artifacts.checkpoint_prefix(8), tmp_path / "x")


def test_republish_interrupted_never_mixes_versions(store, tmp_path):
    """Re-publishing drops the old manifest first: during and after a failed re-upload the prefix reads as absent."""
    v1 = _ckpt_dir(tmp_path / "v1", 1)
    artifacts.publish_dir(store, v1, artifacts.ADAPTER)
    v2 = _ckpt_dir(tmp_path / "v2", 2)

    def crash(name):
        raise ConnectionError("network gone")

    with pytest.raises(ConnectionError):
        artifacts.publish_dir(store, v2, artifacts.ADAPTER, on_file=crash)
    assert artifacts.read_manifest(store, artifacts.ADAPTER) is None
    with pytest.raises(FileNotFoundError):
        artifacts.fetch_dir(store, artifacts.ADAPTER, tmp_path / "r")
    artifacts.publish_dir(store, v2, artifacts.ADAPTER)
    got = tmp_path / "r2"
    artifacts.fetch_dir(store, artifacts.ADAPTER, got)
    assert (got / "f0.bin").read_bytes() == (v2 / "f0.bin").read_bytes()


def test_corrupted_file_is_detected(store, tmp_path):
    artifacts.publish_dir(store, _ckpt_dir(tmp_path, 3), artifacts.checkpoint_prefix(3))
    store.put_bytes(b"tampered", f"{artifacts.checkpoint_prefix(3)}/f0.bin")
    with pytest.raises(artifacts.IntegrityError, match="f0.bin"):
        artifacts.fetch_dir(store, artifacts.checkpoint_prefix(3), tmp_path / "x")


def test_json_artifact_and_prune(tmp_path):
    store = LocalStore(tmp_path / "out")
    assert artifacts.read_json(store, artifacts.VALIDATION) is None
    artifacts.publish_json(store, artifacts.VALIDATION, {"ok": True})
    assert artifacts.read_json(store, artifacts.VALIDATION) == {"ok": True}
    for step in (2, 4, 6, 8):
        artifacts.publish_dir(store, _ckpt_dir(tmp_path, step, files=1), artifacts.checkpoint_prefix(step))
    assert artifacts.prune_checkpoints(store, keep=2) == [2, 4]
    assert artifacts.complete_checkpoints(store) == [6, 8]
    assert not list((tmp_path / "out" / artifacts.checkpoint_prefix(2)).rglob("*.bin"))


def test_fetch_caches_by_etag_and_resumes(s3_env, bucket, tmp_path):
    client = s3_env.client
    for i in range(5):
        client.put_object(Bucket=bucket, Key=f"model/shard-{i}.bin", Body=bytes([i]) * 4096)
    cache = str(tmp_path / "cache")
    first = fetch(f"s3://{bucket}/model/", cache_dir=cache)
    assert sorted(p.name for p in first.glob("shard-*")) == [f"shard-{i}.bin" for i in range(5)]
    assert fetch(f"s3://{bucket}/model/", cache_dir=cache) == first  # same ETags: cache hit

    # An interrupted download: the completion marker and one file are missing. Only that file comes again.
    (first / ".complete").unlink()
    (first / "shard-3.bin").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in first.glob("shard-*")}
    time.sleep(0.01)
    assert fetch(f"s3://{bucket}/model/", cache_dir=cache) == first
    after = {p.name: p.stat().st_mtime_ns for p in first.glob("shard-*")}
    assert (first / "shard-3.bin").read_bytes() == bytes([3]) * 4096
    assert all(after[n] == before[n] for n in before)

    # A changed object is a new version: a new cache entry, never stale content.
    client.put_object(Bucket=bucket, Key="model/shard-0.bin", Body=b"new")
    second = fetch(f"s3://{bucket}/model/", cache_dir=cache)
    assert second != first and (second / "shard-0.bin").read_bytes() == b"new"

    single = fetch(f"s3://{bucket}/model/shard-1.bin", cache_dir=cache)
    assert single.name == "shard-1.bin" and single.read_bytes() == bytes([1]) * 4096


def test_fetch_errors_name_the_uri(s3_env, bucket, tmp_path):
    from kubetune.trainer.storage import StorageError

    with pytest.raises(StorageError, match=f"nothing found at s3://{bucket}/nope"):
        fetch(f"s3://{bucket}/nope/", cache_dir=str(tmp_path))
    with pytest.raises(StorageError, match="does not exist"):
        fetch(str(tmp_path / "missing.jsonl"))


def test_large_download_resumes_from_its_last_range(s3_env, bucket, tmp_path, monkeypatch):
    import os

    from kubetune.trainer import storage

    monkeypatch.setattr(storage, "RANGE_BYTES", 64 * 1024)
    body = os.urandom(10 * 64 * 1024 + 123)  # 11 ranges, the last one short
    s3_env.client.put_object(Bucket=bucket, Key="model/big.safetensors", Body=body)
    cache = str(tmp_path / "cache")
    real = S3Store._get_range
    calls = []

    def dies_after_four(self, key, start, end, etag):
        if len(calls) == 4:
            raise ConnectionError("connection reset mid-download")
        calls.append(start)
        return real(self, key, start, end, etag)

    monkeypatch.setattr(S3Store, "_get_range", dies_after_four)
    with pytest.raises(ConnectionError):
        fetch(f"s3://{bucket}/model/", cache_dir=cache, max_concurrency=1)
    [part] = list(Path(cache).rglob(".big.safetensors.part"))
    assert not (part.parent / "big.safetensors").exists()  # nothing half-written under the real name

    calls.clear()
    monkeypatch.setattr(S3Store, "_get_range", lambda self, key, start, end, etag: calls.append(start) or real(self, key, start, end, etag))
    local = fetch(f"s3://{bucket}/model/", cache_dir=cache, max_concurrency=1)
    assert (local / "big.safetensors").read_bytes() == body
    assert sorted(calls) == [i * 64 * 1024 for i in range(4, 11)]  # only the 7 ranges not finished before
    assert not part.exists() and not list(local.glob(".big.safetensors*"))


def test_object_replaced_mid_download_fails_instead_of_mixing(s3_env, bucket, tmp_path, monkeypatch):
    import os

    from botocore.exceptions import ClientError

    from kubetune.trainer import storage

    monkeypatch.setattr(storage, "RANGE_BYTES", 64 * 1024)
    s3_env.client.put_object(Bucket=bucket, Key="m/w.bin", Body=os.urandom(3 * 64 * 1024))
    real = S3Store._get_range

    def replaced_after_first(self, key, start, end, etag):
        if start > 0:  # someone uploads a new version while we are downloading the old one
            s3_env.client.put_object(Bucket=bucket, Key="m/w.bin", Body=os.urandom(3 * 64 * 1024))
        return real(self, key, start, end, etag)

    monkeypatch.setattr(S3Store, "_get_range", replaced_after_first)
    with pytest.raises(ClientError, match="PreconditionFailed|412"):
        fetch(f"s3://{bucket}/m/", cache_dir=str(tmp_path / "cache"), max_concurrency=1)
    assert not list((tmp_path / "cache").rglob("w.bin"))


# ---------------------------------------------------------------- the run a checkpoint belongs to


def _cfg(**sections):
    from kubetune.trainer.config import parse_config

    cfg = {"baseModel": {"uri": "s3://b/models/m/", "name": "m"}, "dataset": {"uri": "s3://b/data.jsonl"},
           "method": {"type": "lora", "r": 16}, "training": {"maxSteps": 100}, "output": {"uri": "s3://b/out/"}}
    for key, val in sections.items():
        cfg[key] = {**cfg.get(key, {}), **val}
    return parse_config(cfg)


def test_run_record_holds_what_defines_the_run():
    fields = artifacts.run_fields(_cfg())
    assert fields["method.r"] == 16 and fields["method.quantization.bits"] == 4
    assert fields["dataset.uri"] == "s3://b/data.jsonl" and fields["baseModel.uri"] == "s3://b/models/m/"
    assert fields["training.learningRate"] == 2e-4 and fields["launch.strategy"] == "ddp"
    # Speed, memory, logging and bookkeeping do not change what the run learns.
    assert not [k for k in fields if k.startswith(("training.performance", "training.logEvery", "baseModel.name",
                                                   "training.keepCheckpoints", "training.checkpointEvery",
                                                   "training.evalEvery", "training.gradientCheckpointing",
                                                   "output.", "storage.", "evaluation.", "merge."))]
    same = _cfg(training={"maxSteps": 100, "logEvery": 5, "keepCheckpoints": 9, "performance": {"liger": "off"}},
                baseModel={"name": "other-name"}, evaluation={"prompts": ["hi"]})
    assert artifacts.run_record(same) == artifacts.run_record(_cfg())
    assert artifacts.run_record(_cfg(method={"r": 8}))["hash"] != artifacts.run_record(_cfg())["hash"]


def test_config_changes_name_each_changed_field():
    old = artifacts.run_fields(_cfg())
    new = artifacts.run_fields(_cfg(method={"r": 8}, dataset={"maxLength": 512}))
    assert artifacts.config_changes(old, new) == ["dataset.maxLength: 2048 -> 512", "method.r: 16 -> 8"]
    # A field one record lacks (a kubetune upgrade added or removed it) is no change of the run.
    assert artifacts.config_changes({**old, "method.gone": 1}, {**old, "method.added": 2}) == []


def test_checkpoint_of_another_run_is_refused(tmp_path):
    store = LocalStore(tmp_path / "out")
    artifacts.publish_dir(store, _ckpt_dir(tmp_path, 8), artifacts.checkpoint_prefix(8),
                          meta={"step": 8, "config": artifacts.run_record(_cfg())})
    assert artifacts.check_checkpoint_run(store, 8, _cfg(training={"maxSteps": 100, "logEvery": 3})) is None
    with pytest.raises(artifacts.CheckpointMismatch) as err:
        artifacts.check_checkpoint_run(store, 8, _cfg(method={"r": 8}))
    assert str(err.value).startswith(f"{store.uri}/checkpoints/step-00000008/ was trained under another config "
                                     "(method.r: 16 -> 8); resuming from it would mix two runs.")
    # Checkpoints written before checkpoints recorded their run resume unchecked, and say so.
    artifacts.publish_dir(store, _ckpt_dir(tmp_path, 9), artifacts.checkpoint_prefix(9), meta={"step": 9})
    assert "records no config" in artifacts.check_checkpoint_run(store, 9, _cfg(method={"r": 8}))
