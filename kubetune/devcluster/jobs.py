"""Job manifests and waits for tests that run workloads on fake GPU nodes."""

from __future__ import annotations

from kubetune.devcluster.cluster import wait_for
from kubetune.devcluster.fakenodes import GPU_RESOURCE, gpu_toleration
from kubetune.devcluster.queues import PRIORITY_CLASS_LABEL, QUEUE_NAME_LABEL

# What Pod Security "restricted" demands of every container.
RESTRICTED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def gpu_job(
    name: str,
    gpus: int = 1,
    labels: dict | None = None,
    annotations: dict | None = None,
    *,
    queue: str | None = None,
    priority_class: str | None = None,
    pods: int = 1,
    indexed: bool = False,
    cpu: str | None = None,
    memory: str | None = None,
) -> dict:
    """A Job whose pods ask for GPUs, tolerate the GPU taint and never retry.

    `labels`/`annotations` go on the pod template (kwok reads its
    `kwok.kubetune.io/*` keys there). With `queue`, the Job is created
    suspended and labelled `kueue.x-k8s.io/queue-name` for Kueue to admit,
    as kubetune creates its stage Jobs; `priority_class` names a Kueue
    WorkloadPriorityClass. `pods` > 1 runs that many pods at once
    (parallelism = completions), Indexed with `indexed` (multi-node training).
    """
    limits = {GPU_RESOURCE: str(gpus)}
    requests = {}
    if cpu:
        limits["cpu"] = requests["cpu"] = cpu
    if memory:
        limits["memory"] = requests["memory"] = memory
    resources = {"limits": limits} | ({"requests": requests} if requests else {})
    job_labels = {}
    if queue:
        job_labels[QUEUE_NAME_LABEL] = queue
    if priority_class:
        job_labels[PRIORITY_CLASS_LABEL] = priority_class
    spec: dict = {
        "backoffLimit": 0,
        "parallelism": pods,
        "completions": pods,
        "template": {
            "metadata": {"labels": labels or {}, "annotations": annotations or {}},
            "spec": {
                "restartPolicy": "Never",
                "tolerations": [gpu_toleration()],
                "containers": [
                    {
                        "name": "main",
                        "image": "kubetune/trainer:test",
                        "resources": resources,
                        "securityContext": RESTRICTED_CONTAINER_SECURITY,
                    }
                ],
            },
        },
    }
    if indexed:
        spec["completionMode"] = "Indexed"
    if queue:
        # Kueue unsuspends it on admission; created running, its pods would start before admission.
        spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": job_labels}, "spec": spec}


def cpu_job(name: str, cpu: str = "2", memory: str = "8Gi", labels: dict | None = None, annotations: dict | None = None) -> dict:
    """A one-pod Job of a CPU stage (validate, merge): no GPU, no GPU toleration,
    so only an untainted node (fakenodes.cpu_node) can run it."""
    job = gpu_job(name, labels=labels, annotations=annotations)
    pod = job["spec"]["template"]["spec"]
    del pod["tolerations"]
    pod["containers"][0]["resources"] = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    return job


def job_condition(batch, namespace: str, name: str) -> str | None:
    """The type of the first terminal condition (Complete or Failed) that is True."""
    job = batch.read_namespaced_job(name, namespace)
    for condition in job.status.conditions or []:
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return condition.type
    return None


def wait_job_finished(batch, namespace: str, name: str, timeout: float = 60) -> str:
    return wait_for(f"Job {namespace}/{name} to finish", lambda: job_condition(batch, namespace, name), timeout=timeout)


def job_pods(core, namespace: str, name: str):
    return core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items


def is_suspended(batch, namespace: str, name: str) -> bool:
    return bool(batch.read_namespaced_job(name, namespace).spec.suspend)
