"""What must exist before a stage's children are created, checked by the operator
itself so that a missing object is a `Stalled` condition naming it within one
reconcile, not a Job that silently never gets a pod.

Checked: the ServiceAccount named by spec.storage.serviceAccountName (IRSA;
the per-job one is the operator's own), and with spec.resources.queueName the
Kueue API and the LocalQueue. Not checked here: Secrets. The operator holds
no permission on Secrets at all (reading one would mean reading its value);
a missing Secret shows in the pods as CreateContainerConfigError, which the
observers turn into the same Stalled condition (outcomes.STALLED_REASONS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from kubernetes.client.exceptions import ApiException

from .api import FineTuneJob

if TYPE_CHECKING:
    from .kube import Kube

KUEUE_GROUP = "kueue.x-k8s.io"


@dataclass(frozen=True)
class Missing:
    reason: str  # CamelCase, the Stalled condition's reason
    message: str  # names the object and what to do


def check(kube: "Kube", job: FineTuneJob, queued: bool) -> Optional[Missing]:
    """The first missing prerequisite of a stage (`queued`: it waits in the job's Kueue queue)."""
    ns = job.metadata.namespace
    account = job.spec.storage.service_account_name
    if account and kube.get("v1", "ServiceAccount", ns, account) is None:
        return Missing("ServiceAccountNotFound",
                       f"ServiceAccount {ns}/{account} (spec.storage.serviceAccountName) does not exist; create it")
    queue = job.spec.resources.queue_name
    if queued and queue:
        version = kube.preferred_version(KUEUE_GROUP)
        if version is None:
            return Missing("KueueNotInstalled",
                           f"spec.resources.queueName is {queue!r} but Kueue is not installed (no {KUEUE_GROUP} API); "
                           "install Kueue or remove queueName")
        try:
            found = kube.get_custom(KUEUE_GROUP, version, "localqueues", ns, queue)
        except ApiException as e:
            if e.status != 403:
                raise
            return Missing("LocalQueueUnreadable", f"the operator may not read LocalQueue {ns}/{queue}: {e.reason}")
        if found is None:
            return Missing("LocalQueueNotFound",
                           f"LocalQueue {ns}/{queue} (spec.resources.queueName) does not exist; create it")
    return None
