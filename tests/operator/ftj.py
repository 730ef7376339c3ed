"""Helpers of the operator cluster tests: FineTuneJob documents, reads, waits."""

from __future__ import annotations

import copy
import json
from typing import Any

from kubetune.contract.facts import GROUP, PLURAL, VERSION  # noqa: F401  (re-exported for the tests)
from kubetune.devcluster.cluster import wait_for
from kubetune.devcluster.fakenodes import DEFAULT_GPU_PRODUCT

# kwok reads these pod annotations/labels (kubetune/devcluster/kwok.yaml).
KWOK_MESSAGE = "kwok.kubetune.io/termination-message"
KWOK_DURATION = "kwok.kubetune.io/run-duration"
KWOK_FAIL = "kwok.kubetune.io/fail"
KWOK_FAIL_REASON = "kwok.kubetune.io/fail-reason"
KWOK_EXIT_CODE = "kwok.kubetune.io/exit-code"

VALIDATE_OK = {"stage": "validate", "ok": True, "reason": "DatasetValid", "message": "120 rows valid", "rows": 120}
EVALUATE_OK = {"stage": "evaluate", "ok": True, "reason": "GatePassed", "message": "held-out loss 2.0000 -> 1.5000 (+25.0%); gate passed", "passed": True,
               "baseLoss": 2.0, "tunedLoss": 1.5, "improvement": 0.25}


def message(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))


def body(name: str, **spec: Any) -> dict[str, Any]:
    """A FineTuneJob whose pods kwok completes; `spec` entries replace/merge top-level sections."""
    base: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/tiny-llama/"},
        "dataset": {"uri": "s3://data/support.jsonl"},
        "method": {"type": "lora"},
        "resources": {"gpuType": DEFAULT_GPU_PRODUCT, "cpu": "1", "memory": "2Gi", "shmSize": "1Gi"},
        "output": {"uri": f"s3://artifacts/{name}/"},
        "podMetadata": {
            "validate": {"annotations": {KWOK_MESSAGE: message(VALIDATE_OK)}},
            "evaluate": {"annotations": {KWOK_MESSAGE: message(EVALUATE_OK)}},
        },
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = value
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": base}


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Api:
    """Admin-side view of the cluster for assertions."""

    def __init__(self, cluster, namespace: str):
        from kubernetes import client

        self.ns = namespace
        self.cluster = cluster
        self.api = cluster.api_client()
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.rbac = client.RbacAuthorizationV1Api(self.api)

    def raw(self, fn, *args, **kwargs) -> dict:
        return json.loads(fn(*args, _preload_content=False, **kwargs).data)

    def create(self, obj: dict) -> dict:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, obj)

    def get(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def patch(self, name: str, patch: dict) -> dict:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, patch)

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def status(self, name: str) -> dict:
        return self.get(name).get("status") or {}

    def wait_phase(self, name: str, *phases: str, timeout: float = 90) -> dict:
        def check():
            status = self.status(name)
            if status.get("phase") in phases:
                return status
            if status.get("phase") == "Failed" and "Failed" not in phases:
                raise AssertionError(f"{name} failed: {status.get('message')}\n{json.dumps(status, indent=1)}")
            return None

        return wait_for(f"{name} phase in {phases}", check, timeout=timeout, interval=0.3)

    def wait_queued(self, name: str, text: str, timeout: float = 60) -> dict:
        """The job's status once it is Queued with `text` in its Trained condition's message
        (Kueue's reason for waiting)."""
        def check():
            status = self.status(name)
            trained = next((c for c in status.get("conditions") or [] if c["type"] == "Trained"), {})
            return status if status.get("phase") == "Queued" and text in trained.get("message", "") else None

        return wait_for(f"{name} queued with {text!r}", check, timeout=timeout, interval=0.3)

    def job(self, name: str) -> dict:
        return self.raw(self.batch.read_namespaced_job, name, self.ns)

    def rev(self, name: str) -> str:
        """The revision the FineTuneJob's current spec asks for."""
        from kubetune.operator import revisions
        from kubetune.operator.api import FineTuneJob

        return revisions.of(FineTuneJob.from_body(self.get(name)))

    def child(self, name: str, what: str) -> str:
        """Name of a per-revision child ("train", "validate", "config", ...) of the current revision."""
        return f"{name}-{what}-{self.rev(name)}"

    def jobs(self, owner: str) -> list[dict]:
        return self.raw(self.batch.list_namespaced_job, self.ns, label_selector=f"kubetune.io/job={owner}")["items"]

    def pods(self, selector: str) -> list[dict]:
        return self.raw(self.core.list_namespaced_pod, self.ns, label_selector=selector)["items"]

    def events(self, name: str) -> list[dict]:
        items = self.raw(self.core.list_namespaced_event, self.ns,
                         field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob")["items"]
        # Timestamps have one-second resolution; within a second, creation order
        # is the etcd revision (one etcd here, so resourceVersions are ordered).
        return sorted(items, key=lambda e: (e.get("firstTimestamp") or e.get("eventTime") or "", int(e["metadata"]["resourceVersion"])))

    def children(self, owner: str) -> dict[str, list[str]]:
        """Every namespaced child kind, by name, selected by the operator's label."""
        sel = f"kubetune.io/job={owner}"
        listing = {
            "Job": lambda: self.raw(self.batch.list_namespaced_job, self.ns, label_selector=sel),
            "Deployment": lambda: self.raw(self.apps.list_namespaced_deployment, self.ns, label_selector=sel),
            "Service": lambda: self.raw(self.core.list_namespaced_service, self.ns, label_selector=sel),
            "ConfigMap": lambda: self.raw(self.core.list_namespaced_config_map, self.ns, label_selector=sel),
            "ServiceAccount": lambda: self.raw(self.core.list_namespaced_service_account, self.ns, label_selector=sel),
            "Role": lambda: self.raw(self.rbac.list_namespaced_role, self.ns, label_selector=sel),
            "RoleBinding": lambda: self.raw(self.rbac.list_namespaced_role_binding, self.ns, label_selector=sel),
        }
        return {kind: sorted(o["metadata"]["name"] for o in fn()["items"]) for kind, fn in listing.items()}


def condition(status: dict, type_: str) -> dict:
    return next(c for c in status.get("conditions", []) if c["type"] == type_)


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def fleet(gpu_nodes, count: int = 1, gpus: int = 8) -> list[str]:
    """A CPU node (untainted, no GPUs: validation and merge run there) and
    `count` tainted GPU nodes; returns the GPU node names."""
    gpu_nodes(gpus=0, tainted=False, product="none")
    return [gpu_nodes(gpus=gpus) for _ in range(count)]
