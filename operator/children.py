"""The kinds of object the operator manages for a FineTuneJob: one table.

The table says, per kind, where it lives in the API and how the operator
keeps it: `applied` kinds go through server-side apply on every pass that
reaches their stage (one field manager, forced: a hand edit is put back and a
spec edit reaches the object); the others are created once and never changed
(a Job's pod template is immutable, and a revision's ConfigMap is too). The
operator's RBAC (`rbac.py`) is generated from the same table, so a kind the
operator starts to manage cannot be forgotten there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kubetune.contract.facts import API_VERSION

FIELD_MANAGER = "kubetune-operator"
# Named here, not imported from the API package, so that this table stays importable on its own.
ADAPTER_SERVER_KIND = "AdapterServer"
ADAPTER_SERVER_PLURAL = "adapterservers"


@dataclass(frozen=True)
class ChildKind:
    api_version: str
    kind: str
    plural: str
    applied: bool  # server-side applied every pass; else created once
    # What the operator does with it beyond get and create (and patch, for an applied kind).
    watch: bool = False  # listed and watched (its changes trigger the owner's reconcile)
    per_revision: bool = False  # one per revision: listed, and deleted once a newer revision took over
    extra_verbs: tuple[str, ...] = ()
    # Owned by several FineTuneJobs (the shared adapter server): each applies its own part under a field
    # manager of its own (owner_manager), so the parts merge instead of overwriting.
    shared: bool = False

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    def path(self, namespace: str, name: Optional[str] = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.api_version}"
        out = f"{base}/namespaces/{namespace}/{self.plural}"
        return f"{out}/{name}" if name else out

    def verbs(self) -> list[str]:
        """Exactly what the operator does with the kind (a test checks each verb is used)."""
        verbs = ["get", "create"]
        if self.applied:
            verbs.append("patch")
        if self.per_revision:
            verbs += ["list", "delete"]
        if self.watch:
            verbs += ["list", "watch"]
        return sorted(set(verbs) | set(self.extra_verbs))


KINDS: tuple[ChildKind, ...] = (
    ChildKind("v1", "ServiceAccount", "serviceaccounts", applied=True),
    ChildKind("rbac.authorization.k8s.io/v1", "Role", "roles", applied=True),
    ChildKind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings", applied=True),
    ChildKind("v1", "ConfigMap", "configmaps", applied=False, per_revision=True),
    ChildKind("v1", "Service", "services", applied=True, per_revision=True),
    ChildKind("batch/v1", "Job", "jobs", applied=False, watch=True, per_revision=True),
    # Merged-mode serving is deleted when the job stops serving that way (serving.MERGED_KINDS).
    ChildKind("apps/v1", "Deployment", "deployments", applied=True, watch=True, extra_verbs=("delete",)),
    # Serving's guards (operator/serving.py): applied like the Deployment, so spec edits reach them.
    ChildKind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", applied=True, extra_verbs=("delete",)),
    ChildKind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets", applied=True, extra_verbs=("delete",)),
    # Deleted when spec.serving.autoscaling is removed (the Deployment's replicas are the operator's again).
    ChildKind("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", applied=True,
              extra_verbs=("delete",)),
    # serving.canary: the job's route on its Gateway (deleted with the canary setting or merged serving).
    ChildKind("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes", applied=True, extra_verbs=("delete",)),
    # Adapter mode's shared server (operator/adapter_servers.py): applied by each job in it; the server
    # pass prunes departed jobs' entries (patch) and deletes a server left without adapters.
    ChildKind(API_VERSION, ADAPTER_SERVER_KIND, ADAPTER_SERVER_PLURAL, applied=True, watch=True, shared=True,
              extra_verbs=("delete",)),
)
BY_KIND: dict[tuple[str, str], ChildKind] = {(k.api_version, k.kind): k for k in KINDS}

# Per-revision kinds: removed once a newer revision has taken over.
REVISION_KINDS: tuple[ChildKind, ...] = tuple(k for k in KINDS if k.per_revision)


def owner_manager(uid: str) -> str:
    """The field manager of one owner's part of a shared object (ChildKind.shared): server-side apply
    keeps the parts of different managers apart, and an owner's empty apply removes its part only."""
    return f"kubetune-job-{uid}"


def kind_of(obj: dict) -> ChildKind:
    try:
        return BY_KIND[(obj["apiVersion"], obj["kind"])]
    except KeyError:
        raise ValueError(f"{obj.get('kind')} ({obj.get('apiVersion')}) is not a kind the operator manages") from None
