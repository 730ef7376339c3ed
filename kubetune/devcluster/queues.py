"""Kueue objects for tests (kueue.x-k8s.io/v1beta2): pure builders of
ResourceFlavor, ClusterQueue, LocalQueue and WorkloadPriorityClass, reading a
Job's Workload and its conditions, and `Queues`, which creates them on a
cluster and deletes them again after a test.

Kueue's Workload conditions, as tests read them:
- QuotaReserved: True once a flavor and quota were assigned; False with
  Kueue's own reason in the message while it waits (e.g. "couldn't assign
  flavors to pod set main: insufficient unused quota for nvidia.com/gpu in
  flavor gpu, 4 more needed").
- Admitted: True once quota is reserved and every admission check passed;
  the Job is then unsuspended.
- Evicted: True when preempted (reason Preempted) or otherwise evicted; the
  Job is suspended again and the Workload goes back to the queue.
- Finished: True once the Job completed or failed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
API_VERSION = f"{GROUP}/{VERSION}"
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
GPU = "nvidia.com/gpu"

# Kind -> (plural, namespaced)
_KINDS = {
    "ResourceFlavor": ("resourceflavors", False),
    "ClusterQueue": ("clusterqueues", False),
    "LocalQueue": ("localqueues", True),
    "WorkloadPriorityClass": ("workloadpriorityclasses", False),
    "Cohort": ("cohorts", False),
    "Workload": ("workloads", True),
}


def resource_flavor(name: str, node_labels: dict[str, str] | None = None, tolerations: list[dict] | None = None) -> dict:
    """A ResourceFlavor; with `node_labels`, admitted pods get them as a node selector."""
    spec: dict = {}
    if node_labels:
        spec["nodeLabels"] = node_labels
    if tolerations:
        spec["tolerations"] = tolerations
    return {"apiVersion": API_VERSION, "kind": "ResourceFlavor", "metadata": {"name": name}, "spec": spec}


def _quota(name: str, nominal, borrowing=None, lending=None) -> dict:
    quota = {"name": name, "nominalQuota": str(nominal)}
    if borrowing is not None:
        quota["borrowingLimit"] = str(borrowing)
    if lending is not None:
        quota["lendingLimit"] = str(lending)
    return quota


def cluster_queue(
    name: str,
    flavor: str,
    gpus: int,
    cpu: str = "64",
    memory: str = "512Gi",
    cohort: str | None = None,
    gpu_borrowing_limit: int | None = None,
    gpu_lending_limit: int | None = None,
    preemption: dict | None = None,
    namespace_selector: dict | None = None,
) -> dict:
    """A ClusterQueue with one flavor covering cpu, memory and nvidia.com/gpu.

    `namespace_selector` defaults to every namespace ({}); Kueue's own default
    (null) admits none. `preemption` is Kueue's ClusterQueuePreemption, e.g.
    {"withinClusterQueue": "LowerPriority", "reclaimWithinCohort": "Any"}.
    Borrowing and lending limits apply to GPUs, the resource tests share.
    """
    spec: dict = {
        "namespaceSelector": {} if namespace_selector is None else namespace_selector,
        "resourceGroups": [
            {
                "coveredResources": ["cpu", "memory", GPU],
                "flavors": [
                    {
                        "name": flavor,
                        "resources": [
                            _quota("cpu", cpu),
                            _quota("memory", memory),
                            _quota(GPU, gpus, gpu_borrowing_limit, gpu_lending_limit),
                        ],
                    }
                ],
            }
        ],
    }
    if cohort:
        spec["cohortName"] = cohort
    if preemption:
        spec["preemption"] = preemption
    return {"apiVersion": API_VERSION, "kind": "ClusterQueue", "metadata": {"name": name}, "spec": spec}


def local_queue(name: str, namespace: str, cluster_queue_name: str) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterQueue": cluster_queue_name},
    }


def workload_priority_class(name: str, value: int, description: str = "") -> dict:
    """Jobs select it with the label `kueue.x-k8s.io/priority-class: <name>`."""
    return {
        "apiVersion": API_VERSION,
        "kind": "WorkloadPriorityClass",
        "metadata": {"name": name},
        "value": value,
        "description": description or f"priority {value}",
    }


def condition(workload: dict | None, kind: str) -> dict | None:
    """The condition `kind` (QuotaReserved, Admitted, Evicted, Finished, ...) of a Workload."""
    for item in ((workload or {}).get("status") or {}).get("conditions") or []:
        if item["type"] == kind:
            return item
    return None


def is_true(workload: dict | None, kind: str) -> bool:
    found = condition(workload, kind)
    return bool(found) and found["status"] == "True"


def owned_by(workload: dict, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in workload["metadata"].get("ownerReferences") or [])


@dataclass
class Queues:
    """Creates Kueue objects through an admin ApiClient and deletes them in `cleanup`.

    Cluster-scoped names get a random suffix: tests share one control plane
    for the whole session, and a deleted ClusterQueue lingers while Kueue's
    finalizer waits for its workloads to go.
    """

    api_client: object
    created: list[tuple[str, str, str | None]] = field(default_factory=list)

    @property
    def _custom(self):
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client)

    def create(self, obj: dict) -> dict:
        plural, namespaced = _KINDS[obj["kind"]]
        if namespaced:
            ns = obj["metadata"]["namespace"]
            made = self._custom.create_namespaced_custom_object(GROUP, VERSION, ns, plural, obj)
        else:
            ns = None
            made = self._custom.create_cluster_custom_object(GROUP, VERSION, plural, obj)
        self.created.append((obj["kind"], obj["metadata"]["name"], ns))
        return made

    @staticmethod
    def unique(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:6]}"

    def resource_flavor(self, prefix: str = "flavor", **kwargs) -> str:
        name = self.unique(prefix)
        self.create(resource_flavor(name, **kwargs))
        return name

    def cluster_queue(self, flavor: str, gpus: int, prefix: str = "cq", **kwargs) -> str:
        name = self.unique(prefix)
        self.create(cluster_queue(name, flavor, gpus, **kwargs))
        return name

    def set_gpu_quota(self, cluster_queue_name: str, gpus: int) -> None:
        """Change a ClusterQueue's nominal GPU quota (every flavor), as an admin raising a team's quota."""
        cq = self.get("ClusterQueue", cluster_queue_name)
        groups = cq["spec"]["resourceGroups"]
        for group in groups:
            for flavor in group["flavors"]:
                for quota in flavor["resources"]:
                    if quota["name"] == GPU:
                        quota["nominalQuota"] = str(gpus)
        # A merge patch replaces the whole list, which is what is wanted here.
        self._custom.patch_cluster_custom_object(GROUP, VERSION, "clusterqueues", cluster_queue_name,
                                                 {"spec": {"resourceGroups": groups}})

    def local_queue(self, namespace: str, cluster_queue_name: str, name: str = "queue") -> str:
        self.create(local_queue(name, namespace, cluster_queue_name))
        return name

    def priority_class(self, value: int, prefix: str = "priority") -> str:
        name = self.unique(prefix)
        self.create(workload_priority_class(name, value))
        return name

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict:
        plural, namespaced = _KINDS[kind]
        if namespaced:
            return self._custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        return self._custom.get_cluster_custom_object(GROUP, VERSION, plural, name)

    def workload_for_job(self, namespace: str, job_name: str) -> dict | None:
        """The Workload Kueue made for a Job (owned by it), or None before it exists."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            uid = client.BatchV1Api(self.api_client).read_namespaced_job(job_name, namespace).metadata.uid
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        workloads = self._custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "workloads")["items"]
        return next((w for w in workloads if owned_by(w, uid)), None)

    def wait_workload(self, namespace: str, job_name: str, until=None, what: str = "", timeout: float = 60) -> dict:
        """Wait until the Job's Workload exists and `until(workload)` holds; returns it."""
        from kubetune.devcluster.cluster import wait_for

        def check():
            workload = self.workload_for_job(namespace, job_name)
            return workload if workload is not None and (until is None or until(workload)) else None

        return wait_for(f"Workload of Job {namespace}/{job_name} {what}".rstrip(), check, timeout=timeout)

    def cleanup(self) -> None:
        """Delete what `create` made, newest first (LocalQueues before their ClusterQueues)."""
        from kubernetes.client.rest import ApiException

        for kind, name, ns in reversed(self.created):
            plural, namespaced = _KINDS[kind]
            try:
                if namespaced:
                    self._custom.delete_namespaced_custom_object(GROUP, VERSION, ns, plural, name)
                else:
                    self._custom.delete_cluster_custom_object(GROUP, VERSION, plural, name)
            except ApiException as error:
                if error.status != 404:
                    raise
        self.created.clear()
