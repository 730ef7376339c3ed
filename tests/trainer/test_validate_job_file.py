"""`kubetune validate job.yaml`: a FineTuneJob file checked without a cluster, and its data with --data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "finetunejob.yaml"


def kubetune(*args: str, env_extra=None, cwd=None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "kubetune", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def test_a_valid_job_file_prints_its_pipeline_and_revision():
    out = kubetune("validate", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    assert "validate -> train -> merge -> evaluate -> serve" in out.stdout and "revision " in out.stdout


def test_a_bad_job_file_names_the_field_in_one_line_per_problem(tmp_path):
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["serving"]["mode"] = "adapter"
    doc["spec"]["dataset"]["uri"] = "s3://ab/data.jsonl"  # a 2-character bucket
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    out = kubetune("validate", str(bad))
    assert out.returncode == 2
    assert "spec.dataset.uri" in out.stderr and "3-63 lowercase letters" in out.stderr
    assert "Traceback" not in out.stderr


def test_data_validation_of_a_job_file_with_local_inputs(tmp_path, tiny_model):
    data = ROOT / "examples" / "data" / "support.jsonl"
    out = kubetune("validate", str(EXAMPLE), "--data", "--dataset-file", str(data), "--model-dir", str(tiny_model),
                   env_extra={"KUBETUNE_TERMINATION_LOG": str(tmp_path / "tl"), "KUBETUNE_CACHE_DIR": str(tmp_path / "c")})
    assert out.returncode == 0, out.stderr
    summary = out.stderr  # the report (JSON) goes to stdout, the one-line summary to stderr
    assert "bad rows=0" in summary and "format=messages" in summary
    assert '"policy": "warn"' in out.stdout
