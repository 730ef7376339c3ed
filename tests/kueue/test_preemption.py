"""Preemption and sharing as the harness configures Kueue (fair sharing on): a
WorkloadPriorityClass preempts within a ClusterQueue, and a cohort lends an
idle tenant's quota to a busy one and takes it back."""

from __future__ import annotations

import pytest

from kubetune.devcluster.cluster import RESTRICTED_LABELS, wait_for
from kubetune.devcluster.jobs import gpu_job, is_suspended, job_pods, wait_job_finished
from kubetune.devcluster.queues import condition, is_true

from .support import LONG, SHORT

pytestmark = pytest.mark.cluster


def _evicted_and_requeued(workload) -> bool:
    return is_true(workload, "Evicted") and not is_true(workload, "Admitted") and not is_true(workload, "QuotaReserved")


def test_a_higher_priority_job_preempts_a_lower_one_which_goes_back_to_the_queue(
    namespace, gpu_nodes, kueue_queues, apis
):
    core, batch = apis
    gpu_nodes(gpus=8)
    flavor = kueue_queues.resource_flavor("gpu")
    cluster_queue = kueue_queues.cluster_queue(flavor, gpus=8, preemption={"withinClusterQueue": "LowerPriority"})
    queue = kueue_queues.local_queue(namespace, cluster_queue)
    low, high = kueue_queues.priority_class(100, "low"), kueue_queues.priority_class(1000, "high")

    batch.create_namespaced_job(namespace, gpu_job("low", gpus=8, queue=queue, priority_class=low, annotations=LONG))
    admitted = kueue_queues.wait_workload(namespace, "low", lambda w: is_true(w, "Admitted"), "admitted")
    assert admitted["spec"]["priority"] == 100

    batch.create_namespaced_job(namespace, gpu_job("high", gpus=8, queue=queue, priority_class=high, annotations=SHORT))
    evicted = kueue_queues.wait_workload(namespace, "low", _evicted_and_requeued, "evicted and requeued")
    assert condition(evicted, "Evicted")["reason"] == "Preempted"
    assert condition(evicted, "Preempted")["reason"] == "InClusterQueue"
    # Back in the queue: suspended again, its pod gone, waiting for quota.
    assert is_suspended(batch, namespace, "low")
    assert wait_job_finished(batch, namespace, "high") == "Complete"
    # Once the high-priority Job is done, the preempted one is admitted again.
    kueue_queues.wait_workload(namespace, "low", lambda w: is_true(w, "Admitted"), "admitted again")
    # Kueue marks the Workload admitted first and unsuspends the Job right after.
    wait_for("low unsuspended", lambda: not is_suspended(batch, namespace, "low"), timeout=30)


def test_a_cohort_lends_an_idle_tenants_gpus_and_reclaims_them(cluster, namespace, gpu_nodes, kueue_queues, apis):
    core, batch = apis
    gpu_nodes(gpus=8)
    tenant_b = cluster.create_namespace("tenant-b", labels=RESTRICTED_LABELS)
    try:
        flavor = kueue_queues.resource_flavor("gpu")
        cohort = kueue_queues.unique("cohort")
        reclaim = {"reclaimWithinCohort": "Any"}
        queue_a = kueue_queues.cluster_queue(flavor, gpus=4, cohort=cohort, preemption=reclaim, prefix="tenant-a")
        queue_b = kueue_queues.cluster_queue(flavor, gpus=4, cohort=cohort, preemption=reclaim, prefix="tenant-b")
        kueue_queues.local_queue(namespace, queue_a)
        kueue_queues.local_queue(tenant_b, queue_b)

        # Tenant B is idle: tenant A's 8-GPU Job borrows B's 4 GPUs.
        batch.create_namespaced_job(namespace, gpu_job("busy", gpus=8, queue="queue", annotations=LONG))
        kueue_queues.wait_workload(namespace, "busy", lambda w: is_true(w, "Admitted"), "admitted by borrowing")

        def gpu_usage():
            # Kueue publishes a ClusterQueue's usage a moment after the admission itself.
            status = kueue_queues.get("ClusterQueue", queue_a).get("status") or {}
            for flavor_usage in status.get("flavorsUsage") or []:
                for resource in flavor_usage["resources"]:
                    if resource["name"] == "nvidia.com/gpu" and resource["total"] != "0":
                        return resource
            return None

        gpu = wait_for("tenant A's GPU usage in its ClusterQueue status", gpu_usage, timeout=30)
        assert (gpu["total"], gpu["borrowed"]) == ("8", "4")

        # Tenant B wants its quota back: A's borrowing Job is preempted, B's Job runs.
        batch.create_namespaced_job(tenant_b, gpu_job("own", gpus=4, queue="queue", annotations=SHORT))
        evicted = kueue_queues.wait_workload(namespace, "busy", _evicted_and_requeued, "evicted and requeued")
        assert condition(evicted, "Evicted")["reason"] == "Preempted"
        preempted = condition(evicted, "Preempted")
        assert preempted["reason"] == "InCohortReclamation"
        assert "reclamation within the cohort" in preempted["message"], preempted["message"]
        assert is_suspended(batch, namespace, "busy")
        kueue_queues.wait_workload(tenant_b, "own", lambda w: is_true(w, "Admitted"), "admitted")
        assert wait_job_finished(batch, tenant_b, "own") == "Complete"
        assert [p.status.phase for p in job_pods(core, tenant_b, "own")] == ["Succeeded"]
    finally:
        cluster.delete_namespace(tenant_b)
