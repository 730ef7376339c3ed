"""The trainer's own configuration file (YAML or JSON).

`TrainerConfig` is the contract between the operator (which renders a
FineTuneJob into it and stores it in a ConfigMap) and the trainer stages.
This module imports pydantic and the standard library only: the operator
imports it, and it must not pull torch into the operator's process.

Field names use camelCase aliases like the CRD; Python code reads the
snake_case attributes. Unknown keys are rejected, so a typo in a config file
is an error naming the key instead of a silently ignored setting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, ValidationError, model_validator

from kubetune.contract.recipe import (BaseModelSpec, DatasetSpec, EvaluationSpec, MethodSpec, Strategy, TrainingSpec,
                                      recipe_errors)
from kubetune.contract.rules import ApiModel

__all__ = [
    "BaseModelSpec", "DatasetSpec", "MethodSpec", "TrainingSpec", "EvaluationSpec", "OutputSpec", "MergeSpec",
    "StorageSpec", "LaunchSpec", "JobRef", "TrainerConfig", "ConfigError", "parse_config", "load_config",
]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the offending field."""


# The recipe sections (baseModel, dataset, method, training, evaluation) are
# kubetune.contract.recipe's, the very classes the FineTuneJob spec embeds.
# What follows is the trainer's own: where things are and how it was launched.


class OutputSpec(ApiModel):
    uri: str = Field(min_length=1, description="s3://bucket/prefix/ or a local directory; layout in kubetune.contract.facts.")
    kernel_cache_uri: Optional[str] = Field(
        default=None, min_length=1,
        description="s3://bucket/prefix/ or a local directory keeping the compiled GPU kernels between the job's pods "
        "(trainer/kernel_cache.py); none: each pod compiles its own.")


class MergeSpec(ApiModel):
    enabled: bool = Field(default=True, description="Whether the merge stage runs (spec.output.merge).")
    max_shard_size: str = Field(default="2GB", description="Largest safetensors shard of merged/.")


class StorageSpec(ApiModel):
    endpoint_url: Optional[str] = Field(default=None, description="S3-compatible endpoint; AWS_ENDPOINT_URL otherwise.")
    region: Optional[str] = None
    cache_dir: Optional[str] = Field(default=None, description="Local download cache; KUBETUNE_CACHE_DIR or ~/.cache/kubetune.")
    max_concurrency: int = Field(default=8, ge=1, le=64)


class LaunchSpec(ApiModel):
    strategy: Strategy = Field(default="ddp", description="Multi-process strategy under `accelerate launch` (spec.resources.strategy).")


class ServeSpec(ApiModel):
    """What serving will ask of the model, checked by the validate stage before any training."""

    tensor_parallel_size: Optional[int] = Field(
        default=None, ge=1, le=8, description="spec.serving.gpus: the base model's heads must split over it.")


class JobRef(ApiModel):
    """The FineTuneJob this run belongs to, for status patches (env vars override)."""

    name: Optional[str] = None
    namespace: Optional[str] = None


class TrainerConfig(ApiModel):
    base_model: BaseModelSpec
    dataset: DatasetSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec
    merge: MergeSpec = Field(default_factory=MergeSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    launch: LaunchSpec = Field(default_factory=LaunchSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)
    job: JobRef = Field(default_factory=JobRef)

    @model_validator(mode="after")
    def _cross_field(self) -> "TrainerConfig":
        errors = recipe_errors(self.method, self.training, self.launch.strategy)
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def to_dict(self) -> dict[str, Any]:
        """camelCase dict, as written into the ConfigMap."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        # A section's own rule names its field first ("batchSize: ..."): report it at that field.
        field, sep, rest = msg.partition(": ")
        if sep and field.replace(".", "").isalnum() and loc:
            loc, msg = f"{loc}.{field}", rest
        lines.append(f"  {loc or '(root)'}: {msg}")
    return f"invalid trainer config {source}:\n" + "\n".join(lines)


def parse_config(data: Any, source: str = "") -> TrainerConfig:
    """Validate a decoded config mapping; raise ConfigError naming each bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid trainer config {source}: top level must be a mapping, got {type(data).__name__}")
    try:
        return TrainerConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path) -> TrainerConfig:
    """Read a YAML or JSON trainer config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"trainer config not found: {p}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"trainer config {p} is not UTF-8: {e}") from None
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: both carry a line number
        raise ConfigError(f"trainer config {p} cannot be parsed: {e}") from None
    return parse_config(data, source=str(p))
