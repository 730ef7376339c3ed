"""The operator's Kubernetes API calls (kubernetes client, raw dicts), driven by
the children table (`children.KINDS`).

`ensure` is idempotent: a created-once kind counts 409 AlreadyExists as done
(a handler interrupted after a create and run again creates nothing twice);
an applied kind goes through server-side apply with the operator's field
manager, forced, so the operator's fields always hold the spec's values. An
existing object controlled by a different owner (same name, an earlier
incarnation still being garbage-collected) is a `ChildConflict`.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .children import FIELD_MANAGER, BY_KIND, ChildKind, kind_of, owner_manager


class ChildConflict(Exception):
    """An object with a child's name exists but belongs to someone else."""


def load_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def _selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


class Kube:
    def __init__(self, api_client: Optional[client.ApiClient] = None):
        self.api = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api)

    def _call(self, method: str, path: str, body: Any = None, query: Optional[list[tuple[str, str]]] = None,
              content_type: str = "application/json") -> dict[str, Any]:
        """One REST call through the client's own serialisation and auth; ApiException on a non-2xx."""
        method, url, headers, payload, post = self.api.param_serialize(
            method=method, resource_path=path, query_params=query or [], body=body,
            header_params={"Accept": "application/json", "Content-Type": content_type}, auth_settings=["BearerToken"],
        )
        resp = self.api.call_api(method, url, header_params=headers, body=payload, post_params=post)
        resp.read()
        if not 200 <= resp.status <= 299:
            raise ApiException(http_resp=resp)
        return json.loads(resp.data) if resp.data else {}

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Optional[dict[str, Any]]:
        try:
            return self._call("GET", BY_KIND[(api_version, kind)].path(namespace, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def get_custom(self, group: str, version: str, plural: str, namespace: str, name: str) -> Optional[dict[str, Any]]:
        """A namespaced object of an API the operator does not manage (Kueue's LocalQueues)."""
        try:
            return self._call("GET", f"/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}")
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def workload_of(self, namespace: str, job_uid: str) -> Optional[dict[str, Any]]:
        """The Kueue Workload of a Job (owned by it), or None (no Kueue, not created yet)."""
        version = self.preferred_version("kueue.x-k8s.io")
        if version is None:
            return None
        items = self._call("GET", f"/apis/kueue.x-k8s.io/{version}/namespaces/{namespace}/workloads").get("items", [])
        return next((w for w in items if any(r.get("uid") == job_uid for r in w["metadata"].get("ownerReferences") or [])),
                    None)

    def preferred_version(self, group: str) -> Optional[str]:
        """The served version of an API group (discovery), or None when it is not installed."""
        try:
            return self._call("GET", f"/apis/{group}")["preferredVersion"]["version"]
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        k = BY_KIND[(api_version, kind)]
        return self._call("GET", k.path(namespace), query=[("labelSelector", _selector(labels))]).get("items", [])

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete (its dependents, e.g. a Job's pods, in the background); False when already gone."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        try:
            self._call("DELETE", BY_KIND[(api_version, kind)].path(namespace, name), body=body)
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def ensure(self, obj: dict[str, Any]) -> bool:
        """Create or apply `obj` as its kind says; True when something was created or changed."""
        k = kind_of(obj)
        return self._apply(k, obj) if k.applied else self._create(k, obj)

    def _create(self, k: ChildKind, obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        try:
            self._call("POST", k.path(meta["namespace"]), body=obj, query=[("fieldManager", FIELD_MANAGER)])
            return True
        except ApiException as e:
            if e.status != 409:
                raise
        existing = self.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if existing is not None:
            _check_owner(obj, existing)
        return False  # deleted in between: the next reconcile creates it again

    def _apply(self, k: ChildKind, obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        existing = self.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if existing is not None and not k.shared:
            _check_owner(obj, existing)
        # A shared kind: each owner's part under its own manager (children.ChildKind.shared).
        out = self._server_side_apply(k, obj, shared_manager(obj) if k.shared else FIELD_MANAGER)
        before = (existing or {}).get("metadata", {}).get("resourceVersion")
        return out.get("metadata", {}).get("resourceVersion") != before

    def _server_side_apply(self, k: ChildKind, obj: dict[str, Any], manager: str) -> dict[str, Any]:
        meta = obj["metadata"]
        return self._call("PATCH", k.path(meta["namespace"], meta["name"]), body=obj,
                          query=[("fieldManager", manager), ("force", "true")],
                          content_type="application/apply-patch+yaml")

    def leave(self, obj: dict[str, Any], owner_uid: str) -> None:
        """Apply `obj` (names only) as owner `owner_uid`: its part of a shared object goes."""
        try:
            self._server_side_apply(kind_of(obj), obj, owner_manager(owner_uid))
        except ApiException as e:
            if e.status != 404:
                raise

    def json_patch(self, api_version: str, kind: str, namespace: str, name: str, ops: list[dict[str, Any]]) -> bool:
        """A JSON patch (guarded by its own `test` ops); False when a test failed or the object is gone."""
        try:
            self._call("PATCH", BY_KIND[(api_version, kind)].path(namespace, name), body=ops,
                       query=[("fieldManager", FIELD_MANAGER)], content_type="application/json-patch+json")
            return True
        except ApiException as e:
            if e.status in (404, 409, 422):
                return False
            raise

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        path = BY_KIND[(api_version, kind)].path(namespace, name) + "/status"
        self._call("PATCH", path, body={"status": status}, content_type="application/merge-patch+json")

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        resp = self.core.list_namespaced_pod(namespace, label_selector=_selector(selector), _preload_content=False)
        return json.loads(resp.data).get("items", [])


def shared_manager(obj: dict[str, Any]) -> str:
    refs = obj["metadata"].get("ownerReferences") or []
    if len(refs) != 1:
        raise ValueError(f"{obj['kind']} {obj['metadata']['name']}: a shared object is applied by exactly one owner")
    return owner_manager(refs[0]["uid"])


def _check_owner(obj: dict[str, Any], existing: dict[str, Any]) -> None:
    want = {r["uid"] for r in obj["metadata"].get("ownerReferences", [])}
    have = {r.get("uid") for r in existing.get("metadata", {}).get("ownerReferences") or []}
    if want and not want & have:
        meta = obj["metadata"]
        raise ChildConflict(f"{obj['kind']} {meta['namespace']}/{meta['name']} exists and is not owned by this FineTuneJob")
