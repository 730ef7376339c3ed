"""Kueue admits plain batch/v1 Jobs on the real control plane (kwok GPU nodes).

The Jobs are created as kubetune creates its stage Jobs: suspended and
labelled `kueue.x-k8s.io/queue-name`. Kueue alone decides when they run;
every wait below is on state that Kueue or the Job controller writes.
"""

from __future__ import annotations

import datetime

import pytest

from kubetune.devcluster.jobs import gpu_job, is_suspended, job_pods, wait_job_finished
from kubetune.devcluster.queues import GPU, condition, is_true

from .support import LONG, SHORT, delete_job, pending

pytestmark = pytest.mark.cluster


def _timestamp(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_a_suspended_job_within_quota_is_admitted_and_runs_to_completion(namespace, gpu_nodes, gpu_queue, kueue_queues, apis):
    core, batch = apis
    node = gpu_nodes(gpus=8)
    batch.create_namespaced_job(
        namespace, gpu_job("train", gpus=4, cpu="8", memory="32Gi", queue=gpu_queue["queue"], annotations=SHORT)
    )

    workload = kueue_queues.wait_workload(namespace, "train", lambda w: is_true(w, "Admitted"), "admitted")
    assert is_true(workload, "QuotaReserved")
    admission = workload["status"]["admission"]
    assert admission["clusterQueue"] == gpu_queue["cluster_queue"]
    (assignment,) = admission["podSetAssignments"]
    flavor = gpu_queue["flavor"]
    assert assignment["flavors"] == {"cpu": flavor, "memory": flavor, GPU: flavor}
    assert assignment["resourceUsage"] == {"cpu": "8", "memory": "32Gi", GPU: "4"}

    assert wait_job_finished(batch, namespace, "train") == "Complete"
    assert not is_suspended(batch, namespace, "train")
    (pod,) = job_pods(core, namespace, "train")
    assert pod.spec.node_name == node and pod.status.phase == "Succeeded"
    # The pod exists only because Kueue admitted the Job: it was created after the quota was reserved.
    reserved_at = _timestamp(condition(workload, "QuotaReserved")["lastTransitionTime"])
    assert pod.metadata.creation_timestamp >= reserved_at

    finished = kueue_queues.wait_workload(namespace, "train", lambda w: is_true(w, "Finished"), "finished")
    assert condition(finished, "Finished")["reason"] == "Succeeded"


def test_a_job_beyond_the_free_quota_stays_suspended_with_kueues_reason_until_quota_frees(
    namespace, gpu_nodes, gpu_queue, kueue_queues, apis
):
    core, batch = apis
    gpu_nodes(gpus=8)
    queue = gpu_queue["queue"]
    batch.create_namespaced_job(namespace, gpu_job("blocker", gpus=8, queue=queue, annotations=LONG))
    kueue_queues.wait_workload(namespace, "blocker", lambda w: is_true(w, "Admitted"), "admitted")

    batch.create_namespaced_job(namespace, gpu_job("waiting", gpus=4, queue=queue, annotations=SHORT))
    waiting = kueue_queues.wait_workload(namespace, "waiting", pending, "pending with a reason")
    message = condition(waiting, "QuotaReserved")["message"]
    assert "insufficient unused quota for nvidia.com/gpu" in message, message
    assert gpu_queue["flavor"] in message, message
    assert not is_true(waiting, "Admitted")
    assert is_suspended(batch, namespace, "waiting")
    assert job_pods(core, namespace, "waiting") == []

    delete_job(batch, namespace, "blocker")
    kueue_queues.wait_workload(namespace, "waiting", lambda w: is_true(w, "Admitted"), "admitted once quota freed")
    assert wait_job_finished(batch, namespace, "waiting") == "Complete"


def test_a_job_larger_than_its_cluster_queue_is_never_admitted(namespace, gpu_nodes, gpu_queue, kueue_queues, apis):
    core, batch = apis
    gpu_nodes(gpus=8)
    gpu_nodes(gpus=8)  # the nodes could run it: only the queue's quota stops it
    batch.create_namespaced_job(namespace, gpu_job("greedy", gpus=16, queue=gpu_queue["queue"]))
    workload = kueue_queues.wait_workload(namespace, "greedy", pending, "pending with a reason")
    message = condition(workload, "QuotaReserved")["message"]
    assert "insufficient quota for nvidia.com/gpu" in message, message
    assert is_suspended(batch, namespace, "greedy")
    assert job_pods(core, namespace, "greedy") == []


def test_an_indexed_job_is_admitted_only_when_all_its_gpus_fit(namespace, gpu_nodes, gpu_queue, kueue_queues, apis):
    """2 pods x 4 GPUs: with 4 of the queue's 8 GPUs in use, not one pod starts;
    once they free, both pods are admitted together and run on the two nodes."""
    core, batch = apis
    nodes = {gpu_nodes(gpus=4), gpu_nodes(gpus=4)}
    queue = gpu_queue["queue"]
    batch.create_namespaced_job(namespace, gpu_job("blocker", gpus=4, queue=queue, annotations=LONG))
    kueue_queues.wait_workload(namespace, "blocker", lambda w: is_true(w, "Admitted"), "admitted")

    batch.create_namespaced_job(namespace, gpu_job("train", gpus=4, pods=2, indexed=True, queue=queue, annotations=SHORT))
    waiting = kueue_queues.wait_workload(namespace, "train", pending, "pending with a reason")
    (podset,) = waiting["spec"]["podSets"]
    assert podset["count"] == 2
    message = condition(waiting, "QuotaReserved")["message"]
    assert "insufficient unused quota for nvidia.com/gpu" in message, message
    # Half the gang would fit in the free quota (4 GPUs); Kueue starts none of it.
    assert is_suspended(batch, namespace, "train")
    assert job_pods(core, namespace, "train") == []

    delete_job(batch, namespace, "blocker")
    admitted = kueue_queues.wait_workload(namespace, "train", lambda w: is_true(w, "Admitted"), "admitted once quota freed")
    (assignment,) = admitted["status"]["admission"]["podSetAssignments"]
    assert assignment["count"] == 2
    assert assignment["resourceUsage"][GPU] == "8"

    assert wait_job_finished(batch, namespace, "train") == "Complete"
    pods = job_pods(core, namespace, "train")
    assert sorted(p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in pods) == ["0", "1"]
    assert {p.spec.node_name for p in pods} == nodes
    assert all(p.status.phase == "Succeeded" for p in pods)
