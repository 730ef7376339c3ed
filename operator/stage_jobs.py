"""batch/v1 Jobs of the single-pod stages: validate, merge, evaluate (pure).

Each runs `kubetune <stage> --config /etc/kubetune/trainer.yaml` and leaves a
JSON termination message for the operator (docs/contracts.md).
"""

from __future__ import annotations

from typing import Any, Optional

from . import names, pods, revisions
from .api import FineTuneJob
from kubetune.contract.facts import CONFIG_PATH, LABEL_KUEUE_PRIORITY, LABEL_KUEUE_QUEUE, TERMINATION_LOG_PATH
from .settings import OperatorSettings

CONTAINER = "kubetune"


def container(
    job: FineTuneJob,
    settings: OperatorSettings,
    command: list[str],
    mounts: list[dict[str, Any]],
    resources: dict[str, Any],
    extra_env: Optional[list[dict[str, Any]]] = None,
) -> dict[str, Any]:
    return {
        "name": CONTAINER,
        "image": pods.trainer_image(job, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "env": pods.job_env(job) + pods.s3_env(job) + (extra_env or []),
        "volumeMounts": mounts,
        "resources": resources,
        "securityContext": pods.container_security_context(),
        # The stage writes its JSON verdict here; when it dies before writing,
        # the log tail is the message instead.
        "terminationMessagePath": TERMINATION_LOG_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def pod_spec(
    job: FineTuneJob,
    settings: OperatorSettings,
    containers: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    gpu_type: Optional[str],
    automount_token: bool,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": pods.service_account_for_stages(job),
        "automountServiceAccountToken": automount_token,
        "securityContext": pods.pod_security_context(settings),
        "containers": containers,
        "volumes": volumes,
        "enableServiceLinks": False,
        **pods.gpu_scheduling(gpu_type),
    }
    if job.spec.resources.priority_class_name:
        spec["priorityClassName"] = job.spec.resources.priority_class_name
    return spec


def enqueue(obj: dict[str, Any], queue_name: str, priority_class: Optional[str] = None) -> dict[str, Any]:
    """The Job created suspended with Kueue's queue label (and WorkloadPriorityClass):
    Kueue admits it (all pods of an Indexed Job at once) by unsuspending it. Pure."""
    labels = {**obj["metadata"].get("labels", {}), LABEL_KUEUE_QUEUE: queue_name}
    if priority_class:
        labels[LABEL_KUEUE_PRIORITY] = priority_class
    return {**obj, "metadata": {**obj["metadata"], "labels": labels}, "spec": {**obj["spec"], "suspend": True}}


def batch_job(
    job: FineTuneJob,
    stage: str,
    pod: dict[str, Any],
    backoff_limit: int,
    extra: Optional[dict[str, Any]] = None,
    name: Optional[str] = None,
    owned: bool = True,
    per_revision: bool = True,
) -> dict[str, Any]:
    """A stage's Job of the revision the spec asks for (`per_revision`), or a job-wide one."""
    rev = revisions.of(job) if per_revision else None
    meta = pods.metadata(job, name or names.stage_job(job.metadata.name, stage, rev), stage, owned=owned, rev=rev)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": backoff_limit,
            "suspend": False,
            **(extra or {}),
            "template": {"metadata": pods.pod_template_metadata(job, stage, rev), "spec": pod},
        },
    }


def _cpu_resources(job: FineTuneJob, gpus: int = 0) -> dict[str, Any]:
    r = job.spec.resources
    requests: dict[str, Any] = {"cpu": r.cpu, "memory": r.memory}
    limits: dict[str, Any] = {"memory": r.memory}
    if gpus:
        # Quantities are strings in the API (the client rejects bare integers).
        requests[pods.GPU_RESOURCE] = str(gpus)
        limits[pods.GPU_RESOURCE] = str(gpus)
    return {"requests": requests, "limits": limits}


def validate_job(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """Pre-flight of data and spec on CPU: fails in seconds, not after an hour of GPU."""
    volumes, mounts = pods.stage_volumes(job, revisions.of(job))
    c = container(
        job,
        settings,
        ["kubetune", "validate", "--config", CONFIG_PATH],
        mounts,
        {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
    )
    pod = pod_spec(job, settings, [c], volumes, gpu_type=None, automount_token=False)
    # Validation needs no GPU node; no toleration either.
    pod.pop("tolerations")
    return batch_job(
        job, "validate", pod, backoff_limit=0, extra={"activeDeadlineSeconds": settings.validate_deadline_seconds},
    )


def merge_job(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """Folds the adapter into the base weights on CPU (bf16), writes merged/."""
    volumes, mounts = pods.stage_volumes(job, revisions.of(job))
    c = container(job, settings, ["kubetune", "merge", "--config", CONFIG_PATH], mounts, _cpu_resources(job))
    pod = pod_spec(job, settings, [c], volumes, gpu_type=None, automount_token=False)
    # No GPU needed: stay off the (tainted) GPU nodes.
    pod.pop("tolerations")
    return batch_job(job, "merge", pod, backoff_limit=settings.stage_backoff_limit)


def evaluate_job(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """Held-out loss before vs after on one GPU; the verdict is its termination message."""
    volumes, mounts = pods.stage_volumes(job, revisions.of(job), shm_size="1Gi")
    c = container(job, settings, ["kubetune", "evaluate", "--config", CONFIG_PATH], mounts, _cpu_resources(job, gpus=1))
    pod = pod_spec(job, settings, [c], volumes, gpu_type=job.spec.resources.gpu_type, automount_token=False)
    return batch_job(job, "evaluate", pod, backoff_limit=settings.stage_backoff_limit)


CLEANUP_TTL_SECONDS = 3600


def cleanup_job(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """Deletes everything under spec.output.uri (spec.output.deleteOnJobDeletion).

    Deliberately NOT owned by the FineTuneJob: it runs while the job is being
    deleted (held by the finalizer) and must not be garbage-collected with it;
    it removes itself ttlSecondsAfterFinished later. It reads storage settings from the
    current revision's config and deletes every revision (the whole output.uri)."""
    volumes, mounts = pods.stage_volumes(job, revisions.of(job))
    c = container(
        job, settings, ["kubetune", "delete-artifacts", "--config", CONFIG_PATH, "--uri", job.spec.output.uri], mounts,
        {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
    )
    pod = pod_spec(job, settings, [c], volumes, gpu_type=None, automount_token=False)
    pod.pop("tolerations")
    return batch_job(
        job, "cleanup", pod, backoff_limit=2, extra={"ttlSecondsAfterFinished": CLEANUP_TTL_SECONDS},
        name=names.cleanup(job.metadata.name, job.metadata.uid or ""), owned=False, per_revision=False,
    )
