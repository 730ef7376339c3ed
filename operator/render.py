"""FineTuneJob -> TrainerConfig: the one translation of the user's spec into the
trainer's config file (rendered to YAML into the `<job>-config` ConfigMap, and
used directly by `kubetune run`)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from kubetune.trainer.config import TrainerConfig

from .api import FineTuneJob

# Mount point of the trainer config in every stage pod (docs/contracts.md).
CONFIG_DIR = "/etc/kubetune"
CONFIG_FILE = "trainer.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"


def as_job(job: Union[FineTuneJob, Mapping[str, Any]]) -> FineTuneJob:
    return job if isinstance(job, FineTuneJob) else FineTuneJob.from_body(job)


def trainer_config_for(
    job: Union[FineTuneJob, Mapping[str, Any]],
    *,
    namespace: Optional[str] = None,
) -> TrainerConfig:
    """Pure. `job` is a FineTuneJob model or its dict (kopf body, YAML document).

    `namespace` overrides metadata.namespace (a YAML file applied with -n).
    """
    job = as_job(job)
    spec = job.spec
    modules = spec.method.target_modules
    return TrainerConfig.model_validate(
        {
            "baseModel": {"uri": spec.base_model.uri, "name": spec.base_model.name, "revision": spec.base_model.revision},
            "dataset": {
                "uri": spec.dataset.uri,
                "format": spec.dataset.format,
                "validationSplit": spec.dataset.validation_split,
                "maxLength": spec.dataset.max_length,
                "overLength": spec.dataset.over_length,
            },
            "method": {
                "type": spec.method.type,
                "r": spec.method.r,
                "alpha": spec.method.alpha,
                "dropout": spec.method.dropout,
                "targetModules": "all-linear" if modules == ["all-linear"] else list(modules),
                "quantization": {
                    "bits": spec.method.quantization.bits,
                    "type": spec.method.quantization.type,
                    "doubleQuant": spec.method.quantization.double_quant,
                },
            },
            "training": {
                "epochs": spec.training.epochs,
                "maxSteps": spec.training.max_steps,
                "learningRate": spec.training.learning_rate,
                "scheduler": spec.training.scheduler,
                "warmupRatio": spec.training.warmup_ratio,
                "batchSize": spec.training.batch_size,
                "gradientAccumulation": spec.training.gradient_accumulation,
                "packing": spec.training.packing,
                "seed": spec.training.seed,
                "checkpointEvery": spec.training.checkpoint_every,
                "gradientCheckpointing": spec.training.gradient_checkpointing,
                "precision": spec.training.precision,
                "fp8": spec.training.fp8,
                "strategy": spec.resources.strategy,
            },
            "output": {"uri": spec.output.uri},
            "merge": {"enabled": spec.output.merge},
            "evaluation": {
                "prompts": list(spec.evaluation.prompts),
                "maxNewTokens": spec.evaluation.max_new_tokens,
                "minImprovement": spec.evaluation.min_improvement,
            },
            "storage": {"endpointUrl": spec.storage.endpoint_url, "region": spec.storage.region},
            "job": {"name": job.metadata.name, "namespace": namespace or job.metadata.namespace},
        }
    )
