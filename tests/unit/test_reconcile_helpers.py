"""The reconciler's bookkeeping: one Event per transition, no-op patches skipped,
children of each stage in creation order."""

from kubetune.operator import reconcile, stages
from kubetune.operator.api import FineTuneJob
from kubetune.operator.settings import OperatorSettings

from .jobs import job


def test_each_transition_is_announced_once_even_with_a_lagging_body():
    events = []
    emit = lambda t, r, m: events.append((t, r))  # noqa: E731
    reconcile._recorded.clear()
    reconcile._record("u1", "Validating", emit, "Normal", "Validating", "", previous="Pending")
    # The next timer run still sees the old phase in its (lagging) body.
    reconcile._record("u1", "Validating", emit, "Normal", "Validating", "", previous="Pending")
    reconcile._record("u1", "Training", emit, "Normal", "Training", "", previous="Validating")
    reconcile._record("u1", "Training", emit, "Normal", "Training", "", previous="Training")
    reconcile._record("u2", "Validating", emit, "Normal", "Validating", "", previous="Pending")
    assert events == [("Normal", "Validating"), ("Normal", "Training"), ("Normal", "Validating")]


def test_unchanged_status_needs_no_patch():
    status = {"phase": "Training", "progress": {"step": 3, "percent": 30}, "startTime": "t0"}
    assert reconcile._unchanged(status, {"phase": "Training", "progress": {"percent": 30}, "startTime": "t1"})
    assert not reconcile._unchanged(status, {"phase": "Merging"})
    assert not reconcile._unchanged(status, {"progress": {"percent": 40}})


def test_stage_children_order_shared_objects_first():
    kinds = [o["kind"] for o in stages.TRAIN.build(FineTuneJob.from_body(job()), OperatorSettings())]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service", "Job"]
    serve = [o["kind"] for o in stages.SERVE.build(FineTuneJob.from_body(job()), OperatorSettings())]
    # Serving's guards after the Deployment and Service (operator/serving.py).
    assert serve == ["Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"]
