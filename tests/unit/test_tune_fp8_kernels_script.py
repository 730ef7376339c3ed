"""bench/tune_fp8_kernels.py in Triton's interpreter on a CPU, small shapes: the sweep runs the
NF4 cast and both SwiGLU row kernels over their grids, checks every variant against the current
one bit for bit and names a best one (the timings mean nothing here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_the_sweep_checks_every_variant_and_names_the_fastest(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "tune.json"
    proc = subprocess.run([sys.executable, "tune_fp8_kernels.py", "--quick", "--json", str(out)],
                          cwd=BENCH, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads(out.read_text())
    for name, current in (("swiglu_rows", 8), ("swiglu_backward_rows", 32)):
        kernel = record["swiglu"][name]
        rows = kernel["rows"]
        # the current warps and the quick grid's, each giving the current bits
        assert [r["how"] for r in rows] == [current] + [w for w in (16, 32) if w != current], name
        assert all("error" not in r for r in rows), (name, rows)
        assert kernel["best"]["ms"] == min(r["ms"] for r in rows), name
    for layout in ("forward", "transposed"):
        sweep = record["nf4"][layout]
        rows = sweep["rows"]
        assert len(rows) == 4 and all("error" not in r for r in rows), (layout, rows)  # the quick grid, 2 x 2
        assert all(set(r["ms"]) == {"q_o", "k_v", "gate_up", "down"} for r in rows), layout
        assert sweep["best"]["layer_ms"] == min(r["layer_ms"] for r in rows), layout
