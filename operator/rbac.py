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


def cluster_role(name: str = CLUSTER_ROLE_NAME) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "kubetune"}},
        "rules": RULES,
    }


def main() -> int:
    sys.stdout.write(yaml.safe_dump(cluster_role(), sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
