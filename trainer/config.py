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
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

DatasetFormat = Literal["auto", "alpaca", "sharegpt", "messages", "prompt-completion", "text"]
OverLength = Literal["truncate", "drop"]
MethodType = Literal["lora", "qlora"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"]
Strategy = Literal["ddp", "deepspeed-zero2", "deepspeed-zero3"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Fp8Mode = Literal["auto", "on", "off"]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the offending field."""


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )


class BaseModelSpec(_Model):
    uri: str = Field(min_length=1, description="s3://bucket/prefix/ or a local directory holding a Hugging Face model.")
    name: Optional[str] = Field(
        default=None,
        description="Name the base model is served under (vLLM); written as base_model_name_or_path "
        "into the adapter. Defaults to the last path segment of `uri`.",
    )
    revision: Optional[str] = None

    @property
    def served_name(self) -> str:
        if self.name:
            return self.name
        tail = self.uri.rstrip("/").rsplit("/", 1)[-1]
        return tail or self.uri


class DatasetSpec(_Model):
    uri: str = Field(min_length=1, description="s3://bucket/key or a local file (.jsonl, .json, .parquet, .csv).")
    format: DatasetFormat = "auto"
    validation_split: float = Field(default=0.05, ge=0.0, lt=1.0)
    max_length: int = Field(default=2048, ge=16, le=1_048_576)
    over_length: OverLength = "truncate"


class QuantizationSpec(_Model):
    bits: Literal[4, 8] = 4
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16"] = "bfloat16"


class MethodSpec(_Model):
    type: MethodType = "lora"
    r: int = Field(default=16, ge=1, le=1024)
    alpha: float = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)

    @field_validator("target_modules")
    @classmethod
    def _non_empty_modules(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(not m.strip() for m in v)):
            raise ValueError("must be 'all-linear' or a non-empty list of module names")
        return v


class TrainingSpec(_Model):
    epochs: float = Field(default=3, gt=0)
    max_steps: Optional[int] = Field(default=None, ge=1, description="Overrides epochs when set.")
    learning_rate: float = Field(default=2e-4, gt=0, lt=1)
    scheduler: Scheduler = "cosine"
    warmup_ratio: float = Field(default=0.05, ge=0.0, lt=1.0)
    batch_size: Union[Literal["auto"], int] = Field(default="auto", description="Per-device micro batch, or 'auto'.")
    gradient_accumulation: int = Field(default=1, ge=1)
    packing: bool = True
    seed: int = Field(default=42, ge=0)
    checkpoint_every: int = Field(default=200, ge=1, description="Steps between checkpoints uploaded to S3.")
    keep_checkpoints: int = Field(default=3, ge=1, description="Complete checkpoints kept in S3 (older ones are deleted).")
    eval_every: Optional[int] = Field(default=None, ge=1, description="Steps between eval-loss passes; default: with checkpoints.")
    log_every: int = Field(default=1, ge=1)
    gradient_checkpointing: bool = False
    precision: Precision = Field(default="auto", description="auto: bf16 on CUDA when supported, fp32 on CPU.")
    fp8: Fp8Mode = Field(default="auto", description="FP8 base products: auto (QLoRA on FP8 GPUs), on, off.")
    strategy: Strategy = Field(default="ddp", description="Multi-process strategy under `accelerate launch`.")
    completion_only_loss: bool = Field(default=True, description="Loss on completions / assistant turns only.")

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be 'auto' or an integer >= 1")
        return v


class OutputSpec(_Model):
    uri: str = Field(min_length=1, description="s3://bucket/prefix/ or a local directory; layout in trainer/artifacts.py.")


class MergeSpec(_Model):
    enabled: bool = True
    max_shard_size: str = "2GB"


class EvaluationSpec(_Model):
    prompts: list[str] = Field(default_factory=list)
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    min_improvement: Optional[float] = Field(
        default=None,
        ge=-1.0,
        le=1.0,
        description="Gate: minimum relative drop of held-out loss, (base - tuned) / base. "
        "Unset means the verdict always passes.",
    )
    max_eval_rows: int = Field(default=512, ge=1)


class StorageSpec(_Model):
    endpoint_url: Optional[str] = Field(default=None, description="S3-compatible endpoint; AWS_ENDPOINT_URL otherwise.")
    region: Optional[str] = None
    cache_dir: Optional[str] = Field(default=None, description="Local download cache; KUBETUNE_CACHE_DIR or ~/.cache/kubetune.")
    max_concurrency: int = Field(default=8, ge=1, le=64)


class JobRef(_Model):
    """The FineTuneJob this run belongs to, for status patches (env vars override)."""

    name: Optional[str] = None
    namespace: Optional[str] = None


class TrainerConfig(_Model):
    base_model: BaseModelSpec
    dataset: DatasetSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    output: OutputSpec
    merge: MergeSpec = Field(default_factory=MergeSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    job: JobRef = Field(default_factory=JobRef)

    @model_validator(mode="after")
    def _cross_field(self) -> "TrainerConfig":
        if self.method.type == "qlora" and self.method.quantization.bits == 8 and self.training.strategy == "deepspeed-zero3":
            # 4-bit weights are stored in bf16 tensors that ZeRO-3 partitions; 8-bit ones cannot be.
            raise ValueError("method.quantization.bits=8 cannot be combined with training.strategy=deepspeed-zero3; "
                             "use 4-bit qlora or deepspeed-zero2")
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
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {loc}: {e['msg']}")
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
