"""FineTuneJob -> TrainerConfig."""

from kubetune.operator.render import trainer_config_for
from kubetune.trainer.config import load_config

from .jobs import job


def test_every_section_reaches_the_trainer_config():
    cfg = trainer_config_for(
        job(
            method={"type": "lora", "r": 8, "targetModules": ["q_proj", "v_proj"]},
            training={"maxSteps": 50, "batchSize": 4, "learningRate": 1e-4, "fp8": "off"},
            resources={"strategy": "deepspeed-zero3", "nodes": 2, "gpusPerNode": 4},
            output={"uri": "s3://art/run/", "merge": False},
            serving={"enabled": False},
            evaluation={"prompts": ["Hi"], "minImprovement": 0.05},
            storage={"endpointUrl": "http://minio:9000", "region": "eu-west-1"},
        )
    )
    assert cfg.method.type == "lora" and cfg.method.r == 8
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
    assert cfg.training.max_steps == 50 and cfg.training.batch_size == 4
    assert cfg.training.strategy == "deepspeed-zero3"
    assert cfg.training.fp8 == "off"
    assert cfg.merge.enabled is False
    assert cfg.evaluation.prompts == ["Hi"] and cfg.evaluation.min_improvement == 0.05
    assert cfg.storage.endpoint_url == "http://minio:9000" and cfg.storage.region == "eu-west-1"
    assert cfg.job.name == "support-bot" and cfg.job.namespace == "tenant-a"


def test_all_linear_and_namespace_override(tmp_path):
    cfg = trainer_config_for(job(), namespace="other")
    assert cfg.method.target_modules == "all-linear"
    assert cfg.training.fp8 == "auto"  # the default travels too: the trainer decides per GPU
    assert cfg.job.namespace == "other"
    path = tmp_path / "trainer.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
