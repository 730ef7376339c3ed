"""vLLM serving of the result: Deployment + Service (pure builders).

`BUILDERS` is the seam between serving modes, and the one list of the modes
this operator can serve (the serve stage's admission rule is made from it):
"merged" serves `<output>/merged/` straight from S3 (vLLM's Run:ai model
streamer). "adapter" (hot-loading the adapter onto a shared base-model
server) has no builder yet, so the API server refuses it at admission.
"""

from __future__ import annotations

from typing import Any, Callable

from kubetune.contract.facts import MERGED

from . import names, pods, revisions
from .api import FineTuneJob
from .settings import OperatorSettings

PORT = 8000
CONTAINER = "vllm"


def merged_model_uri(job: FineTuneJob) -> str:
    """merged/ of the revision the spec asks for."""
    return f"{revisions.artifact_root(job.spec, revisions.of(job))}{MERGED}/"


def served_model_name(job: FineTuneJob) -> str:
    return job.spec.serving.served_model_name or job.metadata.name


def endpoint(job: FineTuneJob) -> dict[str, str]:
    service = names.serving(job.metadata.name)
    return {
        "service": service,
        "url": f"http://{service}.{job.metadata.namespace}.svc:{PORT}/v1",
        "model": served_model_name(job),
    }


def vllm_args(job: FineTuneJob, model: str) -> list[str]:
    s = job.spec.serving
    args = [
        "vllm", "serve", model,
        "--host", "0.0.0.0",
        "--port", str(PORT),
        "--served-model-name", served_model_name(job),
        "--load-format", "runai_streamer",
        "--tensor-parallel-size", str(s.gpus),
    ]
    if s.max_model_len:
        args += ["--max-model-len", str(s.max_model_len)]
    # No --api-key flag: vLLM reads VLLM_API_KEY from the environment, so the
    # key never appears in the pod spec or the process list.
    return args


def _env(job: FineTuneJob) -> list[dict[str, Any]]:
    env = pods.s3_env(job) + [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/huggingface"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
    ]
    if job.spec.storage.endpoint_url:
        # S3-compatible servers usually want path-style addressing.
        env.append({"name": "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "value": "0"})
    ref = job.spec.serving.api_key_secret_ref
    if ref:
        env.append({"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def merged_deployment(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    s = job.spec.serving
    name = names.serving(job.metadata.name)
    health = {"httpGet": {"path": "/health", "port": "http"}}
    container = {
        "name": CONTAINER,
        "image": settings.vllm_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": vllm_args(job, merged_model_uri(job)),
        "env": _env(job),
        "ports": [{"name": "http", "containerPort": PORT}],
        "resources": {"requests": {pods.GPU_RESOURCE: str(s.gpus)}, "limits": {pods.GPU_RESOURCE: str(s.gpus)}},
        # Loading weights takes minutes: the startup probe holds liveness off.
        "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**health, "periodSeconds": 15, "failureThreshold": 4},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
        # vLLM compiles kernels into caches under the image's paths.
        "securityContext": pods.container_security_context(read_only_root=False),
    }
    pod_spec = {
        "serviceAccountName": pods.service_account_for_stages(job),
        "automountServiceAccountToken": False,
        "securityContext": pods.pod_security_context(settings),
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
            {"name": "tmp", "emptyDir": {}},
        ],
        **pods.gpu_scheduling(s.gpu_type),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": pods.metadata(job, name, "serve"),
        "spec": {
            "replicas": s.replicas,
            "selector": {"matchLabels": pods.selector_labels(job, "serve")},
            "template": {"metadata": pods.pod_template_metadata(job, "serve"), "spec": pod_spec},
        },
    }


def service(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": pods.metadata(job, names.serving(job.metadata.name), "serve"),
        "spec": {
            "selector": pods.selector_labels(job, "serve"),
            "ports": [{"name": "http", "port": PORT, "targetPort": "http"}],
        },
    }


def merged_objects(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    return [merged_deployment(job, settings), service(job)]


# serving.mode -> its children, in creation order.
BUILDERS: dict[str, Callable[[FineTuneJob, OperatorSettings], list[dict[str, Any]]]] = {
    "merged": merged_objects,
}
