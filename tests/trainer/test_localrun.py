"""`kubetune run` on the shipped example: the same FineTuneJob YAML, the whole pipeline, locally."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.trainer import artifacts

pytestmark = pytest.mark.trainer

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "finetunejob.yaml"
DATA = REPO / "examples" / "data" / "support.jsonl"


def test_example_runs_end_to_end_with_embedded_s3(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # no endpoint: the embedded one is used
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune", "run", str(EXAMPLE), "--dataset-file", str(DATA), "--tiny-model",
         "--workdir", str(tmp_path), "--max-steps", "30"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    stages = [line for line in out.splitlines() if line.startswith("== ") and ": ok in " in line]
    assert [s.split(":")[0] for s in stages] == ["== validate", "== train", "== merge", "== evaluate"]
    assert "embedded S3 at http://127.0.0.1:" in out
    assert "step 30/30" in out  # progress lines (not a terminal here, so no bar)

    output = tmp_path / "output"
    assert f"adapter:     {output}/adapter/" in out
    for prefix in (artifacts.ADAPTER, artifacts.MERGED, artifacts.VALIDATION, artifacts.EVALUATION):
        manifest = json.loads((output / prefix / artifacts.MANIFEST).read_text())
        for name, entry in manifest["files"].items():
            assert artifacts.sha256_file(output / prefix / name) == entry["sha256"], f"{prefix}/{name}"
    validation = json.loads((output / artifacts.VALIDATION_REPORT).read_text())
    assert validation["ok"] and validation["format"] == "messages" and validation["rows"] == 307
    evaluation = json.loads((output / artifacts.EVALUATION_REPORT).read_text())
    assert evaluation["passed"] is True and evaluation["improvement"] >= 0.2  # the example's minImprovement
    assert len(evaluation["generations"]) == 3
    adapter_config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "tiny-llama"
    assert "gate passed" in out


def test_local_storage_maps_s3_uris_to_directories(tmp_path):
    from kubetune.localrun import local_path_for

    assert local_path_for("s3://bucket/a/b.jsonl", tmp_path) == f"{tmp_path}/bucket/a/b.jsonl"
    assert local_path_for("s3://bucket/prefix/", tmp_path) == f"{tmp_path}/bucket/prefix/"


def test_bad_job_file_is_a_clear_error(tmp_path):
    from kubetune.localrun import RunError, load_job

    bad = tmp_path / "job.yaml"
    bad.write_text("apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\n"
                   "spec: {baseModel: {uri: s3://m/x/}, dataset: {uri: s3://d/x.jsonl, validationSplit: 3},"
                   " output: {uri: s3://o/x/}}\n")
    with pytest.raises(RunError, match="validationSplit"):
        load_job(bad)
    other = tmp_path / "cm.yaml"
    other.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(RunError, match="exactly one FineTuneJob"):
        load_job(other)


def test_example_runs_with_local_directories(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune", "run", str(EXAMPLE), "--dataset-file", str(DATA), "--tiny-model",
         "--workdir", str(tmp_path), "--max-steps", "4", "--storage", "local"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "embedded S3" not in proc.stdout
    # Each recipe revision has its own prefix under output.uri (artifacts/support-bot/revisions/<revision>/).
    job_root = tmp_path / "s3" / "kubetune-examples" / "artifacts" / "support-bot"
    adapter_line = re.search(r"^  adapter: +(\S+)/adapter/", proc.stdout, re.M)
    assert adapter_line, proc.stdout[-2000:]
    out = Path(adapter_line.group(1))
    assert out.parent == job_root / "revisions"
    for prefix in (artifacts.ADAPTER, artifacts.MERGED, artifacts.VALIDATION, artifacts.EVALUATION):
        assert (out / prefix / artifacts.MANIFEST).is_file(), prefix
    assert (tmp_path / "s3" / "kubetune-examples" / "data" / "support.jsonl").read_bytes() == DATA.read_bytes()
