"""FineTuneJobs through a real Kueue: quota, all-or-nothing gangs, priority and
preemption, with Kueue's own words in the job's conditions."""

from __future__ import annotations

from kubetune.devcluster.cluster import wait_for

from .ftj import KWOK_DURATION, Api, body, condition, fleet


def train_pods(api: Api, name: str) -> list[dict]:
    return api.pods(f"kubetune.io/job={name},kubetune.io/stage=train")


def test_beyond_quota_waits_with_kueues_reason_and_a_gang_is_admitted_whole(
        cluster, namespace, gpu_nodes, start_operator, kueue_queues):
    fleet(gpu_nodes, count=2, gpus=8)
    api = Api(cluster, namespace)
    flavor = kueue_queues.resource_flavor()
    cq = kueue_queues.cluster_queue(flavor, gpus=8)
    kueue_queues.local_queue(namespace, cq, name="team")
    start_operator(namespace)

    api.create(body("first", resources={"queueName": "team", "gpusPerNode": 4}, serving={"enabled": False},
                    podMetadata={"train": {"annotations": {KWOK_DURATION: "15s"}}}))
    api.wait_phase("first", "Training", timeout=60)
    # 2 nodes x 4 GPUs = 8, while 4 of the 8 are held: Kueue admits none of its pods.
    api.create(body("gang", resources={"queueName": "team", "nodes": 2, "gpusPerNode": 4}, serving={"enabled": False}))
    status = api.wait_queued("gang", "insufficient unused quota for nvidia.com/gpu")
    assert condition(status, "Trained")["message"].startswith("Kueue: ")
    assert condition(status, "Reconciling")["status"] == "True"  # waiting is progress, not a failure
    assert train_pods(api, "gang") == []

    # Once the first job's training is done, the whole gang is admitted at once.
    api.wait_phase("first", "Succeeded", timeout=120)
    wait_for("both ranks created together", lambda: len(train_pods(api, "gang")) == 2, timeout=60, interval=0.3)
    api.wait_phase("gang", "Succeeded", timeout=120)


def test_a_high_priority_job_preempts_a_low_one_which_requeues_and_finishes(
        cluster, namespace, gpu_nodes, start_operator, kueue_queues):
    fleet(gpu_nodes, count=1, gpus=8)
    api = Api(cluster, namespace)
    flavor = kueue_queues.resource_flavor()
    cq = kueue_queues.cluster_queue(flavor, gpus=8, preemption={"withinClusterQueue": "LowerPriority"})
    kueue_queues.local_queue(namespace, cq, name="team")
    low, high = kueue_queues.priority_class(100, "low"), kueue_queues.priority_class(1000, "high")
    start_operator(namespace)

    api.create(body("low", resources={"queueName": "team", "gpusPerNode": 8, "workloadPriorityClassName": low},
                    serving={"enabled": False}, podMetadata={"train": {"annotations": {KWOK_DURATION: "30s"}}}))
    api.wait_phase("low", "Training", timeout=60)
    api.create(body("high", resources={"queueName": "team", "gpusPerNode": 8, "workloadPriorityClassName": high},
                    serving={"enabled": False}, podMetadata={"train": {"annotations": {KWOK_DURATION: "6s"}}}))

    # The low job goes back to the queue, saying it was preempted and will resume from its checkpoint.
    def preempted():
        status = api.status("low")
        trained = next((c for c in status.get("conditions") or [] if c["type"] == "Trained"), {})
        return status if status.get("phase") == "Queued" and trained.get("reason") == "Preempted" else None

    try:
        status = wait_for("low preempted", preempted, timeout=60, interval=0.3)
    except TimeoutError:
        workloads = cluster.kubectl("get", "workloads.kueue.x-k8s.io", "-n", namespace, "-o", "yaml", check=False).stdout
        raise AssertionError(f"low was not reported preempted: {api.status('low').get('phase')} "
                             f"high: {api.status('high')}\n{workloads}") from None
    assert "checkpoint" in condition(status, "Trained")["message"]
    events = {e["reason"] for e in api.events("low")}
    assert "Queued" in events

    api.wait_phase("high", "Succeeded", timeout=120)
    # Re-admitted once the high-priority job is done; the same revision finishes.
    status = api.wait_phase("low", "Succeeded", timeout=120)
    assert condition(status, "Trained")["status"] == "True"
