"""Job manifests and waits for tests that run workloads on fake GPU nodes."""

from __future__ import annotations

from kubetune.devcluster.cluster import wait_for
from kubetune.devcluster.fakenodes import GPU_RESOURCE, gpu_toleration

# What Pod Security "restricted" demands of every container.
RESTRICTED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def gpu_job(name: str, gpus: int = 1, labels: dict | None = None, annotations: dict | None = None) -> dict:
    """A one-pod Job that asks for GPUs, tolerates the GPU taint and never retries."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels or {}, "annotations": annotations or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "tolerations": [gpu_toleration()],
                    "containers": [
                        {
                            "name": "main",
                            "image": "kubetune/trainer:test",
                            "resources": {"limits": {GPU_RESOURCE: str(gpus)}},
                            "securityContext": RESTRICTED_CONTAINER_SECURITY,
                        }
                    ],
                },
            },
        },
    }


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
