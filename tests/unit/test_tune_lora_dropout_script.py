"""bench/tune_lora_dropout.py in Triton's interpreter on a CPU, tiny sizes: the sweep runs every
kernel over its grid, checks each tile's output against the current tiles' and names a best one
(the timings mean nothing here; the GPU run is bench/tune_lora_dropout_h200.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_the_sweep_checks_every_tile_and_names_the_fastest(tmp_path):
    out = tmp_path / "tune.json"
    proc = subprocess.run([sys.executable, "tune_lora_dropout.py", "--quick", "--tokens", "16", "--json", str(out)],
                          cwd=BENCH, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert set(record["kernels"]) == {"forward", "input_grad", "a_grad"}
    for name, kernel in record["kernels"].items():
        rows = kernel["k4096"]["rows"]
        assert len(rows) > 4 and all("error" not in r for r in rows), name
        assert all(r["rel_err"] < 1e-2 for r in rows), name  # every tile computes the same thing
        best = kernel["k4096"]["best"]
        assert best["ms"] == min(r["ms"] for r in rows), name
        # the wider input re-times the winner beside the current tiles
        assert kernel["k14336"]["best"]["tiles"] in (best["tiles"], kernel["k4096"]["current"]["tiles"]), name


def test_the_rounds_probe_times_each_kernel_at_each_count_and_the_plain_product(tmp_path):
    out = tmp_path / "rounds.json"
    proc = subprocess.run([sys.executable, "tune_lora_dropout.py", "--tokens", "16", "--rounds", "10,0", "--json", str(out)],
                          cwd=BENCH, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["shape"]["M"] == 16 and set(record["rounds"]) == {"forward", "input_grad", "a_grad"}
    for name, row in record["rounds"].items():
        assert set(row) == {"rounds10_ms", "rounds0_ms", "plain_ms", "bytes"}, name
        assert all(row[k] > 0 for k in ("rounds10_ms", "rounds0_ms", "plain_ms")), name
