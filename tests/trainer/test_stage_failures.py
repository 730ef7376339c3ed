"""Expected failures of the stages end in one line and a termination message naming the setting at fault,
never a traceback; an unexpected one still leaves a termination message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.trainer


@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    """run_cli(stage, config dict) -> (exit code, output, termination message)."""
    from kubetune.cli import app

    term = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(term))

    def run(stage: str, cfg: dict):
        config = tmp_path / f"{stage}.json"
        config.write_text(json.dumps(cfg))
        result = CliRunner().invoke(app, [stage, "--config", str(config)])
        return result.exit_code, result.output, json.loads(term.read_text()) if term.exists() else None

    return run


def _cfg(tmp_path: Path, model: str, data: Path, **sections) -> dict:
    cfg = {"baseModel": {"uri": model}, "dataset": {"uri": str(data), "maxLength": 256},
           "method": {"type": "lora", "r": 4}, "training": {"maxSteps": 2, "batchSize": 2},
           "output": {"uri": str(tmp_path / "out")}, "storage": {"cacheDir": str(tmp_path / "cache")}}
    for key, val in sections.items():
        cfg[key] = {**cfg.get(key, {}), **val}
    return cfg


@pytest.fixture
def data(tmp_path, support_rows) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in support_rows[:8]))
    return path


@pytest.mark.parametrize("stage", ["validate", "train", "merge", "evaluate"])
def test_a_hugging_face_id_is_refused_naming_base_model_uri(stage, run_cli, tmp_path, data):
    code, out, msg = run_cli(stage, _cfg(tmp_path, "Qwen/Qwen3-0.6B", data, baseModel={"revision": "main"}))
    assert code == 1 and "Traceback" not in out
    assert msg["stage"] == stage and msg["ok"] is False and msg["reason"] == "BaseModelUnusable"
    assert msg["message"].startswith("baseModel.uri 'Qwen/Qwen3-0.6B' is a Hugging Face id, and kubetune reads "
                                     "base models from s3:// only")
    assert "huggingface-cli download Qwen/Qwen3-0.6B --revision main --local-dir DIR" in msg["message"]


def test_a_revision_is_refused_for_an_s3_model(run_cli, tmp_path, data, tiny_model):
    code, out, msg = run_cli("train", _cfg(tmp_path, str(tiny_model), data, baseModel={"revision": "v2"}))
    assert code == 1 and "Traceback" not in out and msg["reason"] == "BaseModelUnusable"
    assert msg["message"].startswith("baseModel.revision 'v2' applies to Hugging Face ids")


def test_a_serving_size_the_heads_cannot_split_over_fails_validation_before_training(run_cli, tmp_path, data,
                                                                                   tiny_model):
    heads = json.loads((Path(tiny_model) / "config.json").read_text())["num_attention_heads"]
    bad = next(tp for tp in (8, 4, 2) if heads % tp)  # a size vLLM could not shard this model over
    code, out, msg = run_cli("validate", _cfg(tmp_path, str(tiny_model), data, serve={"tensorParallelSize": bad}))
    assert code == 1 and "Traceback" not in out and msg["reason"] == "TensorParallelMismatch"
    assert msg["message"].startswith(f"serving.gpus {bad}: the model has {heads} attention heads")
    code, _, msg = run_cli("validate", _cfg(tmp_path, str(tiny_model), data, serve={"tensorParallelSize": 1}))
    assert code == 0 and msg["ok"] is True


def test_a_directory_that_is_not_a_model(run_cli, tmp_path, data):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    code, out, msg = run_cli("validate", _cfg(tmp_path, str(empty), data))
    assert code == 1 and "Traceback" not in out and msg["reason"] == "BaseModelUnusable"
    assert msg["message"] == f"baseModel.uri {empty} holds no config.json: not a Hugging Face model directory " \
                             "(save_pretrained's layout)"


def test_a_template_refusing_a_row_names_it_in_validate_and_train(run_cli, tmp_path, support_rows):
    """Gemma 2's template on rows with a system turn: no jinja traceback, the rows are named, train refuses."""
    from kubetune.trainer.tinymodel import write_tiny_model

    texts = [m["content"] for r in support_rows[:20] for m in r["messages"]]
    model = write_tiny_model(tmp_path / "gemma2", texts, family="gemma2", vocab_size=320)
    rows = [dict(messages=r["messages"][1:]) for r in support_rows[:6]] + [support_rows[6]]  # row 7 keeps its system turn
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, msg = run_cli("validate", _cfg(tmp_path, str(model), data))
    assert code == 1 and "Traceback" not in out and "jinja" not in out.lower()
    assert msg["reason"] == "InvalidRows" and msg["badRows"] == 1
    assert msg["message"] == ("1 bad row: row 7, field 'messages': the chat template cannot render this conversation: "
                              "System role not supported (this template has no system turn: drop the system turn "
                              "from the rows or set dataset.chatTemplate)")
    code, out, msg = run_cli("train", _cfg(tmp_path, str(model), data))
    assert code == 1 and "Traceback" not in out
    assert msg["reason"] == "TrainingRejected" and "1 bad row: row 7, field 'messages'" in msg["message"]


def test_a_template_that_cannot_mask_replies_fails_the_train_stage(run_cli, tmp_path, data, tiny_model):
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    code, out, msg = run_cli("train", _cfg(tmp_path, str(tiny_model), data, dataset={"chatTemplate": plain}))
    assert code == 1 and "Traceback" not in out
    assert msg["reason"] == "ChatTemplateUnusable"
    assert msg["message"].startswith("dataset.chatTemplate has no {% generation %} blocks")
    code, out, msg = run_cli("validate", _cfg(tmp_path, str(tiny_model), data, dataset={"chatTemplate": "no_such"}))
    assert code == 1 and msg["reason"] == "ChatTemplateUnusable" and "no template named 'no_such'" in msg["message"]


def test_an_unexpected_error_still_leaves_a_termination_message(run_cli, tmp_path, data, tiny_model, monkeypatch):
    import kubetune.trainer.train as train

    def broken(cfg):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(train, "run_train", broken)
    code, _, msg = run_cli("train", _cfg(tmp_path, str(tiny_model), data))
    assert code == 1
    assert msg["reason"] == "InternalError"
    assert msg["message"] == "ZeroDivisionError: division by zero second line (unexpected; the traceback is in the pod log)"


def test_bad_data_in_train_counts_rows(run_cli, tmp_path, tiny_model, support_rows):
    rows = support_rows[:6] + [{"instruction": "", "output": ""}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, msg = run_cli("train", _cfg(tmp_path, str(tiny_model), data))
    assert code == 1 and "Traceback" not in out
    assert msg["message"].startswith(f"dataset {data}: 1 bad row: row 7: follows the alpaca format")
