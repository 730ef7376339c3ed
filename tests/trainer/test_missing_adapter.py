"""Merge and evaluate before any adapter exists: a clear error, not a traceback."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.trainer


def test_merge_and_evaluate_without_adapter_report_adapter_missing(train_config, tmp_path, monkeypatch, capsys):
    from kubetune.trainer.evaluate import run_evaluate
    from kubetune.trainer.merge import run_merge

    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
    cfg = train_config()

    assert run_merge(cfg) == 1
    msg = json.loads(log.read_text())
    assert (msg["stage"], msg["ok"], msg["reason"]) == ("merge", False, "AdapterMissing")
    assert cfg.output.uri in msg["message"] and "run train first" in msg["message"]

    code, report = run_evaluate(cfg)
    assert code == 1 and report["ok"] is False
    msg = json.loads(log.read_text())
    assert (msg["stage"], msg["reason"]) == ("evaluate", "AdapterMissing")
    assert "no complete adapter" in capsys.readouterr().err
