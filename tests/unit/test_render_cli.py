"""`kubetune render job.yaml`: the API's checks and the children, without a cluster."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from kubetune.cli import app
from kubetune.operator.packaging import ROOT

EXAMPLE = ROOT / "examples" / "finetunejob.yaml"


def test_render_prints_every_stage_child_once():
    out = CliRunner().invoke(app, ["render", str(EXAMPLE)])
    assert out.exit_code == 0, out.output
    docs = list(yaml.safe_load_all(out.output))
    kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(kinds) == len(set(kinds))
    rev = next(d for d in docs if d["kind"] == "ConfigMap")["metadata"]["labels"]["kubetune.io/revision"]
    for child in [("ConfigMap", f"support-bot-config-{rev}"), ("Job", f"support-bot-validate-{rev}"),
                  ("Job", f"support-bot-train-{rev}"), ("Service", f"support-bot-train-{rev}"),
                  ("Job", f"support-bot-merge-{rev}"), ("Job", f"support-bot-evaluate-{rev}"),
                  ("Deployment", "support-bot-serve")]:
        assert child in kinds
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert yaml.safe_load(config["data"]["trainer.yaml"])["training"]["learningRate"] == 0.01


def test_render_refuses_what_no_stage_can_do(tmp_path):
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["serving"]["mode"] = "adapter"
    doc["spec"].setdefault("method", {})["useDora"] = True  # vLLM serves no DoRA adapter
    bad = tmp_path / "adapter.yaml"
    bad.write_text(yaml.safe_dump(doc))
    out = CliRunner().invoke(app, ["render", str(bad)])
    assert out.exit_code == 1
    assert "spec.method.useDora" in out.output


def test_render_one_stage(tmp_path):
    out = CliRunner().invoke(app, ["render", str(EXAMPLE), "--stage", "merge"])
    assert out.exit_code == 0, out.output
    jobs = [d["metadata"]["name"] for d in yaml.safe_load_all(out.output) if d["kind"] == "Job"]
    assert len(jobs) == 1 and jobs[0].startswith("support-bot-merge-")
