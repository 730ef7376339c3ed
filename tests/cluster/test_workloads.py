"""Scheduler + kwok + Job controller: Jobs on fake GPU nodes complete or fail as the pod says."""

from __future__ import annotations

import datetime
import json

import pytest

from kubetune.devcluster.jobs import cpu_job, gpu_job, job_pods, wait_job_finished

pytestmark = pytest.mark.cluster


@pytest.fixture
def apis(cluster):
    from kubernetes import client

    api = cluster.api_client()
    return client.CoreV1Api(api), client.BatchV1Api(api)


def test_job_is_scheduled_onto_a_gpu_node_and_completes(cluster, namespace, gpu_nodes, apis):
    core, batch = apis
    node = gpu_nodes(gpus=8)
    result = {"stage": "validate", "ok": True, "reason": "Valid", "message": "42 rows"}
    batch.create_namespaced_job(
        namespace,
        gpu_job(
            "train",
            gpus=2,
            annotations={
                "kwok.kubetune.io/run-duration": "1500ms",
                "kwok.kubetune.io/termination-message": json.dumps(result),
            },
        ),
    )
    assert wait_job_finished(batch, namespace, "train") == "Complete"

    (pod,) = job_pods(core, namespace, "train")
    assert pod.spec.node_name == node
    assert pod.status.phase == "Succeeded"
    (status,) = pod.status.container_statuses
    terminated = status.state.terminated
    assert terminated.exit_code == 0 and terminated.reason == "Completed"
    # Quoting survives the Stage template: the operator gets back exactly what the pod wrote.
    assert json.loads(terminated.message) == result
    # The pod ran for its annotated duration before it completed.
    assert terminated.finished_at - pod.status.start_time >= datetime.timedelta(seconds=1)


def test_a_cpu_stage_job_without_gpu_toleration_runs_on_the_untainted_cpu_node(cluster, namespace, gpu_nodes, cpu_nodes, apis):
    """`kubetune dev cluster up` gives such a node: validate and merge pods have somewhere to go."""
    core, batch = apis
    gpu_nodes()
    node = cpu_nodes()
    batch.create_namespaced_job(namespace, cpu_job("merge", annotations={"kwok.kubetune.io/run-duration": "500ms"}))
    assert wait_job_finished(batch, namespace, "merge") == "Complete"
    (pod,) = job_pods(core, namespace, "merge")
    assert pod.spec.node_name == node and pod.status.phase == "Succeeded"


def test_pod_labelled_to_fail_fails_its_job_with_the_annotated_reason(cluster, namespace, gpu_nodes, apis):
    core, batch = apis
    gpu_nodes()
    batch.create_namespaced_job(
        namespace,
        gpu_job(
            "oom",
            labels={"kwok.kubetune.io/fail": "true"},
            annotations={
                "kwok.kubetune.io/fail-reason": "OOMKilled",
                "kwok.kubetune.io/exit-code": "137",
                "kwok.kubetune.io/termination-message": "CUDA out of memory",
            },
        ),
    )
    assert wait_job_finished(batch, namespace, "oom") == "Failed"
    job = batch.read_namespaced_job("oom", namespace)
    failed = next(c for c in job.status.conditions if c.type == "Failed")
    assert failed.reason == "BackoffLimitExceeded"

    (pod,) = job_pods(core, namespace, "oom")
    assert pod.status.phase == "Failed"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.reason, terminated.exit_code, terminated.message) == ("OOMKilled", 137, "CUDA out of memory")


def test_pod_asking_for_more_gpus_than_any_node_has_stays_pending(cluster, namespace, gpu_nodes, apis):
    """The scheduler really accounts for nvidia.com/gpu: nothing fits, nothing runs."""
    from kubetune.devcluster.cluster import wait_for

    core, batch = apis
    gpu_nodes(gpus=8)
    batch.create_namespaced_job(namespace, gpu_job("greedy", gpus=16))
    pod = wait_for("the Job's pod", lambda: next(iter(job_pods(core, namespace, "greedy")), None), timeout=30)

    def unschedulable():
        current = core.read_namespaced_pod(pod.metadata.name, namespace)
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in current.status.conditions or [])

    wait_for("PodScheduled=False/Unschedulable", unschedulable, timeout=30)
    current = core.read_namespaced_pod(pod.metadata.name, namespace)
    assert current.spec.node_name is None and current.status.phase == "Pending"


def test_deployment_pods_keep_running_and_back_a_service(cluster, namespace, gpu_nodes, apis):
    """Serving pods (not owned by a Job) stay Running and Ready; the Service gets their IPs."""
    from kubernetes import client

    from kubetune.devcluster.cluster import wait_for

    core, _ = apis
    apps = client.AppsV1Api(cluster.api_client())
    discovery = client.DiscoveryV1Api(cluster.api_client())
    gpu_nodes()
    pod_spec = gpu_job("unused")["spec"]["template"]["spec"] | {"restartPolicy": "Always"}
    apps.create_namespaced_deployment(namespace, {
        "metadata": {"name": "server"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "server"}},
            "template": {"metadata": {"labels": {"app": "server"}}, "spec": pod_spec},
        },
    })
    core.create_namespaced_service(namespace, {
        "metadata": {"name": "server"},
        "spec": {"selector": {"app": "server"}, "ports": [{"port": 8000}]},
    })

    wait_for("2 ready replicas", lambda: apps.read_namespaced_deployment("server", namespace).status.ready_replicas == 2, timeout=30)

    def ready_addresses():
        slices = discovery.list_namespaced_endpoint_slice(namespace, label_selector="kubernetes.io/service-name=server").items
        return sorted(a for s in slices for e in (s.endpoints or []) if e.conditions.ready for a in e.addresses)

    addresses = wait_for("2 ready endpoints", lambda: len(ready_addresses()) == 2 and ready_addresses(), timeout=30)
    pod_ips = sorted(p.status.pod_ip for p in core.list_namespaced_pod(namespace, label_selector="app=server").items)
    assert addresses == pod_ips
    assert core.read_namespaced_service("server", namespace).spec.cluster_ip.startswith("10.0.0.")
