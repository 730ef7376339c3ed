"""What a child object's state means for the pipeline (pure).

Reads a batch/v1 Job (and its pods) or an apps/v1 Deployment as plain dicts
and condenses them into a `StageOutcome`: the reason a person should see
(BackoffLimitExceeded, OOMKilled, ImagePullBackOff, the pod's own reason from
its termination message) and the stage's JSON result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from kubetune.contract.facts import ANNOTATION_COMPLETION_INDEX, LABEL_GENERATION
from kubetune.contract.vllm import ARTIFACT_REFUSALS

State = Literal["absent", "suspended", "running", "succeeded", "failed"]

# Waiting reasons that will not fix themselves: the job is Stalled until a person acts
# (a missing Secret is CreateContainerConfigError; a bad image ImagePullBackOff).
STUCK_WAITING_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
                         "CreateContainerError", "CrashLoopBackOff")
MAX_MESSAGE = 2000


@dataclass
class StageOutcome:
    state: State
    reason: str = ""
    message: str = ""
    result: Optional[dict[str, Any]] = None  # the stage's termination message (docs/contracts.md)
    generation: Optional[str] = None
    details: dict[str, Any] = field(default_factory=dict)


def _job_condition(job: dict[str, Any], type_: str) -> Optional[dict[str, Any]]:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def parse_termination_message(text: Optional[str]) -> Optional[dict[str, Any]]:
    """The JSON object a stage writes; None when the pod left none (or log text)."""
    if not text:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _terminated(pod: dict[str, Any]) -> Optional[dict[str, Any]]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if term:
            return term
    return None


def _waiting(pod: dict[str, Any]) -> Optional[dict[str, Any]]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") in STUCK_WAITING_REASONS:
            return waiting
    return None


def _unschedulable(pod: dict[str, Any]) -> Optional[dict[str, Any]]:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            return cond
    return None


def _pod_index(pod: dict[str, Any]) -> int:
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        return int(ann.get(ANNOTATION_COMPLETION_INDEX, "0"))
    except ValueError:
        return 0


def _by_recency(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Rank 0 first (its verdict is the job's), newest pod first within a rank.
    return sorted(
        pods,
        key=lambda p: (_pod_index(p), "".join(chr(255 - ord(c)) for c in (p.get("metadata") or {}).get("creationTimestamp", ""))),
    )


def _shorten(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def failure_of_pods(pods: list[dict[str, Any]]) -> tuple[str, str, Optional[dict[str, Any]]]:
    """(reason, message, result) of the most telling failed pod."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    for pod in _by_recency(failed):
        term = _terminated(pod)
        name = (pod.get("metadata") or {}).get("name", "?")
        if term is None:
            status = pod.get("status") or {}
            if status.get("reason"):
                return status["reason"], _shorten(f"pod {name}: {status.get('message') or status['reason']}"), None
            continue
        result = parse_termination_message(term.get("message"))
        if result is not None:
            reason = result.get("reason") or term.get("reason") or "Error"
            return reason, _shorten(f"pod {name}: {result.get('message') or reason}"), result
        reason = term.get("reason") or "Error"  # OOMKilled, Error, ContainerCannotRun, ...
        detail = (term.get("message") or "").strip()
        exit_code = term.get("exitCode")
        text = f"pod {name}: container terminated with {reason} (exit code {exit_code})"
        return reason, _shorten(f"{text}: {detail}" if detail else text), None
    return "", "", None


def result_of_pods(pods: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The termination message of the succeeded rank-0 pod."""
    done = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
    for pod in _by_recency(done):
        term = _terminated(pod)
        if term:
            result = parse_termination_message(term.get("message"))
            if result is not None:
                return result
    return None


def job_outcome(job: Optional[dict[str, Any]], pods: list[dict[str, Any]]) -> StageOutcome:
    if job is None:
        return StageOutcome("absent")
    labels = (job.get("metadata") or {}).get("labels") or {}
    generation = labels.get(LABEL_GENERATION)
    spec = job.get("spec") or {}
    failed = _job_condition(job, "Failed")
    if failed is not None:
        job_reason = failed.get("reason") or "JobFailed"
        reason, message, result = failure_of_pods(pods)
        if not reason:
            reason, message = job_reason, failed.get("message") or job_reason
        elif job_reason not in (reason, "PodFailurePolicy"):
            message = f"{message} (Job: {job_reason})"
        return StageOutcome("failed", reason, message, result, generation, {"jobReason": job_reason})
    if _job_condition(job, "Complete") is not None or _job_condition(job, "SuccessCriteriaMet") is not None:
        result = result_of_pods(pods)
        return StageOutcome("succeeded", "Completed", (result or {}).get("message", ""), result, generation)
    if spec.get("suspend"):
        return StageOutcome("suspended", "Queued", "waiting for admission by the queue", None, generation)
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "?")
        waiting = _waiting(pod)
        if waiting:
            msg = _shorten(f"pod {name}: {waiting.get('message') or waiting['reason']}")
            return StageOutcome("running", waiting["reason"], msg, None, generation)
        unschedulable = _unschedulable(pod)
        if unschedulable:
            msg = _shorten(f"pod {name}: {unschedulable.get('message') or 'no node fits'}")
            return StageOutcome("running", "Unschedulable", msg, None, generation)
    active = (job.get("status") or {}).get("active") or 0
    return StageOutcome("running", "Running" if active else "Starting", "", None, generation)


def queue_state(workload: Optional[dict[str, Any]]) -> Optional[tuple[str, str]]:
    """(reason, message) of a queued Job from its Kueue Workload: Preempted with Kueue's
    message after an eviction, else why quota is not reserved yet. Pure."""
    if workload is None:
        return None
    conditions = {c.get("type"): c for c in (workload.get("status") or {}).get("conditions") or []}

    def true(type_: str) -> dict[str, Any]:
        cond = conditions.get(type_) or {}
        return cond if cond.get("status") == "True" else {}

    reserved = conditions.get("QuotaReserved") or {}
    if reserved.get("status") == "True":
        return None
    waiting = f"; waiting: {reserved['message']}" if reserved.get("message") else ""
    # Kueue marks an eviction (Evicted, while it happens), then Requeued with reason Preempted
    # (and Preempted) while the workload waits again: both mean "preempted, back in the queue".
    evicted = true("Evicted")
    requeued = true("Requeued")
    if evicted or true("Preempted") or requeued.get("reason") == "Preempted":
        reason = evicted.get("reason") or "Preempted"
        what = evicted.get("message") or true("Preempted").get("message") or "preempted"
        return reason, _shorten(f"Kueue: {what}{waiting}; it resumes from its newest checkpoint once re-admitted")
    if reserved.get("status") == "False" and reserved.get("message"):
        return "Queued", _shorten(f"Kueue: {reserved['message']}")
    return None


# Container restarts of a serving pod after which its crash loop fails the serve stage (settings override).
SERVING_MAX_RESTARTS = 5


def _container_statuses(pod: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(kind, status) of every container of `pod`, init containers first ("init" / "main")."""
    status = pod.get("status") or {}
    return ([("init", cs) for cs in status.get("initContainerStatuses") or []]
            + [("main", cs) for cs in status.get("containerStatuses") or []])


def _last_exit(cs: dict[str, Any]) -> str:
    term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
    if not term:
        return ""
    verdict = parse_termination_message(term.get("message"))
    detail = (verdict or {}).get("message") or (term.get("message") or "").strip()
    text = f"last exit: {term.get('reason') or 'Error'} (exit code {term.get('exitCode')})"
    return f"{text}: {detail}" if detail else text


def _serving_failure(pods: list[dict[str, Any]], max_restarts: int) -> Optional[tuple[str, str]]:
    """(reason, message) when a serving pod cannot come up by itself: the init container's refusal of the
    artifact (contract.vllm.ARTIFACT_REFUSALS: tampered, stale or unservable files stay so on every retry),
    or a container that crashed `max_restarts` times (a crash loop the kubelet would go on backing off for
    ever; an init container failing otherwise, e.g. S3 unreachable, counts here)."""
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "?")
        for kind, cs in _container_statuses(pod):
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
            verdict = parse_termination_message(term.get("message")) if kind == "init" else None
            if verdict is not None and verdict.get("ok") is False and verdict.get("reason") in ARTIFACT_REFUSALS:
                reason = verdict.get("reason") or "ArtifactRefused"
                return reason, _shorten(f"pod {name}: {cs.get('name')}: {verdict.get('message') or reason}")
            restarts = cs.get("restartCount") or 0
            # Only a container that is down now: restarts a healthy pod gathered over weeks do not count.
            down = ((cs.get("state") or {}).get("waiting") or {}).get("reason") == "CrashLoopBackOff" \
                or bool((cs.get("state") or {}).get("terminated"))
            if down and restarts >= max_restarts:
                waiting = ((cs.get("state") or {}).get("waiting") or {}).get("reason") or "CrashLoopBackOff"
                return "CrashLoopBackOff", _shorten(
                    f"pod {name}: container {cs.get('name')} restarted {restarts} times ({waiting}; the bound is "
                    f"{max_restarts}); {_last_exit(cs)}".rstrip("; "))
    return None


def _serving_waiting(pods: list[dict[str, Any]]) -> Optional[tuple[str, str]]:
    """A reason a person should see while pods wait: image pulls, missing Secrets, crash loops below the
    bound (with the last exit), including the init container's."""
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "?")
        for _, cs in _container_statuses(pod):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING_REASONS:
                text = f"pod {name}: container {cs.get('name')}: {waiting.get('message') or waiting['reason']}"
                if waiting["reason"] == "CrashLoopBackOff":
                    text += f" (restart {cs.get('restartCount') or 0}; {_last_exit(cs)})"
                return waiting["reason"], _shorten(text)
        unschedulable = _unschedulable(pod)
        if unschedulable:
            return "Unschedulable", _shorten(f"pod {name}: {unschedulable.get('message') or 'no node fits'}")
    return None


def deployment_outcome(deployment: Optional[dict[str, Any]], pods: list[dict[str, Any]],
                       max_restarts: int = SERVING_MAX_RESTARTS) -> StageOutcome:
    """succeeded == rolled out, Available and at least one replica Ready.

    failed: the rollout's progress deadline passed, the init container refused the artifact, or a
    container crash-looped `max_restarts` times. running with reason ScaledToZero: spec.replicas is 0
    (nothing serves; not Serving). running with the waiting reason (ImagePullBackOff,
    CreateContainerConfigError, CrashLoopBackOff below the bound) while pods cannot start."""
    if deployment is None:
        return StageOutcome("absent")
    status = deployment.get("status") or {}
    labels = (deployment.get("metadata") or {}).get("labels") or {}
    generation = labels.get(LABEL_GENERATION)
    replicas = (deployment.get("spec") or {}).get("replicas")
    replicas = 1 if replicas is None else replicas  # the API server's default
    details = {"replicas": replicas, "readyReplicas": status.get("readyReplicas", 0)}

    def out(state: State, reason: str, message: str) -> StageOutcome:
        return StageOutcome(state, reason, message, None, generation, details)

    failure = _serving_failure(pods, max_restarts)
    # A refused artifact fails at once; a crash loop only while no replica serves (one bad pod among
    # ready ones is the Deployment's to replace, not a reason to call the whole endpoint failed).
    if failure is not None and (failure[0] != "CrashLoopBackOff" or not status.get("readyReplicas")):
        return out("failed", *failure)
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("status") == "False":
            return out("failed", cond.get("reason") or "ProgressDeadlineExceeded", cond.get("message", ""))
    if replicas == 0:
        # Scaled to zero by the user: a state of its own, never Serving (no pod answers the endpoint).
        return out("running", "ScaledToZero", "serving.replicas is 0: no vLLM pod runs; set serving.replicas "
                   "to 1 or more to serve")
    available = next((c for c in status.get("conditions") or [] if c.get("type") == "Available"), None)
    # An edit (model name, image) rolls out: done only once the controller has seen the
    # new template and every replica runs it.
    rolled_out = (status.get("observedGeneration", 0) >= (deployment.get("metadata") or {}).get("generation", 0)
                  and status.get("updatedReplicas", 0) >= replicas)
    waiting = _serving_waiting(pods)
    if not rolled_out:
        if waiting is not None:
            return out("running", *waiting)
        return out("running", "RollingOut", "rolling out the new serving template")
    if available and available.get("status") == "True" and status.get("readyReplicas", 0) >= 1:
        return out("succeeded", available.get("reason") or "MinimumReplicasAvailable", available.get("message", ""))
    if waiting is not None:
        return out("running", *waiting)
    return out("running", "Deploying", "waiting for vLLM replicas to become ready")
