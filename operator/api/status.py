"""FineTuneJob `status`: what the operator (and the trainer's rank 0) observed.

Writers: the operator owns everything except `progress`, which rank 0 of the
train Job patches (docs/contracts.md); the operator only adds
`progress.percent`. `kopf` is kopf's own bookkeeping and is kept opaque.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import ConfigDict, Field

from kubetune.contract.rules import ApiModel

# The phases and condition types come from the stage registry
# (kubetune.operator.stages); the CRD generator writes them into the schema.
TERMINAL_PHASES = ("Succeeded", "Failed")


class StatusModel(ApiModel):
    # The API server is the validator of status; extra keys a newer trainer adds
    # are tolerated when reading.
    model_config = ConfigDict(extra="allow")


class Condition(StatusModel):
    """Kubernetes API conventions: lastTransitionTime changes only with status."""

    type: str = Field(max_length=64, description="The stage's condition type (see status.conditions).")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", max_length=128, description="CamelCase reason.")
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: Optional[str] = Field(default=None, description="When status last changed (RFC 3339).")
    observed_generation: Optional[int] = Field(default=None, description="metadata.generation the condition was set for.")


class Checkpoint(StatusModel):
    step: Optional[int] = Field(default=None, description="Optimizer step of the checkpoint.")
    uri: Optional[str] = Field(default=None, description="s3:// prefix of the checkpoint.")
    time: Optional[str] = Field(default=None, description="When it was committed (RFC 3339).")


class Progress(StatusModel):
    """Training progress, patched by rank 0 of the train Job."""

    step: Optional[int] = Field(default=None, description="Optimizer steps done.")
    total_steps: Optional[int] = Field(default=None, description="Optimizer steps planned.")
    percent: Optional[int] = Field(default=None, description="step / totalSteps in percent (computed by the operator).")
    epoch: Optional[float] = Field(default=None, description="Fractional epoch.")
    loss: Optional[float] = Field(default=None, description="Latest training loss.")
    eval_loss: Optional[float] = Field(default=None, description="Latest held-out loss.")
    learning_rate: Optional[float] = Field(default=None, description="Current learning rate.")
    tokens_per_second: Optional[float] = Field(default=None, description="Training throughput.")
    eta_seconds: Optional[float] = Field(default=None, description="Estimated seconds to the end of training.")
    last_checkpoint: Optional[Checkpoint] = Field(default=None, description="Latest complete checkpoint in S3.")
    updated_at: Optional[str] = Field(default=None, description="When rank 0 last reported (RFC 3339).")


class Artifacts(StatusModel):
    """s3:// URIs of the finished artifacts."""

    adapter: Optional[str] = Field(default=None, description="PEFT adapter prefix.")
    merged: Optional[str] = Field(default=None, description="Merged bf16 model prefix.")
    metrics: Optional[str] = Field(default=None, description="metrics.jsonl of training.")
    loss_curve: Optional[str] = Field(default=None, description="Loss curve image.")
    validation_report: Optional[str] = Field(default=None, description="validation/report.json.")
    evaluation_report: Optional[str] = Field(default=None, description="evaluation/report.json.")


class StageResult(StatusModel):
    """The termination message of a stage pod (docs/contracts.md), as reported."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    ok: Optional[bool] = Field(default=None, description="Whether the stage passed.")
    reason: Optional[str] = Field(default=None, description="CamelCase reason.")
    message: Optional[str] = Field(default=None, description="Summary.")


class Endpoint(StatusModel):
    """How to reach the served model."""

    service: Optional[str] = Field(default=None, description="Service name in the job's namespace.")
    url: Optional[str] = Field(default=None, description="In-cluster base URL of the OpenAI-compatible API.")
    model: Optional[str] = Field(default=None, description="Model name to send in requests.")
    server: Optional[str] = Field(default=None, description="The shared AdapterServer (serving.mode adapter).")


class StageRecord(StatusModel):
    """A finished stage of a revision: once recorded it is never run again for that revision."""

    completed_at: Optional[str] = Field(default=None, description="When it succeeded (RFC 3339).")
    result: Optional[StageResult] = Field(default=None, description="Its pod's verdict (validate, evaluate).")


class Revision(StatusModel):
    """One content-addressed revision: the artifact its recipe fields define."""

    id: str = Field(max_length=32, description="Hash of the fields that define the artifact (docs/architecture.md).")
    generation: Optional[int] = Field(default=None, description="metadata.generation that first asked for it.")
    phase: Optional[str] = Field(default=None, description="Running, Succeeded, Failed or Superseded.")
    artifacts: Optional[Artifacts] = Field(default=None, description="Its artifact URIs, under <output>/revisions/<id>/.")
    evaluation: Optional[StageResult] = Field(default=None, description="Its evaluation verdict.")
    stages: dict[str, StageRecord] = Field(default_factory=dict, description="Stages finished for this revision.")
    restarts: Optional[int] = Field(default=None, description="Restarts of its training gang after a rank failed.")
    served_from: Optional[str] = Field(default=None, description="When it started to take the traffic (RFC 3339).")
    served_until: Optional[str] = Field(default=None, description="When a later revision replaced it (RFC 3339).")


class CanaryStatus(StatusModel):
    """The weighted canary of a new revision (spec.serving.canary)."""

    revision: Optional[str] = Field(default=None, description="The revision on canary.")
    state: Optional[str] = Field(default=None, description="Starting, Running, Promoted or Failed.")
    weight: Optional[int] = Field(default=None, description="Percent of the requests it gets.")
    ready_since: Optional[str] = Field(default=None, description="When it first served its share (RFC 3339).")
    message: Optional[str] = Field(default=None, max_length=4096, description="Why it failed, or how far it is.")


class FineTuneJobStatus(StatusModel):
    phase: Optional[str] = Field(default=None, description="Where the job is in its lifecycle.")
    message: Optional[str] = Field(default=None, max_length=32768, description="Latest human-readable status.")
    observed_generation: Optional[int] = Field(default=None, description="metadata.generation last reconciled.")
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="One per stage (see the stage registry).",
    )
    progress: Optional[Progress] = Field(default=None, description="Training progress.")
    artifacts: Optional[Artifacts] = Field(default=None, description="Artifact URIs.")
    validation: Optional[StageResult] = Field(default=None, description="Result of the validate stage.")
    evaluation: Optional[StageResult] = Field(default=None, description="Result of the evaluate stage.")
    endpoint: Optional[Endpoint] = Field(default=None, description="Serving endpoint.")
    revision: Optional[str] = Field(default=None, description="The revision the current spec asks for.")
    adapter_server: Optional[str] = Field(
        default=None, description="The shared AdapterServer the job's adapter is on (serving.mode adapter)."
    )
    canary: Optional[CanaryStatus] = Field(default=None, description="The canary of a new revision, if any.")
    serving_revision: Optional[str] = Field(default=None, description="The revision the endpoint serves.")
    revisions: list[Revision] = Field(
        default_factory=list, max_length=20, description="Recent revisions, newest last (at most 10 kept)."
    )
    start_time: Optional[str] = Field(default=None, description="When the first stage started.")
    completion_time: Optional[str] = Field(default=None, description="When the job reached Serving, Succeeded or Failed.")
    kopf: Optional[dict[str, Any]] = Field(
        default=None,
        description="Operator framework bookkeeping.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
