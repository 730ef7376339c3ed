"""bench/check_attention_families.py on a CPU, tiny sizes (the GPU run is bench/attention_families_h200.json).

On a CPU there is no varlen kernel: every family gets the library's attention, as the trainer gives it
there, and the script checks the library's packed masks against per-sample runs. The varlen branch (the
one the GPU takes) runs here with the per-sample stand-in kernel of test_packed_attention; a kernel that
lets samples attend across their boundaries must make the script fail.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kubetune.trainer import packed_attention as pa
from tests.unit.test_packed_attention import _per_sample_kernel

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "check_attention_families.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("check_attention_families", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def _use_kernel(monkeypatch, kernel):
    monkeypatch.setattr(pa, "_varlen_kernel", lambda: (kernel, frozenset(inspect.signature(kernel).parameters)))


def test_cpu_mode_two_families(tmp_path):
    out = tmp_path / "families.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--families", "llama,gemma2", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ATTENTION FAMILIES CHECK PASSED" in proc.stdout
    result = json.loads(out.read_text())
    assert result["ok"] and result["errors"] == [] and result["conditions"]["dtype"] == "float32"
    cases = {r["case"]: r for r in result["cases"]}
    assert set(cases) == {"llama", "gemma2"}  # the extra cases are variants of other families
    llama, gemma2 = cases["llama"], cases["gemma2"]
    # CPU: the library's attention; what a varlen-capable GPU would pick is reported beside it.
    assert (llama["implementation"], llama["auto_on_varlen_gpu"], llama["varlen_unfit"]) == ("sdpa", "varlen", None)
    assert (gemma2["implementation"], gemma2["auto_on_varlen_gpu"]) == ("eager", "eager")
    assert "soft-caps" in gemma2["varlen_unfit"]
    for r in (llama, gemma2):
        assert r["pass"] and r["controls_detected"]
        assert r["vs_fp32_exact"]["packed"] <= r["bound"] < r["controls_vs_fp32_exact"]["no_position_ids"]
        assert sum(r["sample_lengths"]) == result["conditions"]["row_tokens"]
        assert result["conditions"]["max_length"] in r["sample_lengths"]


def test_varlen_branch_with_the_cpu_stand_in(script, monkeypatch, tmp_path):
    _use_kernel(monkeypatch, _per_sample_kernel)
    out = tmp_path / "families.json"
    rc = script.main(["--tiny", "--families", "llama,mistral", "--json", str(out)], varlen_capable=True)
    result = json.loads(out.read_text())
    assert rc == 0 and result["ok"], result
    cases = {r["case"]: r for r in result["cases"]}
    assert cases["llama"]["implementation"] == pa.VARLEN_ATTENTION
    # A window narrower than maxLength: the library's sdpa; forced onto varlen, the guard refuses, and
    # without the guard the dropped window shows far above the bound.
    narrow = cases["mistral"]
    assert narrow["implementation"] == "sdpa" and narrow["varlen_guard"].startswith("kubetune varlen attention")
    assert narrow["controls_vs_fp32_exact"]["varlen_forced_guard_off"] > 10 * narrow["bound"]
    # A window as wide as maxLength masks nothing: varlen, and equal logits.
    assert cases["mistral/window=maxLength"]["implementation"] == pa.VARLEN_ATTENTION
    assert cases["mistral/window=maxLength"]["pass"]


def _leaky_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    """A wrong varlen kernel: causal over the whole row, ignoring the sample boundaries."""
    qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1)


def test_a_kernel_that_crosses_samples_fails(script, monkeypatch, tmp_path):
    _use_kernel(monkeypatch, _leaky_kernel)
    out = tmp_path / "families.json"
    rc = script.main(["--tiny", "--families", "llama", "--no-extra", "--json", str(out)], varlen_capable=True)
    result = json.loads(out.read_text())
    assert rc == 1 and not result["ok"]
    (llama,) = result["cases"]
    assert llama["implementation"] == pa.VARLEN_ATTENTION and not llama["pass"]
    assert llama["vs_fp32_exact"]["packed"] > 10 * llama["bound"]
    assert torch.isfinite(torch.tensor(llama["per_sample_rel"])).all()
