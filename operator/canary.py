"""A weighted canary between revisions through a Gateway API HTTPRoute (spec.serving.canary, merged mode).

Without a canary, a new revision that passed its gate replaces the serving one pod by pod. With one, once
the new revision reaches the serve stage while the old one serves:

1. the new revision gets a Deployment of one replica and a Service of its own (`<job>-canary`), and the
   job's HTTPRoute sends `weight` percent of the requests to it;
2. it must stay healthy for `durationSeconds` after it first served its share (a resync brings the pass
   that promotes it);
3. then the serving Deployment rolls to it (as without a canary) and the canary goes; the route sends
   everything to the serving Service again;
4. a canary that fails (crash loop, refused artifact, progress deadline) is removed, the route goes back
   to the serving revision, and the revision is held back (`Promoted=False CanaryFailed`) until a new edit.

`step` runs in the reconcile pass between decide and act, and says whether act may go on.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, Callable

from . import lifecycle, names, serving
from .api import FineTuneJob
from .conditions import now
from .outcomes import deployment_outcome
from .pods import selector_labels
from .settings import OperatorSettings

if TYPE_CHECKING:
    from .kube import Kube

EventFn = Callable[[str, str, str], None]


def _seconds_since(timestamp: str, current: str) -> int:
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return int((dt.datetime.strptime(current, fmt) - dt.datetime.strptime(timestamp, fmt)).total_seconds())


def _remove(kube: "Kube", job: FineTuneJob, route: bool = False) -> None:
    ns = job.metadata.namespace
    kube.delete("apps/v1", "Deployment", ns, names.canary(job.metadata.name))
    kube.delete("v1", "Service", ns, names.canary(job.metadata.name))
    if route:
        kube.delete(f"{serving.GATEWAY_API}/v1", "HTTPRoute", ns, names.serving(job.metadata.name))


def _serve_condition(decision: lifecycle.Decision, phase: str, reason: str, message: str) -> lifecycle.Decision:
    """The decision with the serve stage's condition (the last one) and message replaced; nothing to create."""
    conditions = list(decision.conditions)
    conditions[-1] = (conditions[-1][0], "False", reason, message)
    return lifecycle.Decision(phase, message, conditions, status=decision.status, current=decision.current,
                              finished=decision.finished)


def step(kube: "Kube", job: FineTuneJob, status: dict[str, Any], rev: str, decision: lifecycle.Decision,
         settings: OperatorSettings, serving_now: bool, emit: EventFn) -> tuple[lifecycle.Decision, bool]:
    """(decision, whether act may apply the serve stage's children this pass). `serving_now`: the serving
    revision still answers (reconcile.still_serving)."""
    c = job.spec.serving.canary
    record = status.get("canary") or {}
    if c is None:
        if record:  # the setting was removed: its route and any canary go
            _remove(kube, job, route=True)
            decision.status["canary"] = None
        return decision, True
    if job.spec.serving.mode != "merged" or decision.current != "serve" or decision.failed or decision.stalled:
        return decision, True
    serving_rev = status.get("servingRevision")
    if not serving_rev or serving_rev == rev or not serving_now:
        return decision, True  # nothing serves to compare with: the plain rollout
    mine = record if record.get("revision") == rev else {}
    if mine.get("state") == "Promoted":
        return decision, True  # the serving Deployment rolls to it
    if mine.get("state") == "Failed":
        return _serve_condition(decision, "Failed", "CanaryFailed", mine.get("message") or "canary failed"), False
    if kube.preferred_version(serving.GATEWAY_API) is None:
        return lifecycle.stall(decision, "GatewayAPIMissing",
                               "serving.canary needs the Gateway API (HTTPRoute) in the cluster: install its CRDs, "
                               "or remove serving.canary to roll out without a canary"), False
    for obj in serving.canary_objects(job, settings) + [serving.http_route(job, c.weight)]:
        kube.ensure(obj)
    ns = job.metadata.namespace
    dep = kube.get("apps/v1", "Deployment", ns, names.canary(job.metadata.name))
    pods = kube.list_pods(ns, selector_labels(job, serving.CANARY_STAGE)) if dep else []
    outcome = deployment_outcome(dep, pods, settings.serving_max_restarts)
    # readySince is always written (None clears it): status is merge-patched, and a new revision's
    # record would otherwise keep the last revision's readySince and be promoted on its first pass.
    line = {"revision": rev, "weight": c.weight, "readySince": None}
    if outcome.state == "failed":
        _remove(kube, job)
        kube.ensure(serving.http_route(job))  # every request to the serving revision again
        message = f"canary of revision {rev} failed ({outcome.reason}): {outcome.message}"
        emit("Warning", "CanaryFailed", message)
        decision.status["canary"] = {**line, "state": "Failed", "message": message[:4000]}
        return _serve_condition(decision, "Failed", "CanaryFailed", message), False
    if outcome.state != "succeeded":
        message = f"canary of revision {rev} starting: {outcome.message or outcome.reason}"
        decision.status["canary"] = {**line, "state": "Starting", "message": message[:4000]}
        return _serve_condition(decision, "Deploying", "CanaryStarting", message), False
    current = now()
    since = mine.get("readySince") or current
    elapsed = _seconds_since(since, current)
    if elapsed < c.duration_seconds:
        message = (f"canary of revision {rev} takes {c.weight}% of the requests: healthy for {elapsed}s of "
                   f"{c.duration_seconds}s")
        decision.status["canary"] = {**line, "state": "Running", "readySince": since, "message": message}
        return _serve_condition(decision, "Deploying", "CanaryRunning", message), False
    _remove(kube, job)  # act puts the route back to the serving Service, which now rolls to this revision
    message = f"canary of revision {rev} healthy for {c.duration_seconds}s at {c.weight}%: promoted"
    emit("Normal", "CanaryPromoted", message)
    decision.status["canary"] = {**line, "state": "Promoted", "readySince": since, "message": message}
    return decision, True
