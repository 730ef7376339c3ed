"""The pipeline as a pure function: (FineTuneJob, observed children) -> Decision.

Level-based: nothing here remembers what happened before except what the
children and the job's status say, so running it twice, or after an operator
restart, decides the same thing. The reconciler (reconcile.py) gathers the
observations, performs the one action decided, and writes the status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from kubetune.trainer import artifacts as layout

from . import serving
from .api import FineTuneJob
from .outcomes import StageOutcome
from .stage_jobs import QUEUED_STAGES

JOB_STAGES = ("validate", "train", "merge", "evaluate")
CONDITION = {"validate": "Validated", "train": "Trained", "merge": "Merged", "evaluate": "Evaluated", "serve": "Ready"}
RUNNING_PHASE = {"validate": "Validating", "train": "Training", "merge": "Merging", "evaluate": "Evaluating", "serve": "Deploying"}
DONE_REASON = {
    "validate": "DatasetValid",
    "train": "TrainingSucceeded",
    "merge": "MergeSucceeded",
    "evaluate": "EvaluationPassed",
}


@dataclass
class Decision:
    phase: str
    message: str = ""
    # (type, status, reason, message), applied in order by the reconciler.
    conditions: list[tuple[str, str, str, str]] = field(default_factory=list)
    create: Optional[str] = None  # stage whose children must be created now
    status: dict[str, Any] = field(default_factory=dict)  # other status fields to merge
    scale_to: Optional[int] = None  # serving replicas to apply to the Deployment

    @property
    def failed(self) -> bool:
        return self.phase == "Failed"


def pipeline(job: FineTuneJob) -> list[str]:
    stages = ["validate", "train"]
    if job.spec.output.merge:
        stages.append("merge")
    if job.spec.evaluation.enabled:
        stages.append("evaluate")
    return stages


def artifact_uris(job: FineTuneJob, done: set[str]) -> dict[str, str]:
    root = job.spec.output.uri.rstrip("/")
    out: dict[str, str] = {}
    if "validate" in done:
        out["validationReport"] = f"{root}/{layout.VALIDATION_REPORT}"
    if "train" in done:
        out["adapter"] = f"{root}/{layout.ADAPTER}/"
        out["metrics"] = f"{root}/{layout.ADAPTER}/metrics.jsonl"
        out["lossCurve"] = f"{root}/{layout.ADAPTER}/loss_curve.png"
    if "merge" in done:
        out["merged"] = f"{root}/{layout.MERGED}/"
    if "evaluate" in done:
        out["evaluationReport"] = f"{root}/{layout.EVALUATION_REPORT}"
    return out


def _result_status(stage: str, outcome: StageOutcome) -> dict[str, Any]:
    """The stage's verdict copied into status.validation / status.evaluation."""
    if stage not in ("validate", "evaluate") or outcome.result is None:
        return {}
    result = {k: v for k, v in outcome.result.items() if k != "stage"}
    return {"validation" if stage == "validate" else "evaluation": result}


def _evaluation_gate_failed(job: FineTuneJob, outcome: StageOutcome) -> Optional[str]:
    """Message when a finished evaluation says the tuned model must not be served."""
    result = outcome.result or {}
    if result.get("ok") is False:
        return result.get("message") or "the tuned model did not pass the evaluation gate"
    gate = job.spec.evaluation.min_improvement
    improvement = result.get("improvement")
    if gate is not None and isinstance(improvement, (int, float)) and improvement < gate:
        return f"held-out loss improved by {improvement:.4f}, below evaluation.minImprovement {gate}"
    return None


def decide(job: FineTuneJob, observed: dict[str, StageOutcome]) -> Decision:
    """`observed` maps stage name (validate/train/merge/evaluate/serve) to its outcome."""
    conditions: list[tuple[str, str, str, str]] = []
    status: dict[str, Any] = {}
    done: set[str] = set()
    for stage in pipeline(job):
        outcome = observed.get(stage) or StageOutcome("absent")
        cond = CONDITION[stage]
        status.update(_result_status(stage, outcome))
        if outcome.state == "absent":
            if job.spec.resources.queue_name and stage in QUEUED_STAGES:
                # Created suspended: it waits for Kueue from the first moment.
                conditions.append((cond, "Unknown", "Queued", f"{stage} waits in queue {job.spec.resources.queue_name}"))
                return _with(job, Decision("Queued", f"{stage} queued", conditions, create=stage), status, done)
            conditions.append((cond, "Unknown", "Pending", f"{stage} not started"))
            return _with(job, Decision(RUNNING_PHASE[stage], f"starting {stage}", conditions, create=stage), status, done)
        if outcome.state == "suspended":
            conditions.append((cond, "Unknown", "Queued", outcome.message))
            return _with(job, Decision("Queued", f"{stage} is waiting in queue {job.spec.resources.queue_name}", conditions), status, done)
        if outcome.state == "running":
            message = outcome.message or f"{stage} running"
            conditions.append((cond, "Unknown", outcome.reason or "Running", message))
            return _with(job, Decision(RUNNING_PHASE[stage], message, conditions), status, done)
        if outcome.state == "failed":
            message = outcome.message or f"{stage} failed"
            conditions.append((cond, "False", outcome.reason or "Failed", message))
            return _with(job, Decision("Failed", f"{stage} failed: {message}", conditions), status, done)
        # succeeded
        if stage == "evaluate":
            gate = _evaluation_gate_failed(job, outcome)
            if gate is not None:
                done.add(stage)
                conditions.append((cond, "False", "EvaluationGateFailed", gate))
                return _with(job, Decision("Failed", f"evaluation gate: {gate}", conditions), status, done)
        done.add(stage)
        conditions.append((cond, "True", DONE_REASON[stage], outcome.message or f"{stage} succeeded"))

    if not job.spec.serving.enabled:
        return _with(job, Decision("Succeeded", "all stages succeeded", conditions), status, done)
    mode = job.spec.serving.mode
    if mode not in serving.SUPPORTED_MODES:
        msg = f"serving.mode {mode} is not supported by this operator version"
        conditions.append(("Ready", "False", "ServingModeNotSupported", msg))
        return _with(job, Decision("Failed", msg, conditions), status, done)
    outcome = observed.get("serve") or StageOutcome("absent")
    if outcome.state == "absent":
        conditions.append(("Ready", "False", "Deploying", "creating the vLLM Deployment"))
        return _with(job, Decision("Deploying", "deploying vLLM", conditions, create="serve"), status, done)
    scale_to = None
    if outcome.details.get("replicas") is not None and outcome.details["replicas"] != job.spec.serving.replicas:
        scale_to = job.spec.serving.replicas
    status["endpoint"] = serving.endpoint(job)
    if outcome.state == "succeeded":
        conditions.append(("Ready", "True", "DeploymentAvailable", f"vLLM serves {serving.served_model_name(job)}"))
        d = Decision("Serving", f"serving at {status['endpoint']['url']}", conditions, scale_to=scale_to)
        return _with(job, d, status, done)
    if outcome.state == "failed":
        conditions.append(("Ready", "False", outcome.reason, outcome.message))
        return _with(job, Decision("Failed", f"serving failed: {outcome.message}", conditions), status, done)
    conditions.append(("Ready", "False", outcome.reason or "Deploying", outcome.message))
    return _with(job, Decision("Deploying", outcome.message or "deploying vLLM", conditions, scale_to=scale_to), status, done)


def _with(job: FineTuneJob, decision: Decision, status: dict[str, Any], done: set[str]) -> Decision:
    decision.status = dict(status)
    uris = artifact_uris(job, done)
    if uris:
        decision.status["artifacts"] = uris
    return decision


def progress_percent(progress: Optional[dict[str, Any]], trained: bool) -> Optional[int]:
    if trained:
        return 100
    if not progress:
        return None
    step, total = progress.get("step"), progress.get("totalSteps")
    if not isinstance(step, (int, float)) or not isinstance(total, (int, float)) or total <= 0:
        return None
    return max(0, min(100, int(100 * step / total)))


def status_update(current: dict[str, Any], decision: Decision, generation: Optional[int], timestamp: str) -> dict[str, Any]:
    """The merge patch for `status` that records `decision` (pure)."""
    from .conditions import set_condition

    conditions = list(current.get("conditions") or [])
    for type_, status, reason, message in decision.conditions:
        conditions = set_condition(conditions, type_, status, reason, message, generation, timestamp)
    patch: dict[str, Any] = {
        "phase": decision.phase,
        "message": decision.message,
        "observedGeneration": generation,
        "conditions": conditions,
        **decision.status,
    }
    if not current.get("startTime"):
        patch["startTime"] = timestamp
    if decision.phase in ("Serving", "Succeeded", "Failed") and current.get("phase") != decision.phase:
        patch["completionTime"] = timestamp
    trained = any(t == "Trained" and s == "True" for t, s, _, _ in decision.conditions)
    percent = progress_percent(current.get("progress"), trained)
    if percent is not None and percent != (current.get("progress") or {}).get("percent"):
        patch["progress"] = {"percent": percent}
    return patch
