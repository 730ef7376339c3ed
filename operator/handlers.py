"""kopf registration: settings once at startup, one level-based timer per
FineTuneJob that calls the reconciler. Thin on purpose; the logic lives in
lifecycle.py (pure) and reconcile.py (I/O)."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from . import metrics
from kubetune.contract.facts import GROUP, PLURAL, VERSION
from .kube import ChildConflict, Kube, load_config
from .reconcile import cleanup_artifacts, reconcile
from .settings import OperatorSettings

SETTINGS = OperatorSettings.from_env()
_kube: Kube | None = None


def _client() -> Kube:
    global _kube
    if _kube is None:
        load_config()
        _kube = Kube()
    return _kube


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Everything kopf stores on our objects lives under our own prefix.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.watching.server_timeout = SETTINGS.watch_server_timeout
    settings.watching.client_timeout = SETTINGS.watch_client_timeout
    settings.watching.connect_timeout = 30
    # kopf turns log lines of this level and above into Events on the object;
    # our transitions are posted explicitly (kopf.event), so only warnings go.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 8
    # A failed reconcile is retried soon: it is idempotent.
    settings.execution.default_backoff = max(1.0, SETTINGS.reconcile_interval)
    if SETTINGS.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(SETTINGS.metrics_port)
    _client()


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.reconcile_interval, sharp=False,
            backoff=max(1.0, SETTINGS.reconcile_interval))
def reconcile_timer(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, **_: Any) -> None:
    def emit(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message[:1024])

    try:
        status = reconcile(dict(body), _client(), SETTINGS, emit)
    except ChildConflict as e:
        emit("Warning", "ChildConflict", str(e))
        raise kopf.TemporaryError(str(e), delay=30) from None
    if status:
        patch.status.update(status)


def _deletes_artifacts(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("output") or {}).get("deleteOnJobDeletion"))


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_deletes_artifacts)
def delete_artifacts(body: kopf.Body, **_: Any) -> None:
    """Hold the deletion (kopf's finalizer) until the cleanup Job has emptied
    spec.output.uri; then the children go by garbage collection as usual."""
    outcome = cleanup_artifacts(dict(body), _client(), SETTINGS)
    if outcome.state == "succeeded":
        kopf.event(body, type="Normal", reason="ArtifactsDeleted", message=outcome.message or "artifacts deleted")
        return
    if outcome.state == "failed":
        kopf.event(body, type="Warning", reason="ArtifactCleanupFailed", message=outcome.message[:1024])
        # Permanent: the object goes anyway; the failed cleanup Job stays for inspection.
        raise kopf.PermanentError(f"artifact cleanup failed: {outcome.message}")
    raise kopf.TemporaryError("waiting for the artifact cleanup Job", delay=max(1.0, SETTINGS.reconcile_interval))


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def forget(body: kopf.Body, **_: Any) -> None:
    # No finalizer (optional=True): children go by garbage collection, S3
    # artifacts stay. Only the metrics forget the job.
    metrics.forget(body.metadata.uid or "")


@kopf.on.probe(id="reconcile_interval")
def probe(**_: Any) -> float:
    return SETTINGS.reconcile_interval
