"""kopf registration: settings once at startup, and watch handlers that only
say *which* FineTuneJob needs a reconcile; `triggers.ReconcileQueue` runs the
reconciles, one at a time per FineTuneJob. Thin on purpose; the logic lives
in lifecycle.py (pure) and reconcile.py (I/O).

What triggers a FineTuneJob's reconcile:
- any watch event of the FineTuneJob itself (create, spec edit, a trainer's
  progress patch), except those of the status our own passes wrote;
- watch events of its Jobs, their Pods and its Deployment (server-side
  filtered on the `kubetune.io/job` label, which names the owner) that can
  change what a pass decides (`triggers.ChildSignals`);
- in adapter mode, any event of its shared AdapterServer (whose own pass,
  a second queue keyed by the server, is triggered by the server's events
  and its Deployment's);
- a resync `reconcile_interval` after each pass: the slow safety net.
With `reconcile_on_events` off, only the FineTuneJob's first sighting and the
resync do, which is how the operator behaved before (a 10 s kopf timer).

No finalizer unless a deletion needs one. kopf puts its finalizer on every
object that has a timer or daemon (they are stopped on deletion), or a
non-optional on.delete handler whose filters match; with one on the object,
`kubectl delete` and namespace deletion hang while the operator is down. So:
no kopf timer (the resync lives in the queue), on.event for what used to be
an optional on.delete, and the only on.delete handler is filtered to specs
with `output.deleteOnJobDeletion`, which really must run before the object
goes (kopf adds or removes the finalizer as that field changes).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.contract.facts import API_VERSION, GROUP, LABEL_JOB, LABEL_MANAGED_BY, MANAGED_BY, PLURAL, VERSION

from . import adapter_servers, metrics, triggers
from .api.adapterserver import KIND as SERVER_KIND
from .api.adapterserver import PLURAL as SERVER_PLURAL
from .children import KINDS
from .essence import LeanDiffBaseStorage, LeanProgressStorage
from .kube import ChildConflict, Kube, load_config
from .reconcile import cleanup_artifacts, reconcile, reconcile_server
from .settings import OperatorSettings

SETTINGS = OperatorSettings.from_env()
log = logging.getLogger("kubetune.operator")
_kube: Optional[Kube] = None
_queue: Optional[triggers.ReconcileQueue] = None
_servers: Optional[triggers.ReconcileQueue] = None  # adapter mode's shared servers, by (namespace, name)

# Children whose changes decide a FineTuneJob's next step: the kinds the children
# table marks `watch` (Jobs, the Deployment), plus the Pods of the stage Jobs
# (stuck waiting reasons, Unschedulable, failures: the Job object itself does
# not change for those).
WATCHED: tuple[tuple[str, str], ...] = (
    *((k.api_version, k.plural) for k in KINDS if k.watch and not k.shared),
    ("v1", "pods"),
)
# The server-side label filter per watched kind: a job's children carry its name; Deployments are
# also a shared adapter server's (labelled with the server, not a job), so for them the filter is
# the label every child of the operator carries, and the handlers tell the two apart.
SELECTORS: dict[str, str] = {"deployments": f"{LABEL_MANAGED_BY}={MANAGED_BY}"}


def _client() -> Kube:
    global _kube
    if _kube is None:
        load_config()
        _kube = Kube()
    return _kube


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _queue, _servers
    # Everything kopf stores on our objects lives under our own prefix.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = LeanProgressStorage(prefix=GROUP)
    # The same annotations as kopf's own storages, built with less copying (essence.py).
    settings.persistence.diffbase_storage = LeanDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    settings.watching.server_timeout = SETTINGS.watch_server_timeout
    settings.watching.client_timeout = SETTINGS.watch_client_timeout
    settings.watching.connect_timeout = 30
    # Only the operator's children, filtered by the API server: without this kopf
    # would list and watch every Pod, Job and Deployment in the watched namespaces.
    for api_version, plural in WATCHED:
        settings.watching.label_selectors[api_version, plural] = SELECTORS.get(plural, LABEL_JOB)
    # kopf turns log lines of this level and above into Events on the object;
    # our transitions are posted explicitly (kopf.event), so only warnings go.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 8
    settings.execution.default_backoff = max(1.0, SETTINGS.cleanup_poll_interval)
    if SETTINGS.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(SETTINGS.metrics_port)
    _client()
    _queue = triggers.ReconcileQueue(
        _reconcile_pass, resync=SETTINGS.reconcile_interval, workers=SETTINGS.reconcile_workers,
        # Timer-only (the behaviour before events): one pass per interval, nothing in between.
        requeue_on_write=SETTINGS.reconcile_on_events,
    )
    _servers = triggers.ReconcileQueue(_server_pass, resync=SETTINGS.reconcile_interval, workers=2,
                                       requeue_on_write=False)
    log.info("reconciles: %s, resync every %.1fs", "on events" if SETTINGS.reconcile_on_events else "timer only",
             SETTINGS.reconcile_interval)


@kopf.on.cleanup()
async def stop_queue(**_: Any) -> None:
    for queue in (_queue, _servers):
        if queue is not None:
            await queue.close()


def _reconcile_pass(key: triggers.Key) -> triggers.Pass:
    """One reconcile of one FineTuneJob, run by the queue (never two at once for a key).

    The FineTuneJob is read afresh here rather than taken from a watch event:
    events of children and of the FineTuneJob arrive on separate streams, and a
    body from any of them may predate the status the previous pass wrote."""
    namespace, name = key
    kube = _Announcing(_client())
    custom = client.CustomObjectsApi(kube.api)
    try:
        body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return triggers.Pass(exists=False)
        raise

    def emit(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message[:1024])

    try:
        status = reconcile(body, kube, SETTINGS, emit)
    except ChildConflict as e:
        emit("Warning", "ChildConflict", str(e))
        raise triggers.RetryLater(str(e), delay=30) from None
    if not status:
        return triggers.Pass(announced=kube.announced)
    # resourceVersion as a precondition: the status is written only onto the very
    # object it was computed from. A trainer's progress patch or a spec edit in
    # between is a 409, and the pass runs again on the newer object.
    patch = {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]}, "status": status}
    try:
        out = custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, patch)
    except ApiException as e:
        if e.status == 404:
            return triggers.Pass(exists=False)
        if e.status == 409:
            raise triggers.RetryLater("the FineTuneJob changed during the pass", delay=0) from None
        raise
    return triggers.Pass(wrote=out["metadata"]["resourceVersion"], announced=kube.announced,
                         transition="phase" in status and status["phase"] != (body.get("status") or {}).get("phase"))


def _server_pass(key: triggers.Key) -> triggers.Pass:
    """One pass over a shared adapter server (reconcile.reconcile_server), read afresh."""
    namespace, name = key
    kube = _client()
    server = kube.get(API_VERSION, SERVER_KIND, namespace, name)
    if server is None:
        return triggers.Pass(exists=False)
    status = reconcile_server(server, kube, SETTINGS)
    if not status:
        return triggers.Pass()
    try:
        kube.patch_status(API_VERSION, SERVER_KIND, namespace, name, status)
    except ApiException as e:
        if e.status == 404:
            return triggers.Pass(exists=False)
        raise
    return triggers.Pass()


class _Announcing:
    """The pass's Kube, noting whether a write touched a watched child kind (whose
    watch event will then trigger the next pass: triggers.Pass.announced)."""

    _WATCHED_KINDS = frozenset((k.api_version, k.kind) for k in KINDS if k.watch)

    def __init__(self, kube: Kube):
        self._kube = kube
        self.announced = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kube, name)

    def ensure(self, obj: dict[str, Any]) -> bool:
        changed = self._kube.ensure(obj)
        if changed and (obj.get("apiVersion"), obj.get("kind")) in self._WATCHED_KINDS:
            self.announced = True
        return changed

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        deleted = self._kube.delete(api_version, kind, namespace, name)
        if deleted and (api_version, kind) in self._WATCHED_KINDS:
            self.announced = True
        return deleted


@kopf.on.event(GROUP, VERSION, PLURAL)
async def finetunejob_changed(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    key = triggers.key_of(body)
    if event.get("type") == "DELETED":
        metrics.forget(body.metadata.uid or "")
        _queue.forget(key)
        return
    if not SETTINGS.reconcile_on_events and _queue.known(key):
        return  # timer-only: the resync alone drives a job once seen
    _queue.trigger(key, "finetunejob", resource_version=body.metadata.get("resourceVersion"))


_signals = triggers.ChildSignals()


async def child_changed(event: kopf.RawEvent, body: kopf.Body, resource: kopf.Resource, **_: Any) -> None:
    key = triggers.owner_key(body)
    if key is not None and _signals.changed(resource.plural, body, deleted=event.get("type") == "DELETED"):
        _queue.trigger(key, resource.plural)


if SETTINGS.reconcile_on_events:
    for _api_version, _plural in WATCHED:
        kopf.on.event(_api_version, _plural, labels={LABEL_JOB: kopf.PRESENT}, id=f"child_changed/{_plural}")(child_changed)


@kopf.on.event(GROUP, VERSION, SERVER_PLURAL)
async def adapter_server_changed(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """A shared server changed (a job joined or left, a sidecar reported an adapter, its own status):
    the server's pass runs, and so do its jobs' (they read its status)."""
    key = triggers.key_of(body)
    if event.get("type") == "DELETED":
        _servers.forget(key)
    else:
        _servers.trigger(key, SERVER_PLURAL)
    for job in adapter_servers.owners(body):
        _queue.trigger((key[0], job), SERVER_PLURAL)


@kopf.on.event("apps/v1", "deployments", labels={adapter_servers.LABEL_SERVER: kopf.PRESENT})
async def server_deployment_changed(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """A shared server's Deployment rolled out, lost a replica, failed: its server's status follows."""
    meta = body.get("metadata") or {}
    _servers.trigger((meta.get("namespace") or "", (meta.get("labels") or {})[adapter_servers.LABEL_SERVER]),
                     "deployments")


def _deletes_artifacts(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("output") or {}).get("deleteOnJobDeletion"))


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_deletes_artifacts)
def delete_artifacts(body: kopf.Body, **_: Any) -> None:
    """Hold the deletion (kopf's finalizer, on these FineTuneJobs only) until the
    cleanup Job has emptied spec.output.uri; then the children go by garbage
    collection as usual."""
    outcome = cleanup_artifacts(dict(body), _client(), SETTINGS)
    if outcome.state == "succeeded":
        kopf.event(body, type="Normal", reason="ArtifactsDeleted", message=outcome.message or "artifacts deleted")
        return
    if outcome.state == "failed":
        kopf.event(body, type="Warning", reason="ArtifactCleanupFailed", message=outcome.message[:1024])
        # Permanent: the object goes anyway; the failed cleanup Job stays for inspection.
        raise kopf.PermanentError(f"artifact cleanup failed: {outcome.message}")
    # Polled, not evented: kopf runs a delayed handler no sooner than its delay,
    # whatever event arrives, so the cleanup Job's events cannot hurry it.
    raise kopf.TemporaryError("waiting for the artifact cleanup Job", delay=SETTINGS.cleanup_poll_interval)


@kopf.on.probe(id="reconcile_interval")
def probe(**_: Any) -> float:
    return SETTINGS.reconcile_interval
