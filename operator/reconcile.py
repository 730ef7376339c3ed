"""One reconcile of one FineTuneJob: observe children, decide, act, report.

The only stateful step is `act`, which creates at most one stage's children
(idempotently) per pass; the status patch is returned to kopf, which writes
it after the handler. An operator killed between the two simply decides the
same thing again on restart and finds the children already there.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, Callable, Optional

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubetune.contract.facts import API_VERSION, LABEL_JOB, LABEL_REVISION

from . import adapter_servers, canary, children, lifecycle, metrics, names, preflight, revisions, serving, stage_jobs, stages, tenancy
from .api import FineTuneJob
from .conditions import get_condition, now
from .kube import Kube
from .outcomes import StageOutcome, deployment_outcome, job_outcome
from .pods import selector_labels
from .settings import OperatorSettings

log = logging.getLogger("kubetune.operator")

EventFn = Callable[[str, str, str], None]  # (type Normal|Warning, reason, message)


def crash_point(settings: OperatorSettings, point: str) -> None:
    """Fault injection for the restart tests: die like `kill -9` right here."""
    if settings.crash_after and settings.crash_after == point:
        log.warning("crash point %s reached: SIGKILL", point)
        os.kill(os.getpid(), signal.SIGKILL)


def observe(kube: Kube, job: FineTuneJob, finished: dict[str, dict[str, Any]]) -> dict[str, StageOutcome]:
    """Outcomes of the job's stages, in order, up to the first one not done (later
    stages cannot have started). A stage recorded as finished for this revision
    is not read again: deleting its Job never runs it again."""
    observed: dict[str, StageOutcome] = {}
    for stage in stages.pipeline(job.spec):
        if stage.recorded and stage.name in finished:
            record = finished[stage.name]
            observed[stage.name] = StageOutcome("succeeded", "Recorded", f"finished at {record.get('completedAt')}",
                                                record.get("result"))
            continue
        observed[stage.name] = stage.observe(kube, job, stage.name)
        if observed[stage.name].state != "succeeded":
            break
    return observed


def act(kube: Kube, job: FineTuneJob, decision: lifecycle.Decision, settings: OperatorSettings) -> None:
    """Create the children of a stage that has none yet; re-apply the children of an
    applied stage (serving) on every pass, so that spec edits and hand edits converge."""
    stage = stages.BY_NAME[decision.create or decision.current] if (decision.create or decision.current) else None
    if stage is None or (not decision.create and not stage.reapplied):
        return
    for obj in stage.build(job, settings):
        if kube.ensure(obj):
            metrics.CHILDREN_CREATED.labels(kind=obj["kind"]).inc()
            log.info("applied %s %s/%s", obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        crash_point(settings, f"create-{stage.name}-{obj['kind'].lower()}")


def _finished_job(obj: dict[str, Any]) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def prune(kube: Kube, job: FineTuneJob, rev: str, done: bool) -> list[str]:
    """Remove the per-revision children of other revisions: at once for a Job still
    running (its revision is no longer asked for: free the GPUs), and everything once
    the current revision is done. Returns what was deleted ("Kind/name")."""
    deleted = []
    for k in children.REVISION_KINDS:
        for obj in kube.list(k.api_version, k.kind, job.metadata.namespace, {LABEL_JOB: job.metadata.name}):
            labels = obj["metadata"].get("labels") or {}
            other = labels.get(LABEL_REVISION)
            if not other or other == rev:
                continue
            if done or (k.kind == "Job" and not _finished_job(obj)):
                if kube.delete(k.api_version, k.kind, job.metadata.namespace, obj["metadata"]["name"]):
                    deleted.append(f"{k.kind}/{obj['metadata']['name']}")
    return deleted


def cleanup_artifacts(body: dict[str, Any], kube: Kube, settings: OperatorSettings) -> StageOutcome:
    """Ensure the cleanup Job of a FineTuneJob being deleted; its outcome so far."""
    job = FineTuneJob.from_body({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body})
    obj = stage_jobs.cleanup_job(job, settings)
    if kube.ensure(obj):
        metrics.CHILDREN_CREATED.labels(kind="Job").inc()
        log.info("created cleanup Job %s/%s", job.metadata.namespace, obj["metadata"]["name"])
    current = kube.get("batch/v1", "Job", job.metadata.namespace, obj["metadata"]["name"])
    pods = kube.list_pods(job.metadata.namespace, selector_labels(job, "cleanup")) if current else []
    return job_outcome(current, pods)


def reconcile(
    body: dict[str, Any],
    kube: Kube,
    settings: OperatorSettings,
    emit: EventFn,
) -> Optional[dict[str, Any]]:
    """Returns the status merge patch (None: nothing to change)."""
    started = time.monotonic()
    try:
        return _reconcile(body, kube, settings, emit)
    except Exception as e:
        metrics.RECONCILE_ERRORS.labels(error=type(e).__name__).inc()
        raise
    finally:
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)


# The phase this process last recorded per FineTuneJob uid. kopf hands timers
# the body from its watch stream, which can lag our own status patch by a
# moment: this keeps a lagging body from repeating an Event or a transition.
_recorded: dict[str, str] = {}


def _reconcile(body: dict[str, Any], kube: Kube, settings: OperatorSettings, emit: EventFn) -> Optional[dict[str, Any]]:
    meta = body.get("metadata") or {}
    uid = meta.get("uid", "")
    if meta.get("deletionTimestamp"):
        _recorded.pop(uid, None)
        return None
    status = dict(body.get("status") or {})
    phase = status.get("phase") or _recorded.get(uid)
    generation = meta.get("generation")
    metrics.observe_phase(uid, phase or "Pending")
    try:
        # Only metadata and spec: status belongs to the observers, and a field
        # a newer trainer writes must not stop the reconcile.
        job = FineTuneJob.from_body({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body})
    except ValidationError as e:
        # The API server admitted it (CEL/OpenAPI), the operator's model did not:
        # say so once instead of retrying forever.
        message = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())[:2000]
        return _refuse(status, uid, generation, "InvalidSpec", message, emit, phase)
    refused = stages.refusals(job.spec)
    if refused:
        # A CRD older than this operator let in what no stage can do: refuse before any work.
        return _refuse(status, uid, generation, "UnsupportedSpec", "; ".join(refused)[:2000], emit, phase)
    # A job admitted while no TenantPolicy covered its namespace (docs/multi-tenancy.md):
    # refused before any work, in the words the API server would have used.
    violation = tenancy.refusal(job, *tenancy.read(kube, job.metadata.namespace))
    if violation:
        return _refuse(status, uid, generation, "PolicyViolation", violation, emit, phase)
    if not phase:
        _record(uid, "Pending", emit, "Normal", "Pending", "accepted; validation starts next", phase)
        # With the summary conditions from the first write: kstatus (Flux) reads an object without
        # them as Current, which would let a pipeline pass before anything ran.
        return lifecycle.status_update(status, lifecycle.Decision("Pending", "accepted"), generation, now())

    rev = revisions.of(job)
    decision = lifecycle.decide(job, observe(kube, job, revisions.finished_stages(status, rev)),
                                restarts=revisions.restarts(status, rev))
    if decision.restart:
        # Delete the failed gang's Job (its pods go with it); the next pass creates it again,
        # and the trainer resumes from the newest complete checkpoint in S3.
        kube.delete("batch/v1", "Job", job.metadata.namespace, names.stage_job(job.metadata.name, decision.restart, rev))
        emit("Warning", "GangRestarted", decision.message)
    if decision.create:
        missing = preflight.check(kube, job, queued=stages.BY_NAME[decision.create].queued)
        if missing is not None:
            decision = lifecycle.stall(decision, missing.reason, missing.message)
    # Does the revision that served so far still answer (while another one is asked for)?
    serving_rev = status.get("servingRevision")
    serving_now = bool(job.spec.serving.enabled and serving_rev and serving_rev != rev
                       and still_serving(kube, job, status))
    try:
        decision, may_act = canary.step(kube, job, status, rev, decision, settings, serving_now, emit)
        if may_act:
            act(kube, job, decision, settings)
    except ApiException as e:
        if e.status is None or e.status >= 500 or e.status in (409, 429):
            emit("Warning", "ApiCallFailed", f"{e.status} {e.reason}: will retry")
            raise  # transient: kopf retries the handler
        # The API server refuses a child (quota, admission policy, LimitRange): a person must act.
        message = f"the API server refused a child: {_api_message(e)}"
        emit("Warning", "ChildRejected", message)
        decision = lifecycle.stall(decision, "ChildRejected", message)
    decision = rollout(job, status, rev, decision, emit, serving_now)
    retire_old_serving(kube, job, status, decision, emit)
    if any(r.get("id") != rev for r in status.get("revisions") or []):
        for name in prune(kube, job, rev, done=decision.phase in lifecycle.DONE_PHASES):
            emit("Normal", "SupersededChildDeleted", f"{name} of an earlier revision deleted")
    patch = lifecycle.status_update(status, decision, generation, now(), rev)
    _record(uid, decision.phase, emit, "Warning" if decision.failed else "Normal", decision.phase, decision.message, phase)
    was = next((c for c in status.get("conditions") or [] if c.get("type") == "Stalled"), {})
    if decision.stalled and not decision.failed and (was.get("status") != "True" or was.get("reason") != decision.stalled):
        emit("Warning", decision.stalled, decision.message)  # once, when the job gets stuck for this reason
    if _unchanged(status, patch):
        return None
    return patch


def rollout(job: FineTuneJob, status: dict[str, Any], rev: str, decision: lifecycle.Decision, emit: EventFn,
            serving_now: bool) -> lifecycle.Decision:
    """Blue/green between revisions: the revision serving now keeps the traffic until the one the spec
    asks for serves (lifecycle.keep_serving), and never loses it to one that fails. `serving_now`: the
    serving revision (another than `rev`) still answers (still_serving)."""
    if not job.spec.serving.enabled:
        return decision
    serving_rev = status.get("servingRevision")
    if decision.phase == "Serving":
        return lifecycle.promoted(decision, rev, serving_rev)
    if not serving_rev or serving_rev == rev:
        return decision
    if not serving_now:
        # The revision that served stopped answering while this one is built: say so, and send no client
        # to it (the endpoint and the serving revision go).
        return lifecycle.not_serving(decision, serving_rev, rev)
    kept = lifecycle.keep_serving(decision, serving_rev, rev, status.get("endpoint") or stages.endpoint(job))
    was = get_condition(status.get("conditions") or [], "Promoted") or {}
    if kept.held_back and was.get("reason") != kept.conditions[-1][2]:
        emit("Warning", "RevisionHeldBack", kept.message)  # once, when it is held back
    return kept


def still_serving(kube: Kube, job: FineTuneJob, status: dict[str, Any]) -> bool:
    """Whether the way the job served so far still answers: a Ready replica of its merged server, or its
    adapter loaded on a Ready shared server."""
    ns = job.metadata.namespace
    joined = status.get("adapterServer")
    if joined:
        server = kube.get(API_VERSION, "AdapterServer", ns, joined) or {}
        model = (status.get("endpoint") or {}).get("model") or serving.served_model_name(job)
        line = ((server.get("status") or {}).get("adapters") or {}).get(model) or {}
        ready = get_condition((server.get("status") or {}).get("conditions") or [], "Ready") or {}
        return bool(line.get("servedUri")) and ready.get("status") == "True"
    dep = kube.get("apps/v1", "Deployment", ns, names.serving(job.metadata.name))
    return bool(dep and ((dep.get("status") or {}).get("readyReplicas") or 0) >= 1)


def retire_old_serving(kube: Kube, job: FineTuneJob, status: dict[str, Any], decision: lifecycle.Decision,
                       emit: EventFn) -> None:
    """The way the job served before goes once the way its spec asks for serves (or at once when
    serving is switched off): merged mode's own server after a switch to adapter mode, the job's
    entry on a shared server after a switch to merged mode or to another server."""
    off = not job.spec.serving.enabled
    if not (off or (decision.phase == "Serving" and not decision.serving_revision)):
        return
    ns = job.metadata.namespace
    joined = status.get("adapterServer")
    if joined and joined != adapter_servers.wanted_server(job):
        # Its entry and owner reference there go; the server pass does the rest (another job's
        # adapters stay, a server left without adapters is deleted).
        server = kube.get(API_VERSION, "AdapterServer", ns, joined)
        if server is not None and set(adapter_servers.owners(server)) <= {job.metadata.name}:
            # Its last job: leaving would remove the shared fields it alone applied (an invalid object).
            kube.delete(API_VERSION, "AdapterServer", ns, joined)
        elif server is not None:
            kube.leave(adapter_servers.leave_intent(joined, ns), job.metadata.uid or "")
        if "adapterServer" not in decision.status:
            decision.status["adapterServer"] = None
        emit("Normal", "LeftAdapterServer", f"the adapter no longer serves on the shared server {joined}")
    if off or job.spec.serving.mode != "merged":
        name = names.serving(job.metadata.name)
        dep = kube.get("apps/v1", "Deployment", ns, name)
        if dep is not None and ((dep["metadata"].get("labels") or {}).get(LABEL_JOB) == job.metadata.name):
            # The Deployment last: while it exists, this pass runs again on a later one.
            kube.delete("v1", "ConfigMap", ns, serving.auth_config_map_name(job))  # with an API key
            for api_version, kind in serving.MERGED_KINDS:
                kube.delete(api_version, kind, ns, name)
            emit("Normal", "ServingRetired", f"merged-mode serving ({name}) removed")


def _api_message(e: ApiException) -> str:
    try:
        return json.loads(e.body)["message"][:1500]
    except (TypeError, ValueError, KeyError):
        return f"{e.status} {e.reason}"


def _refuse(status: dict[str, Any], uid: str, generation: Optional[int], reason: str, message: str, emit: EventFn,
            phase: Optional[str]) -> dict[str, Any]:
    """Failed and Stalled for a spec the operator cannot act on; an edit that fixes it recovers."""
    _record(uid, "Failed", emit, "Warning", reason, message, phase)
    decision = lifecycle.Decision("Failed", message, stalled=reason)
    return lifecycle.status_update(status, decision, generation, now())


def _record(uid: str, phase: str, emit: EventFn, type_: str, reason: str, message: str, previous: Optional[str]) -> None:
    """An Event and metrics for a transition, once per transition per process."""
    if phase == previous or _recorded.get(uid) == phase:
        return
    _recorded[uid] = phase
    metrics.TRANSITIONS.labels(phase=phase).inc()
    metrics.observe_phase(uid, phase)
    emit(type_, reason, message)


def _unchanged(status: dict[str, Any], patch: dict[str, Any]) -> bool:
    for key, value in patch.items():
        if key in ("startTime", "completionTime"):
            continue
        current = status.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            if any(current.get(k) != v for k, v in value.items()):
                return False
        elif current != value:
            return False
    return True


# ---------------------------------------------------------------- adapter mode's shared servers


def reconcile_server(server: dict[str, Any], kube: Kube, settings: OperatorSettings) -> Optional[dict[str, Any]]:
    """One pass over an AdapterServer: prune entries of departed jobs, delete a server left without
    adapters, apply its children for the adapters it carries. Returns its status merge patch (None:
    nothing to change, or the pass changed the object itself and its watch event brings the next)."""
    meta = server["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp"):
        return None
    ops = adapter_servers.prune_patch(server)
    if ops:
        if kube.json_patch(API_VERSION, "AdapterServer", ns, name, ops):
            log.info("adapter server %s/%s: removed the entries of departed jobs", ns, name)
        return None
    if not adapter_servers.live_adapters(server):
        # Its last job left (serving off, merged mode, another base model): its children go with it
        # (garbage collection). A server whose jobs were all deleted is the collector's own work.
        if kube.delete(API_VERSION, "AdapterServer", ns, name):
            log.info("adapter server %s/%s: no adapters left, deleted", ns, name)
        return None
    for obj in adapter_servers.server_objects(server, settings):
        if kube.ensure(obj):
            metrics.CHILDREN_CREATED.labels(kind=obj["kind"]).inc()
            log.info("applied %s %s/%s", obj["kind"], ns, obj["metadata"]["name"])
    deployment = kube.get("apps/v1", "Deployment", ns, name)
    pods = kube.list_pods(ns, {adapter_servers.LABEL_SERVER: name}) if deployment else []
    outcome = deployment_outcome(deployment, pods, settings.serving_max_restarts)
    current = server.get("status") or {}
    patch = adapter_servers.server_status(server, outcome, settings, current.get("conditions"))
    return None if _unchanged(current, patch) else patch
