"""Per-job ServiceAccount, Role and RoleBinding (pure builders).

The training pods may patch the status of their own FineTuneJob (rank 0
reports progress) and nothing else: the Role names the one resource.
"""

from __future__ import annotations

from typing import Any

from . import names
from .api import FineTuneJob
from kubetune.contract.facts import GROUP, PLURAL
from .pods import metadata


def trainer_role_rules(job_name: str) -> list[dict[str, Any]]:
    return [
        {
            "apiGroups": [GROUP],
            "resources": [f"{PLURAL}/status"],
            "resourceNames": [job_name],
            "verbs": ["get", "patch"],
        }
    ]


def service_account(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(job, names.trainer_account(job.metadata.name), "rbac"),
        # Only the train pods mount a token (they opt in); other stages need no API.
        "automountServiceAccountToken": False,
    }


def role(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(job, names.trainer_account(job.metadata.name), "rbac"),
        "rules": trainer_role_rules(job.metadata.name),
    }


def role_binding(job: FineTuneJob) -> dict[str, Any]:
    # With IRSA the pods run as the user's ServiceAccount: bind that one.
    subject = job.spec.storage.service_account_name or names.trainer_account(job.metadata.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(job, names.trainer_account(job.metadata.name), "rbac"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.trainer_account(job.metadata.name)},
        "subjects": [{"kind": "ServiceAccount", "name": subject, "namespace": job.metadata.namespace}],
    }


def rbac_objects(job: FineTuneJob) -> list[dict[str, Any]]:
    """In creation order; the ServiceAccount only when the job does not bring its own."""
    objs = [role(job), role_binding(job)]
    if not job.spec.storage.service_account_name:
        objs.insert(0, service_account(job))
    return objs
