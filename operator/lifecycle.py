"""The pipeline as a pure function: (FineTuneJob, observed children) -> Decision.

Level-based: nothing here remembers what happened before except what the
children and the job's status say, so running it twice, or after an operator
restart, decides the same thing. The reconciler (reconcile.py) gathers the
observations, performs the one action decided, and writes the status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .api import FineTuneJob
from .outcomes import STUCK_WAITING_REASONS, StageOutcome
from .stages import Stage, pipeline


@dataclass
class Decision:
    phase: str
    message: str = ""
    # (type, status, reason, message), applied in order by the reconciler.
    conditions: list[tuple[str, str, str, str]] = field(default_factory=list)
    create: Optional[str] = None  # stage whose children must be created now
    status: dict[str, Any] = field(default_factory=dict)  # other status fields to merge
    current: Optional[str] = None  # the stage this decision is about (the first not done, or the last)
    # Stages found done in this pass, {stage: {"result": ...}}: recorded in status.revisions.
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Reason when the job cannot make progress without a person (a missing object, a refused child).
    stalled: Optional[str] = None
    # Stage whose failed children are deleted now so the next pass starts it again (the gang),
    # and whether that restart counts toward spec.resources.maxRestarts (preemptions do not).
    restart: Optional[str] = None
    restart_counts: bool = True
    # Blue/green (keep_serving): the earlier revision that still serves while this one is built,
    # evaluated and rolled out, and whether this one was held back (failed: it never takes traffic).
    serving_revision: Optional[str] = None
    held_back: bool = False

    @property
    def failed(self) -> bool:
        return self.phase == "Failed"


def restart_kind(outcome: StageOutcome) -> Optional[str]:
    """Why a failed stage may run again: "preempted" (not counted), "crashed" (counted),
    or None when running it again cannot help: the trainer's own refusal of its input
    (a JSON verdict) or an OOM kill (the same memory, the same death)."""
    if outcome.reason == "OOMKilled":
        return None
    if outcome.result is None:
        return "crashed"  # no verdict: a crash, a lost node, a kill
    return "preempted" if outcome.result.get("reason") == "Preempted" else None


def decide(job: FineTuneJob, observed: dict[str, StageOutcome], restarts: int = 0) -> Decision:
    """`observed` maps stage name to its outcome; stages not in it are absent. `restarts`:
    counted restarts of the current revision's restartable stage so far.

    Walks the job's pipeline in order: the first stage not done decides the
    phase; every done stage's condition is True and its artifacts published."""
    conditions: list[tuple[str, str, str, str]] = []
    status: dict[str, Any] = {}
    artifacts: dict[str, str] = {}
    finished: dict[str, dict[str, Any]] = {}
    last: Optional[Stage] = None
    queue = job.spec.resources.queue_name

    def result(phase: str, message: str, **kw: Any) -> Decision:
        out = dict(status)
        if artifacts:
            out["artifacts"] = artifacts
        return Decision(phase, message, conditions, status=out, current=last.name if last else None,
                        finished=finished, **kw)

    for stage in pipeline(job.spec):
        last = stage
        outcome = observed.get(stage.name) or StageOutcome("absent")
        cond = stage.condition
        verdict = {k: v for k, v in outcome.result.items() if k != "stage"} if outcome.result is not None else None
        if stage.result_field and verdict is not None:
            status[stage.result_field] = verdict
        if stage.extra_status:
            status.update(stage.extra_status(job, outcome))
        if outcome.state == "absent":
            if queue and stage.queued:
                # Created suspended: it waits for Kueue from the first moment.
                conditions.append((cond, stage.pending_status, "Queued", f"{stage.name} waits in queue {queue}"))
                return result("Queued", f"{stage.name} queued", create=stage.name)
            conditions.append((cond, stage.pending_status, stage.start_reason, f"{stage.name} not started"))
            return result(stage.phase, f"starting {stage.name}", create=stage.name)
        if outcome.state == "suspended":
            conditions.append((cond, stage.pending_status, outcome.reason or "Queued", outcome.message))
            waiting = f"{stage.name} is waiting in queue {queue}"
            return result("Queued", f"{waiting}: {outcome.message}" if outcome.message else waiting)
        if outcome.state == "running":
            message = outcome.message or f"{stage.name} running"
            conditions.append((cond, stage.pending_status, outcome.reason or "Running", message))
            stuck = outcome.reason if outcome.reason in STUCK_WAITING_REASONS else None
            return result(stage.phase, message, stalled=stuck)
        if outcome.state == "failed" and stage.restartable:
            kind = restart_kind(outcome)
            limit = job.spec.resources.max_restarts
            if kind == "preempted" or (kind == "crashed" and restarts < limit):
                counted = kind == "crashed"
                message = (f"restarting every rank from the newest checkpoint after: {outcome.message or outcome.reason}"
                           + (f" (restart {restarts + 1} of {limit})" if counted else " (preempted: not counted)"))
                conditions.append((cond, stage.pending_status, "Restarting", message))
                return result(stage.phase, message, restart=stage.name, restart_counts=counted)
            if kind == "crashed":
                outcome = StageOutcome("failed", outcome.reason or "Failed",
                                       f"{outcome.message} (after {restarts} restarts, spec.resources.maxRestarts)",
                                       outcome.result)
        if outcome.state == "failed":
            message = outcome.message or f"{stage.name} failed"
            conditions.append((cond, "False", outcome.reason or "Failed", message))
            return result("Failed", f"{stage.name} failed: {message}")
        # succeeded
        if stage.recorded:
            finished[stage.name] = {"result": verdict} if verdict is not None else {}
        gate = stage.gate(job, outcome) if stage.gate else None
        artifacts.update(stage.artifact_uris(job))
        if gate is not None:
            conditions.append((cond, "False", stage.gate_reason, gate))
            return result("Failed", f"{stage.name} gate: {gate}")
        message = stage.done_message(job, outcome) if stage.done_message else (outcome.message or f"{stage.name} succeeded")
        conditions.append((cond, "True", stage.done_reason, message))
    if last is not None and last.done_phase != "Succeeded":
        return result(last.done_phase, conditions[-1][3])
    return result("Succeeded", "all stages succeeded")


def progress_percent(progress: Optional[dict[str, Any]], trained: bool) -> Optional[int]:
    if trained:
        return 100
    if not progress:
        return None
    step, total = progress.get("step"), progress.get("totalSteps")
    if not isinstance(step, (int, float)) or not isinstance(total, (int, float)) or total <= 0:
        return None
    return max(0, min(100, int(100 * step / total)))


DONE_PHASES = ("Serving", "Succeeded")


def stall(decision: Decision, reason: str, message: str) -> Decision:
    """The same decision, but nothing can happen until a person acts: no child is
    created, the stage's condition and the job say why (Stalled=True)."""
    conditions = list(decision.conditions)
    if conditions:
        type_, status, _, _ = conditions[-1]
        conditions[-1] = (type_, status, reason, message)
    return Decision(decision.phase, message, conditions, create=None, status=decision.status,
                    current=decision.current, finished=decision.finished, stalled=reason)


def keep_serving(decision: Decision, serving_rev: str, rev: str, endpoint: dict[str, Any]) -> Decision:
    """Blue/green: revision `serving_rev` still serves (its pods or its adapter answer) while `rev`,
    the one the spec asks for now, is validated, trained, evaluated and rolled out. The job stays
    Ready on the old one, with its endpoint; `Promoted=False` says what the new one is doing, or why
    it was held back (a failed gate or stage: it never takes traffic, the old one keeps serving)."""
    conditions = list(decision.conditions)
    if decision.failed:
        failing = next((r for _, st, r, _ in reversed(conditions) if st == "False"), "Failed")
        reason = failing if failing.endswith(("GateFailed", "CanaryFailed")) else "RevisionFailed"
        message = f"revision {rev} held back, revision {serving_rev} keeps serving: {decision.message}"
        conditions.append(("Promoted", "False", reason, message))
        phase, held = "Serving", True
    else:
        message = f"revision {serving_rev} serves while revision {rev} is built: {decision.message}"
        conditions.append(("Promoted", "False", "RolloutInProgress", message))
        phase, held = decision.phase, False
    return Decision(phase, message, conditions, create=decision.create, status={**decision.status, "endpoint": endpoint},
                    current=decision.current, finished=decision.finished, stalled=decision.stalled,
                    restart=decision.restart, restart_counts=decision.restart_counts, serving_revision=serving_rev,
                    held_back=held)


def not_serving(decision: Decision, serving_rev: str, rev: str) -> Decision:
    """The revision that served no longer answers while `rev` is built (its pods lost, its adapter
    gone): no endpoint, no serving revision, and Promoted says so."""
    decision.conditions.append(("Promoted", "False", "NotServing",
                                f"revision {serving_rev} no longer answers; revision {rev}: {decision.message}"))
    decision.status.update({"endpoint": None, "servingRevision": None})
    return decision


def promoted(decision: Decision, rev: str, replaced: Optional[str]) -> Decision:
    """A serving decision: its revision takes the traffic (`replaced`: the one it took over from)."""
    message = f"revision {rev} serves" + (f" (replaced revision {replaced})" if replaced and replaced != rev else "")
    decision.conditions.append(("Promoted", "True", "RevisionServing", message))
    return decision


def summary_conditions(decision: Decision) -> list[tuple[str, str, str, str]]:
    """Ready / Reconciling / Stalled, as kstatus (Flux) and Argo CD read them: Stalled=True is
    Failed, Reconciling=True is InProgress, neither (with observedGeneration current) is
    Current; Ready=True once the job has reached its goal (serving, or all stages done), and
    while an earlier revision serves during a rollout (keep_serving)."""
    if decision.serving_revision:
        # Serving the earlier revision: Ready. Still reconciling while the new one is built; Stalled once
        # it was held back or cannot go on without a person (kstatus: the spec's state will not be reached
        # without a new edit, so a Flux pipeline stops there instead of passing on the old model).
        if decision.held_back or decision.stalled:
            reason = decision.stalled or "RevisionHeldBack"
            return [("Ready", "True", reason, decision.message),
                    ("Reconciling", "False", reason, decision.message),
                    ("Stalled", "True", reason, decision.message)]
        return [("Ready", "True", "ServingPreviousRevision", decision.message),
                ("Reconciling", "True", "ServingPreviousRevision", decision.message),
                ("Stalled", "False", "ServingPreviousRevision", decision.message)]
    if decision.phase in DONE_PHASES:
        return [("Ready", "True", decision.phase, decision.message),
                ("Reconciling", "False", decision.phase, decision.message),
                ("Stalled", "False", decision.phase, decision.message)]
    if decision.failed or decision.stalled:
        reason = decision.stalled or next((r for _, st, r, _ in reversed(decision.conditions) if st == "False"), "Failed")
        return [("Ready", "False", reason, decision.message),
                ("Reconciling", "False", reason, decision.message),
                ("Stalled", "True", reason, decision.message)]
    return [("Ready", "False", decision.phase, decision.message),
            ("Reconciling", "True", decision.phase, decision.message),
            ("Stalled", "False", decision.phase, decision.message)]


def status_update(current: dict[str, Any], decision: Decision, generation: Optional[int], timestamp: str,
                  rev: Optional[str] = None) -> dict[str, Any]:
    """The merge patch for `status` that records `decision` for revision `rev` (pure)."""
    from . import revisions
    from .conditions import set_condition

    conditions = list(current.get("conditions") or [])
    for type_, status, reason, message in decision.conditions + summary_conditions(decision):
        conditions = set_condition(conditions, type_, status, reason, message, generation, timestamp)
    patch: dict[str, Any] = {
        "phase": decision.phase,
        "message": decision.message,
        "observedGeneration": generation,
        "conditions": conditions,
        **decision.status,
    }
    if rev is not None:
        finished = {stage: {"completedAt": timestamp, **rec} for stage, rec in decision.finished.items()}
        if decision.held_back:
            phase = "Failed"  # its own outcome; the job serves the earlier revision
        else:
            phase = "Succeeded" if decision.phase in DONE_PHASES else "Failed" if decision.failed else "Running"
        patch["revision"] = rev
        patch["revisions"] = revisions.record(current, rev, generation, finished, phase,
                                              decision.status.get("artifacts") or {},
                                              decision.status.get("evaluation"),
                                              restarted=bool(decision.restart and decision.restart_counts))
        if decision.phase == "Serving" and not decision.serving_revision:
            patch["servingRevision"] = rev
            # Served from / until: the history `kubetune status` prints.
            patch["revisions"] = revisions.served(patch["revisions"], rev, current.get("servingRevision"), timestamp)
    if not current.get("startTime"):
        patch["startTime"] = timestamp
    if decision.phase in ("Serving", "Succeeded", "Failed") and current.get("phase") != decision.phase:
        patch["completionTime"] = timestamp
    trained = any(t == "Trained" and s == "True" for t, s, _, _ in decision.conditions)
    progress = current.get("progress")
    if rev is not None and current.get("revision") not in (None, rev):
        # A new revision: the last one's training progress says nothing about it (rank 0 reports anew).
        patch["progress"], progress = None, None
    percent = progress_percent(progress, trained)
    if percent is not None and percent != (progress or {}).get("percent"):
        patch["progress"] = {"percent": percent}
    return patch
