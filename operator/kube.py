"""The operator's few Kubernetes API calls (kubernetes client, raw dicts).

Creation is idempotent: 409 AlreadyExists counts as success, so a handler
interrupted after a create (operator killed, API timeout) and run again
creates nothing twice. An existing object owned by a different FineTuneJob
(same name, earlier incarnation still being garbage-collected) is an error.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException


class ChildConflict(Exception):
    """An object with a child's name exists but belongs to someone else."""


def load_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


class Kube:
    def __init__(self, api_client: Optional[client.ApiClient] = None):
        self.api = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.rbac = client.RbacAuthorizationV1Api(self.api)
        self._create: dict[tuple[str, str], Callable[..., Any]] = {
            ("v1", "ServiceAccount"): self.core.create_namespaced_service_account,
            ("v1", "ConfigMap"): self.core.create_namespaced_config_map,
            ("v1", "Service"): self.core.create_namespaced_service,
            ("rbac.authorization.k8s.io/v1", "Role"): self.rbac.create_namespaced_role,
            ("rbac.authorization.k8s.io/v1", "RoleBinding"): self.rbac.create_namespaced_role_binding,
            ("batch/v1", "Job"): self.batch.create_namespaced_job,
            ("apps/v1", "Deployment"): self.apps.create_namespaced_deployment,
        }
        self._read: dict[tuple[str, str], Callable[..., Any]] = {
            ("v1", "ServiceAccount"): self.core.read_namespaced_service_account,
            ("v1", "ConfigMap"): self.core.read_namespaced_config_map,
            ("v1", "Service"): self.core.read_namespaced_service,
            ("rbac.authorization.k8s.io/v1", "Role"): self.rbac.read_namespaced_role,
            ("rbac.authorization.k8s.io/v1", "RoleBinding"): self.rbac.read_namespaced_role_binding,
            ("batch/v1", "Job"): self.batch.read_namespaced_job,
            ("apps/v1", "Deployment"): self.apps.read_namespaced_deployment,
        }

    def _raw(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        resp = fn(*args, _preload_content=False, **kwargs)
        return json.loads(resp.data)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Optional[dict[str, Any]]:
        try:
            return self._raw(self._read[(api_version, kind)], name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def ensure(self, obj: dict[str, Any]) -> bool:
        """Create `obj`; True when created now, False when it already existed (ours)."""
        key = (obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        try:
            self._create[key](meta["namespace"], obj, _preload_content=False)
            return True
        except ApiException as e:
            if e.status != 409:
                raise
        existing = self.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if existing is None:  # deleted in between: next reconcile creates it again
            return False
        want = {r["uid"] for r in meta.get("ownerReferences", [])}
        have = {r.get("uid") for r in existing.get("metadata", {}).get("ownerReferences") or []}
        if want and not want & have:
            raise ChildConflict(f"{obj['kind']} {meta['namespace']}/{meta['name']} exists and is not owned by this FineTuneJob")
        return False

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        sel = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        return self._raw(self.core.list_namespaced_pod, namespace, label_selector=sel).get("items", [])

    def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        self.apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": replicas}})
