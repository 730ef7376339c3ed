"""No silent stuck states: what a person must fix ends in Stalled=True naming the
object within a reconcile, and the job goes on by itself once it is fixed."""

from __future__ import annotations

from kubetune.devcluster.cluster import wait_for

from .ftj import Api, body, condition, fleet


def stalled(api: Api, name: str, reason: str) -> dict:
    def check():
        status = api.status(name)
        conds = {c["type"]: c for c in status.get("conditions") or []}
        s = conds.get("Stalled") or {}
        return status if s.get("status") == "True" and s.get("reason") == reason else None

    return wait_for(f"{name} Stalled/{reason}", check, timeout=60, interval=0.3)


def warning_reasons(api: Api, name: str) -> set[str]:
    return {e["reason"] for e in api.events(name) if e["type"] == "Warning"}


def test_missing_service_account_stalls_and_recovers(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace)
    api.create(body("no-sa", storage={"serviceAccountName": "irsa-reader"}, serving={"enabled": False}))
    status = stalled(api, "no-sa", "ServiceAccountNotFound")
    assert "irsa-reader" in condition(status, "Stalled")["message"]
    assert condition(status, "Ready")["status"] == "False" and condition(status, "Reconciling")["status"] == "False"
    assert api.jobs("no-sa") == []  # nothing created that could never start
    assert "ServiceAccountNotFound" in warning_reasons(api, "no-sa")

    api.core.create_namespaced_service_account(namespace, {"metadata": {"name": "irsa-reader"}})
    status = api.wait_phase("no-sa", "Succeeded", timeout=90)
    assert condition(status, "Stalled")["status"] == "False"


def test_a_child_the_api_server_refuses_stalls_and_recovers(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    # A namespace quota that allows no Jobs: the API server refuses the validate Job (403).
    api.core.create_namespaced_resource_quota(namespace, {"metadata": {"name": "no-jobs"},
                                                          "spec": {"hard": {"count/jobs.batch": "0"}}})
    start_operator(namespace)
    api.create(body("quota", serving={"enabled": False}))
    status = stalled(api, "quota", "ChildRejected")
    message = condition(status, "Stalled")["message"]
    assert "quota" in message and "no-jobs" in message, message
    assert condition(status, "Validated")["reason"] == "ChildRejected"
    assert "ChildRejected" in warning_reasons(api, "quota")

    api.core.delete_namespaced_resource_quota("no-jobs", namespace)
    api.wait_phase("quota", "Succeeded", timeout=90)


def test_a_missing_local_queue_stalls_then_kueue_admits(cluster, namespace, gpu_nodes, start_operator, kueue_queues):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace)
    api.create(body("no-queue", resources={"queueName": "team-q"}, serving={"enabled": False}))
    # Validation is not queued; the train stage waits for a LocalQueue that is not there.
    status = stalled(api, "no-queue", "LocalQueueNotFound")
    assert f"LocalQueue {namespace}/team-q" in condition(status, "Stalled")["message"]
    assert condition(status, "Validated")["status"] == "True"
    assert [j for j in api.jobs("no-queue") if j["metadata"]["labels"]["kubetune.io/stage"] == "train"] == []

    flavor = kueue_queues.resource_flavor()
    cq = kueue_queues.cluster_queue(flavor, gpus=8)
    kueue_queues.local_queue(namespace, cq, name="team-q")
    status = api.wait_phase("no-queue", "Succeeded", timeout=120)
    train = api.job(api.child("no-queue", "train"))
    assert train["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-q"
    assert train["spec"]["suspend"] is False  # admitted by Kueue, not by us
