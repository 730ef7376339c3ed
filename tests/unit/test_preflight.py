"""Pre-flight checks (operator/preflight.py) as a decision table over what the cluster has.

The cluster suites show ServiceAccountNotFound and LocalQueueNotFound on the real
control plane; Kueue is installed there for the whole session once its suite runs,
so the "not installed" row is shown here against an in-memory view of the API."""

from __future__ import annotations

import pytest

from kubetune.operator import preflight
from kubetune.operator.api import FineTuneJob

from .jobs import job


class ClusterView:
    """What the API server would answer: existing objects and served API groups."""

    def __init__(self, objects=(), groups=()):
        self.objects = set(objects)
        self.groups = dict(groups)

    def get(self, api_version, kind, namespace, name):
        return {"kind": kind} if (kind, namespace, name) in self.objects else None

    def preferred_version(self, group):
        return self.groups.get(group)

    def get_custom(self, group, version, plural, namespace, name):
        return {} if ("LocalQueue", namespace, name) in self.objects else None


QUEUED = FineTuneJob.from_body(job(resources={"queueName": "team-q"}))
IRSA = FineTuneJob.from_body(job(storage={"serviceAccountName": "irsa"}))


@pytest.mark.parametrize("ftj, view, queued, reason", [
    (QUEUED, ClusterView(), True, "KueueNotInstalled"),
    (QUEUED, ClusterView(groups={"kueue.x-k8s.io": "v1beta2"}), True, "LocalQueueNotFound"),
    (QUEUED, ClusterView({("LocalQueue", "tenant-a", "team-q")}, {"kueue.x-k8s.io": "v1beta2"}), True, None),
    (QUEUED, ClusterView(), False, None),  # validation is never queued: Kueue does not matter to it
    (IRSA, ClusterView(), False, "ServiceAccountNotFound"),
    (IRSA, ClusterView({("ServiceAccount", "tenant-a", "irsa")}), False, None),
])
def test_the_first_missing_prerequisite_is_named(ftj, view, queued, reason):
    missing = preflight.check(view, ftj, queued=queued)
    assert (missing.reason if missing else None) == reason
    if missing:
        assert "tenant-a/" in missing.message or "Kueue" in missing.message
