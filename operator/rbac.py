"""The operator's own permissions: ONE list of rules, from which the Helm
chart's ClusterRole and the test RBAC are generated (`python -m
kubetune.operator.rbac`, a unit test checks the chart still matches).

Least privilege: no Secrets at all (pods reference them, the operator never
reads them); on its children exactly the verbs the children table
(`children.KINDS`) says it uses (get, create, list, delete of a superseded
revision's children, patch for server-side apply, watch where their events
drive reconciles); and Roles only as wide as the per-job Role it creates
(RBAC forbids granting more than one holds, so the operator holds exactly
`finetunejobs/status` get+patch).
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from kubetune.contract.facts import GROUP, PLURAL

from .children import KINDS


def _children_rules() -> list[dict[str, Any]]:
    """One rule per API group and verb set, from the children table."""
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for k in KINDS:
        grouped.setdefault((k.group, tuple(k.verbs())), []).append(k.plural)
    return [{"apiGroups": [group], "resources": sorted(plurals), "verbs": list(verbs)}
            for (group, verbs), plurals in grouped.items()]


CLUSTER_ROLE_NAME = "kubetune-operator"

RULES: list[dict[str, Any]] = [
    # The custom resource: watched, status written, ownership (blockOwnerDeletion
    # on children requires update on the owner's finalizers subresource).
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
    # Children (generated from the children table).
    *_children_rules(),
    # Adapter mode's shared server (a child in the table above): its status is the operator's and its
    # loader sidecar's (the loader's Role grants get/patch of one server's status, which RBAC lets the
    # operator grant only while it holds them); its own children block its deletion like a job's.
    {"apiGroups": [GROUP], "resources": ["adapterservers/status"], "verbs": ["get", "patch"]},
    {"apiGroups": [GROUP], "resources": ["adapterservers/finalizers"], "verbs": ["update"]},
    # Kueue's LocalQueues: read only, to say "queue not found" instead of a Job suspended for ever.
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["localqueues"], "verbs": ["get"]},
    # Kueue's Workloads: read only, to put Kueue's own reason (quota, preemption) in the job's condition.
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["list"]},
    # Pods: read only, for termination messages and failure reasons; watched
    # (label-selected) because their changes trigger their FineTuneJob's reconcile.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    # Events on FineTuneJobs (kopf creates core/v1 Events).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # kopf discovers resources and watches namespaces/CRDs for changes.
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [GROUP], "resources": ["tenantpolicies"], "verbs": ["list"]},  # operator/tenancy.py: refuse jobs that slipped past admission
]


# The cluster-scoped resources among RULES: a Role cannot grant them, so an
# operator that watches only some namespaces still holds these in a (small)
# ClusterRole: kopf's namespace and CRD observers, the tenancy check's namespace
# labels and TenantPolicies. Everything else in RULES is namespaced and goes into
# a Role per watched namespace. A cluster test checks this set against the API
# server's discovery, so a new rule cannot land on the wrong side. Finding Kueue
# (preflight: /apis/kueue.x-k8s.io) is API discovery, a non-resource URL every
# authenticated identity may read (system:discovery): no rule at all.
CLUSTER_SCOPED: frozenset[tuple[str, str]] = frozenset({
    ("", "namespaces"),
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    (GROUP, "tenantpolicies"),
})


def _is_cluster_scoped(groups: list[str], resource: str) -> bool:
    """`resource` (maybe `name/subresource`) is cluster-scoped in every group of the rule, or in none."""
    scopes = {(g, resource.partition("/")[0]) in CLUSTER_SCOPED for g in groups}
    if len(scopes) != 1:
        raise ValueError(f"rule mixes scopes for {resource} across API groups {groups}; split it")
    return scopes.pop()


def _scoped_rules(cluster_scoped: bool) -> list[dict[str, Any]]:
    """RULES restricted to cluster-scoped (or to namespaced) resources, in RULES' order."""
    out = []
    for rule in RULES:
        resources = [r for r in rule["resources"] if _is_cluster_scoped(rule["apiGroups"], r) == cluster_scoped]
        if resources:
            out.append({**rule, "resources": resources})
    return out


def cluster_scoped_rules() -> list[dict[str, Any]]:
    """What a namespaced install grants cluster-wide (ClusterRole)."""
    return _scoped_rules(True)


def namespaced_rules() -> list[dict[str, Any]]:
    """What a namespaced install grants in each watched namespace (Role)."""
    return _scoped_rules(False)


def cluster_role(name: str = CLUSTER_ROLE_NAME, rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "kubetune"}},
        "rules": RULES if rules is None else rules,
    }


def role(namespace: str, name: str = CLUSTER_ROLE_NAME) -> dict[str, Any]:
    """The namespaced part of RULES as a Role in one watched namespace."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "kubetune"}},
        "rules": namespaced_rules(),
    }


def main() -> int:
    sys.stdout.write(yaml.safe_dump(cluster_role(), sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
