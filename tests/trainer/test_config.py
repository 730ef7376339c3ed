"""TrainerConfig: camelCase aliases, defaults, and errors that name the field."""

import json

import pytest

from kubetune.trainer.config import ConfigError, TrainerConfig, load_config, parse_config

MINIMAL = {
    "baseModel": {"uri": "s3://models/tiny-llama/"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "output": {"uri": "s3://artifacts/job/"},
}


def test_minimal_config_gets_defaults():
    cfg = parse_config(MINIMAL)
    assert cfg.dataset.format == "auto"
    assert cfg.method.type == "qlora"  # the API's default: one definition (kubetune.contract.recipe)
    assert cfg.training.gradient_checkpointing is True
    assert cfg.training.batch_size == "auto"
    assert cfg.base_model.served_name == "tiny-llama"


def test_round_trip_through_yaml(tmp_path):
    data = {**MINIMAL, "training": {"batchSize": 4, "maxSteps": 10, "checkpointEvery": 5}}
    cfg = parse_config(data)
    path = tmp_path / "train.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg
    assert again.training.batch_size == 4
    assert "checkpointEvery" in again.to_dict()["training"]


def test_json_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(MINIMAL))
    assert load_config(path).output.uri == "s3://artifacts/job/"


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"dataset": {"uri": "x", "validationSplit": 1.5}}, "dataset.validationSplit"),
        ({"dataset": {"uri": "x", "format": "csvish"}}, "dataset.format"),
        ({"dataset": {"uri": "x", "overLength": "ignore"}}, "dataset.overLength"),
        ({"method": {"type": "full"}}, "method.type"),
        ({"method": {"r": 0}}, "method.r"),
        ({"method": {"targetModules": []}}, "method.targetModules"),
        ({"method": {"quantization": {"bits": 3}}}, "method.quantization.bits"),
        ({"training": {"batchSize": 0}}, "training.batchSize"),
        ({"training": {"batchSize": "big"}}, "training.batchSize"),
        ({"training": {"learningRate": -1}}, "training.learningRate"),
        ({"training": {"checkpointEvery": 0}}, "training.checkpointEvery"),
        ({"training": {"epochz": 3}}, "training.epochz"),
        ({"evaluation": {"minImprovement": 2}}, "evaluation.minImprovement"),
    ],
)
def test_bad_field_is_named(patch, field):
    with pytest.raises(ConfigError) as exc:
        parse_config({**MINIMAL, **patch}, source="t.yaml")
    assert field in str(exc.value)


def test_missing_required_section_is_named():
    data = dict(MINIMAL)
    del data["output"]
    with pytest.raises(ConfigError, match="output"):
        parse_config(data)


def test_8bit_qlora_with_zero3_rejected_4bit_accepted():
    with pytest.raises(ConfigError, match="quantization.bits: 8"):
        parse_config({**MINIMAL, "method": {"type": "qlora", "quantization": {"bits": 8}},
                      "launch": {"strategy": "deepspeed-zero3"}})
    cfg = parse_config({**MINIMAL, "method": {"type": "qlora"}, "launch": {"strategy": "deepspeed-zero3"}})
    assert cfg.method.quantization.bits == 4 and cfg.launch.strategy == "deepspeed-zero3"


def test_unparseable_file_is_clear(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("baseModel: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_snake_case_names_accepted_for_python_callers():
    cfg = TrainerConfig(
        base_model={"uri": "/m"}, dataset={"uri": "/d.jsonl", "max_length": 64}, output={"uri": "/o"}
    )
    assert cfg.dataset.max_length == 64


@pytest.mark.parametrize("stage", ["validate", "train", "merge", "evaluate"])
def test_cli_rejects_bad_config_naming_the_field(tmp_path, stage):
    import subprocess
    import sys

    path = tmp_path / "train.json"
    path.write_text(json.dumps({**MINIMAL, "training": {"batchSize": -2}}))
    proc = subprocess.run([sys.executable, "-m", "kubetune", stage, "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "training.batchSize" in proc.stderr and "Traceback" not in proc.stderr


def test_shipped_examples_are_valid():
    from pathlib import Path

    from kubetune.localrun import load_job
    from kubetune.operator.render import trainer_config_for

    examples = Path(__file__).resolve().parents[2] / "examples"
    cfg = load_config(examples / "trainer-config.yaml")
    assert cfg.method.type == "lora" and cfg.base_model.served_name == "tiny-llama"
    rendered = trainer_config_for(load_job(examples / "finetunejob.yaml"))
    assert rendered.base_model.served_name == "tiny-llama"
    assert rendered.dataset.uri.startswith("s3://") and rendered.evaluation.min_improvement == 0.2
    assert rendered.job.name == "support-bot" and rendered.job.namespace == "team-a"
