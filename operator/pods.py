"""Pieces shared by every child manifest: labels, ownership, the restricted
security context, S3 environment, volumes. Pure functions."""

from __future__ import annotations

from typing import Any, Optional

from . import names
from .api import FineTuneJob
from kubetune.contract.facts import (
    API_VERSION,
    CACHE_DIR,
    CONFIG_DIR,
    ENV_CACHE_DIR,
    ENV_JOB_NAME,
    ENV_JOB_NAMESPACE,
    KIND,
    LABEL_COMPONENT,
    LABEL_GENERATION,
    LABEL_INSTANCE,
    LABEL_JOB,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_REVISION,
    LABEL_STAGE,
    MANAGED_BY,
)
from .settings import OperatorSettings

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


def labels(job: FineTuneJob, stage: str, rev: Optional[str] = None) -> dict[str, str]:
    """`rev`: the revision of a per-revision child (its stage Jobs, ConfigMap, train Service)."""
    out = {
        LABEL_NAME: "kubetune",
        LABEL_INSTANCE: job.metadata.name,
        LABEL_COMPONENT: stage,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_JOB: job.metadata.name,
        LABEL_STAGE: stage,
        # Which spec generation this child was built from: a later edit never
        # rewrites a running child, and this label says which spec it ran.
        LABEL_GENERATION: str(job.metadata.generation or 1),
    }
    if rev:
        out[LABEL_REVISION] = rev
    return out


def pod_template_metadata(job: FineTuneJob, stage: str, rev: Optional[str] = None) -> dict[str, Any]:
    """Pod labels/annotations: the user's (spec.podMetadata) under the operator's own,
    which always win so that selectors and ownership lookups keep working."""
    user_labels, annotations = job.spec.pod_metadata.for_stage(stage)
    meta: dict[str, Any] = {"labels": {**user_labels, **labels(job, stage, rev)}}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def selector_labels(job: FineTuneJob, stage: str, rev: Optional[str] = None) -> dict[str, str]:
    """The stable subset used in selectors (never the generation)."""
    out = {LABEL_JOB: job.metadata.name, LABEL_STAGE: stage}
    if rev:
        out[LABEL_REVISION] = rev
    return out


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    if not job.metadata.uid:
        raise ValueError(f"FineTuneJob {job.metadata.name}: metadata.uid is needed to own children")
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(
    job: FineTuneJob, name: str, stage: str, extra_labels: Optional[dict[str, str]] = None, owned: bool = True,
    rev: Optional[str] = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": {**labels(job, stage, rev), **(extra_labels or {})},
    }
    if owned:
        meta["ownerReferences"] = [owner_reference(job)]
    return meta


def pod_security_context(settings: OperatorSettings) -> dict[str, Any]:
    """Pod Security Standard "restricted"."""
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_user,
        "fsGroup": settings.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(read_only_root: bool = True) -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": read_only_root,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def s3_env(job: FineTuneJob) -> list[dict[str, Any]]:
    """docs/contracts.md "S3 access in pods": secrets by reference only."""
    return s3_env_for(job.spec.storage)


def s3_env_for(storage: Any) -> list[dict[str, Any]]:
    """The S3 environment of a pod reading with `storage` (a spec.storage)."""
    env: list[dict[str, Any]] = []
    if storage.endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint_url})
    if storage.region:
        env.append({"name": "AWS_REGION", "value": storage.region})
    if storage.credentials_secret_ref:
        secret = storage.credentials_secret_ref.name
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    return env


def job_env(job: FineTuneJob) -> list[dict[str, Any]]:
    """Who the pod works for (the trainer patches this job's status) and caches."""
    return [
        {"name": ENV_JOB_NAME, "value": job.metadata.name},
        {"name": ENV_JOB_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": ENV_CACHE_DIR, "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def stage_volumes(job: FineTuneJob, rev: str, shm_size: Optional[str] = None) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts): the config, scratch space and the shared-memory
    tmpfs that NCCL and data loader workers need (the default 64 MiB is too small)."""
    volumes = [
        {"name": "config", "configMap": {"name": names.config_map(job.metadata.name, rev)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": CACHE_DIR},
    ]
    if shm_size:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def gpu_scheduling(gpu_type: Optional[str]) -> dict[str, Any]:
    """nodeSelector + toleration for GPU nodes (tainted nvidia.com/gpu by convention)."""
    out: dict[str, Any] = {
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
    }
    if gpu_type:
        out["nodeSelector"] = {GPU_PRODUCT_LABEL: gpu_type}
    return out


def trainer_image(job: FineTuneJob, settings: OperatorSettings) -> str:
    return job.spec.image or settings.trainer_image


def service_account_for_stages(job: FineTuneJob) -> str:
    """IRSA: the user's ServiceAccount carries cloud credentials; otherwise the per-job one."""
    return job.spec.storage.service_account_name or names.trainer_account(job.metadata.name)
