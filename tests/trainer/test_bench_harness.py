"""The GPU benchmark harness itself, on a CPU with a tiny model: it must still run the
trainer's real code path, under the operator's own launch line, and record what the
results file promises (the GPU figures come from the same code)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

BENCH = Path(__file__).resolve().parents[2] / "bench" / "run.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_harness_runs_two_processes_under_the_operator_launch_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--cases", "cpu-smoke", "--steps", "5", "--warmup", "1", "--rows", "200",
         "--model-dir", str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--out", str(out),
         "--launch", "accelerate", "--gpus", "2", "--strategy", "ddp", "--port", str(_free_port()),
         "--profile-step", "3", "--logs", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    case = record["results"][0]
    assert case["case"] == "cpu-smoke" and not case.get("failed")
    assert case["world_size"] == 2 and case["strategy"] == "ddp"
    assert "--num_processes 2" in case["launch"] and "--multi_gpu" in case["launch"] and "127.0.0.1" in case["launch"]
    assert len(case["peak_gib_train_per_rank"]) == 2 and len(case["tokens_per_s_per_rank"]) == 2
    # the profiled step is left out of the median
    assert case["steps"] == 5 and case["steady_steps"] == 3 and case["tokens_per_s"] > 0
    assert case["profile"]["step"] == 3 and case["profile"]["wall_s"] > 0
    table = (tmp_path / "logs" / "profile_cpu-smoke.txt").read_text()
    assert "BY INPUT SHAPE" in table and "aten::mm" in table
    assert (tmp_path / "logs" / "profile_cpu-smoke.trace.json.gz").stat().st_size > 0
    assert sorted(case["loss"], key=int) == ["1", "2", "3", "4", "5"]
    assert all(v > 0 for v in case["loss"].values())
    assert case["config"]["launch"]["strategy"] == "ddp"
    assert (tmp_path / "logs" / "cpu-smoke.log").is_file()


def test_loss_check_pairs_each_variant_with_its_case():
    sys.path.insert(0, str(BENCH.parent))
    from run import loss_checks

    results = [
        {"case": "qlora-instruct", "loss": {"1": 2.0, "2": 1.5, "3": 1.0}},
        {"case": "qlora-instruct@plain", "loss": {"1": 2.0, "2": 1.6, "3": 1.0}},
        {"case": "qlora-instruct@compile", "loss": {"2": 1.5, "3": 1.25}},
        {"case": "lora-instruct@plain", "loss": {"1": 9.0}},  # no base case ran: nothing to compare
        {"case": "qlora-long@plain", "failed": True},
    ]
    out = loss_checks(results)
    assert set(out) == {"qlora-instruct@plain", "qlora-instruct@compile"}
    assert out["qlora-instruct@plain"]["steps"] == 3 and out["qlora-instruct@plain"]["max_abs_diff"] == 0.1
    assert out["qlora-instruct@compile"] == {"steps": 2, "max_abs_diff": 0.25, "max_rel_diff": 0.2,
                                             "first": [1.5, 1.5], "last": [1.0, 1.25]}
