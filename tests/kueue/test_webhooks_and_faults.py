"""Kueue's webhooks really sit in the API server's path, and Kueue survives a crash."""

from __future__ import annotations

import json

import pytest

from kubetune.devcluster.jobs import gpu_job, is_suspended, job_pods, wait_job_finished
from kubetune.devcluster.queues import condition, is_true

from .support import LONG, SHORT, pending

pytestmark = pytest.mark.cluster


def test_kueue_objects_are_converted_by_kueues_own_webhook(cluster, kueue_queues):
    flavor = kueue_queues.resource_flavor("gpu")
    name = kueue_queues.cluster_queue(flavor, gpus=8, cohort="tenants")
    # Stored as v1beta2 (`cohortName`); read as v1beta1 the field is `cohort`. Only
    # Kueue's conversion webhook renames it: with no conversion the API server
    # would hand back the v1beta2 field, which the v1beta1 schema prunes.
    as_v1beta1 = json.loads(cluster.kubectl("get", f"clusterqueues.v1beta1.kueue.x-k8s.io/{name}", "-o", "json").stdout)
    assert as_v1beta1["apiVersion"] == "kueue.x-k8s.io/v1beta1"
    assert as_v1beta1["spec"]["cohort"] == "tenants"
    assert "cohortName" not in as_v1beta1["spec"]


def test_while_kueue_is_down_jobs_are_refused_and_after_a_restart_admission_resumes(
    cluster, kueue, namespace, gpu_nodes, gpu_queue, kueue_queues, apis
):
    from kubernetes.client.rest import ApiException

    core, batch = apis
    gpu_nodes(gpus=8)
    queue = gpu_queue["queue"]
    batch.create_namespaced_job(namespace, gpu_job("before", gpus=4, queue=queue, annotations=LONG))
    kueue_queues.wait_workload(namespace, "before", lambda w: is_true(w, "Admitted"), "admitted")

    old_pid = cluster.plane.pids["kueue"]
    cluster.plane.kill("kueue")  # SIGKILL: a crash, no graceful shutdown
    try:
        # The Job webhook is registered with failurePolicy Fail, as in Kueue's release manifests.
        with pytest.raises(ApiException) as refused:
            batch.create_namespaced_job(namespace, gpu_job("during", gpus=4, queue=queue))
        assert refused.value.status == 500
        message = json.loads(refused.value.body)["message"]
        assert 'failed calling webhook "mjob.kb.io"' in message and kueue.ports.webhook_url in message, message
    finally:
        cluster.plane.restart("kueue")
    assert cluster.plane.pids["kueue"] != old_pid

    # Kueue rebuilt its view from the API server: the Job admitted before the crash
    # still holds 4 of the 8 GPUs, so an 8-GPU Job waits while a 4-GPU one fits
    # (BestEffortFIFO lets it pass the blocked head of the queue).
    batch.create_namespaced_job(namespace, gpu_job("too-big", gpus=8, queue=queue))
    waiting = kueue_queues.wait_workload(namespace, "too-big", pending, "pending with a reason")
    assert "insufficient unused quota for nvidia.com/gpu" in condition(waiting, "QuotaReserved")["message"]
    batch.create_namespaced_job(namespace, gpu_job("after", gpus=4, queue=queue, annotations=SHORT))
    kueue_queues.wait_workload(namespace, "after", lambda w: is_true(w, "Admitted"), "admitted after the restart")
    assert wait_job_finished(batch, namespace, "after") == "Complete"
    before = kueue_queues.workload_for_job(namespace, "before")
    assert is_true(before, "Admitted") and not is_true(before, "Evicted")
    assert not is_suspended(batch, namespace, "before")
    assert [p.status.phase for p in job_pods(core, namespace, "before")] == ["Running"]
