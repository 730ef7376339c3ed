"""Prometheus metrics of the operator (served on settings.metrics_port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from .stages import phases

JOBS = Gauge("kubetune_finetunejobs", "FineTuneJobs by phase (as last reconciled)", ["phase"])
RECONCILE_SECONDS = Histogram(
    "kubetune_reconcile_duration_seconds", "Time of one reconcile of one FineTuneJob",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = Counter("kubetune_reconcile_errors_total", "Reconciles that raised", ["error"])
CHILDREN_CREATED = Counter("kubetune_children_created_total", "Child objects created", ["kind"])
TRANSITIONS = Counter("kubetune_phase_transitions_total", "Phase transitions", ["phase"])

# uid -> phase, so the gauge counts each job once.
_phases: dict[str, str] = {}


def observe_phase(uid: str, phase: str) -> None:
    _phases[uid] = phase
    _refresh()


def forget(uid: str) -> None:
    _phases.pop(uid, None)
    _refresh()


def _refresh() -> None:
    for phase in phases():
        JOBS.labels(phase=phase).set(sum(1 for p in _phases.values() if p == phase))
