"""vLLM serving of the result (pure builders).

Merged mode serves `<output>/merged/` straight from S3 (vLLM's Run:ai model
streamer) with a server of the job's own. The builders are written over the
serving settings rather than the job where adapter mode's shared server
(adapter_servers.py) uses them too. `stages.SERVING_MODES` is the one list of
the modes.

What a merged-mode job gets (docs/serving.md says why for each):

- Deployment: vLLM at the pinned release (kubetune/contract/vllm.py), CPU and
  memory requests sized for weight streaming (the streamer's host buffer held
  to half the memory), progressDeadlineSeconds longer than the startup probe's
  budget plus the verification, a preStop pause and a drain timeout inside the
  grace period, and an init container (`kubetune verify-artifact`) that checks
  every file of merged/ against MANIFEST.json and refuses files the manifest
  does not list, so vLLM streams only the verified, manifested shards.
  With autoscaling the Deployment carries no replicas (server-side apply then
  leaves the field to the HorizontalPodAutoscaler).
- Service, NetworkPolicy (ingress to the vLLM port from the job's namespace
  and the installation's serving_allowed_namespaces only), PodDisruptionBudget
  (one pod at a time).
- With an API key: a ConfigMap holding `vllm_auth.py`, the middleware that
  puts the key in front of every path (vLLM's own check covers /v1 only).
- With autoscaling: a HorizontalPodAutoscaler on vllm:num_requests_waiting.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Optional, Union

from kubetune.contract.facts import MERGED

from . import names, pods, revisions
from .api import FineTuneJob
from .api.adapterserver import ServerServing
from .api.spec import SecretKeyRef, ServingSpec, StorageSpec
from .settings import OperatorSettings

# A job's spec.serving or a shared adapter server's settings: the fields a vLLM server is built from.
Serving = Union[ServingSpec, ServerServing]

PORT = 8000
CONTAINER = "vllm"
VERIFY_CONTAINER = "verify-artifact"
# The middleware module as vLLM imports it (--middleware), mounted from a ConfigMap.
AUTH_MODULE = "kubetune_vllm_auth"
AUTH_DIR = "/etc/kubetune/vllm"
AUTH_SOURCE = Path(__file__).with_name("vllm_auth.py")
# vLLM's Prometheus gauge of requests waiting for a slot; the HPA reads it as a pods metric.
WAITING_METRIC = "vllm:num_requests_waiting"


def merged_model_uri(job: FineTuneJob) -> str:
    """merged/ of the revision the spec asks for."""
    return f"{revisions.artifact_root(job.spec, revisions.of(job))}{MERGED}/"


def served_model_name(job: FineTuneJob) -> str:
    return job.spec.serving.served_model_name or job.metadata.name


def service_url(service: str, namespace: str) -> str:
    """The in-cluster base URL of the OpenAI-compatible API behind a vLLM Service."""
    return f"http://{service}.{namespace}.svc:{PORT}/v1"


def endpoint(job: FineTuneJob) -> dict[str, str]:
    service = names.serving(job.metadata.name)
    return {"service": service, "url": service_url(service, job.metadata.namespace), "model": served_model_name(job)}


_QUANTITY = re.compile(r"^([0-9]+(?:[.][0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (the spec's pattern) in bytes."""
    m = _QUANTITY.match(quantity)
    if m is None:
        raise ValueError(f"not a quantity: {quantity!r}")
    return int(float(m.group(1)) * _FACTORS[m.group(2)])


def streamer_memory_limit(job: FineTuneJob) -> int:
    """Bytes the Run:ai streamer may buffer in host memory: half the pod's memory, so that streaming
    (and vLLM's own host allocations beside it) stay inside the limit instead of getting OOM-killed."""
    return _streamer_limit(job.spec.serving)


def _streamer_limit(s: Serving) -> int:
    return quantity_bytes(s.memory) // 2


def vllm_args(job: FineTuneJob, model: str, settings: Optional[OperatorSettings] = None) -> list[str]:
    return server_args(job.spec.serving, model, served_model_name(job), settings or OperatorSettings())


def server_args(s: Serving, model: str, served_name: str, settings: OperatorSettings) -> list[str]:
    """`vllm serve` of `model` from S3 with the settings `s` (a job's spec.serving, or a shared
    adapter server's): the part merged and adapter servers have in common."""
    args = [
        "vllm", "serve", model,
        "--host", "0.0.0.0",
        "--port", str(PORT),
        "--served-model-name", served_name,
        "--load-format", "runai_streamer",
        "--model-loader-extra-config", json.dumps({"memory_limit": _streamer_limit(s)}),
        "--tensor-parallel-size", str(s.gpus),
        # On SIGTERM vLLM stops taking requests and finishes those in flight for up to this long
        # (0 would abort them); the pod's grace period covers it.
        "--shutdown-timeout", str(settings.serving_drain_seconds),
    ]
    if s.max_model_len:
        args += ["--max-model-len", str(s.max_model_len)]
    if s.api_key_secret_ref:
        # No --api-key flag: vLLM reads VLLM_API_KEY from the environment, so the key never appears in
        # the pod spec or the process list. Its own check guards /v1 only; this middleware every path.
        args += ["--middleware", f"{AUTH_MODULE}.RequireApiKey"]
    return args


def verify_args(job: FineTuneJob) -> list[str]:
    """The init container's command: merged/ checked against its manifest before vLLM reads it."""
    return ["kubetune", "verify-artifact", merged_model_uri(job),
            "--tensor-parallel-size", str(job.spec.serving.gpus)]


def server_env(s: Serving, storage: StorageSpec, middleware: bool) -> list[dict[str, Any]]:
    env = pods.s3_env_for(storage) + [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/huggingface"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
    ]
    if storage.endpoint_url:
        # S3-compatible servers usually want path-style addressing.
        env.append({"name": "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "value": "0"})
    if s.api_key_secret_ref:
        env.append(api_key_env(s.api_key_secret_ref))
    if middleware:
        env.append({"name": "PYTHONPATH", "value": AUTH_DIR})
    return env


def api_key_env(ref: SecretKeyRef) -> dict[str, Any]:
    return {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def auth_config_map_name(job: FineTuneJob) -> str:
    return auth_name(names.serving(job.metadata.name))


def auth_name(server: str) -> str:
    # Named by content: ConfigMaps are created once, so a new middleware (operator upgrade) is a new name
    # and the Deployment's rollout moves to it.
    digest = hashlib.sha256(AUTH_SOURCE.read_bytes()).hexdigest()[:8]
    return f"{server}-auth-{digest}"


def auth_config_map(job: FineTuneJob) -> dict[str, Any]:
    return auth_config_map_for(pods.metadata(job, auth_config_map_name(job), "serve"))


def auth_config_map_for(metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {f"{AUTH_MODULE}.py": AUTH_SOURCE.read_text(encoding="utf-8")},
    }


def startup_budget_seconds(settings: OperatorSettings) -> int:
    return settings.serving_startup_seconds


def progress_deadline_seconds(settings: OperatorSettings) -> int:
    """Longer than everything a healthy pod may take before Ready: image pull and checksum pass (margin)
    plus the startup probe's whole budget. A shorter deadline (the default 600 s) fails a slow but healthy
    start for good."""
    return startup_budget_seconds(settings) + settings.serving_progress_margin_seconds


def grace_period_seconds(settings: OperatorSettings) -> int:
    # preStop pause, then vLLM's drain, then a little for the process to exit.
    return settings.serving_prestop_seconds + settings.serving_drain_seconds + 15


def _verify_container(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "name": VERIFY_CONTAINER,
        "image": pods.trainer_image(job, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "command": verify_args(job),
        "env": pods.s3_env(job) + [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONUNBUFFERED", "value": "1"}],
        # Hashing streams each file in chunks: little memory, one core.
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "terminationMessagePolicy": "File",
        "securityContext": pods.container_security_context(read_only_root=True),
    }


def vllm_container(s: Serving, storage: StorageSpec, command: list[str], settings: OperatorSettings,
                   middleware: bool, extra_env: tuple[dict[str, Any], ...] = (),
                   extra_mounts: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """The vLLM container of a merged or a shared adapter server."""
    health = {"httpGet": {"path": "/health", "port": "http"}}
    period = 10
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}, *extra_mounts]
    if middleware:
        mounts.append({"name": "auth", "mountPath": AUTH_DIR, "readOnly": True})
    return {
        "name": CONTAINER,
        "image": settings.vllm_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "env": server_env(s, storage, middleware) + list(extra_env),
        "ports": [{"name": "http", "containerPort": PORT}],
        # Requests, not only GPUs: a pod without CPU/memory requests is BestEffort (evicted first) while the
        # streamer holds weights in host memory. Memory limit = request (no overcommit of the buffer).
        "resources": {
            "requests": {pods.GPU_RESOURCE: str(s.gpus), "cpu": s.cpu, "memory": s.memory},
            "limits": {pods.GPU_RESOURCE: str(s.gpus), "memory": s.memory},
        },
        # Loading weights takes minutes: the startup probe holds liveness off for the whole budget.
        "startupProbe": {**health, "periodSeconds": period,
                         "failureThreshold": startup_budget_seconds(settings) // period},
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**health, "periodSeconds": 15, "failureThreshold": 4},
        # The pod leaves the Service's endpoints while it pauses here, before vLLM gets SIGTERM.
        "lifecycle": {"preStop": {"sleep": {"seconds": settings.serving_prestop_seconds}}},
        "volumeMounts": mounts,
        # vLLM compiles kernels into caches under the image's paths.
        "securityContext": pods.container_security_context(read_only_root=False),
    }


def server_volumes(auth_config_map: Optional[str]) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if auth_config_map:
        volumes.append({"name": "auth", "configMap": {"name": auth_config_map}})
    return volumes


def server_deployment(*, metadata: dict[str, Any], selector: dict[str, str], template_metadata: dict[str, Any],
                      s: Serving, service_account: str, settings: OperatorSettings, containers: list[dict[str, Any]],
                      volumes: list[dict[str, Any]], init_containers: list[dict[str, Any]],
                      replicas: Optional[int], extra_pod_spec: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A vLLM Deployment; `replicas` None leaves the count to an autoscaler (server-side apply then
    never resets it)."""
    pod_spec = {
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,
        "securityContext": pods.pod_security_context(settings),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": grace_period_seconds(settings),
        "initContainers": init_containers,
        "containers": containers,
        "volumes": volumes,
        **pods.gpu_scheduling(s.gpu_type),
        **(extra_pod_spec or {}),
    }
    spec: dict[str, Any] = {
        "progressDeadlineSeconds": progress_deadline_seconds(settings),
        # Blue/green at the pod level: a new revision's (or template's) replica is added and must be Ready
        # before an old one goes, so the Service never runs out of ready endpoints. It needs room for one
        # more replica while it rolls out.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "selector": {"matchLabels": selector},
        "template": {"metadata": template_metadata, "spec": pod_spec},
    }
    if replicas is not None:
        spec = {"replicas": replicas, **spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": spec}


def merged_deployment(job: FineTuneJob, settings: OperatorSettings, canary: bool = False) -> dict[str, Any]:
    """`canary`: the new revision's one-replica canary beside the serving Deployment (serving.canary)."""
    s = job.spec.serving
    auth = auth_config_map_name(job) if s.api_key_secret_ref else None
    container = vllm_container(s, job.spec.storage, vllm_args(job, merged_model_uri(job), settings), settings,
                               middleware=auth is not None)
    stage = CANARY_STAGE if canary else "serve"
    name = names.canary(job.metadata.name) if canary else names.serving(job.metadata.name)
    return server_deployment(
        metadata=pods.metadata(job, name, stage),
        selector=pods.selector_labels(job, stage),
        # The pods say which revision they serve (not in the selector: the Service keeps selecting both
        # revisions' pods while one replaces the other).
        template_metadata=pods.pod_template_metadata(job, stage, revisions.of(job)),
        s=s, service_account=pods.service_account_for_stages(job), settings=settings,
        containers=[container], volumes=server_volumes(auth), init_containers=[_verify_container(job, settings)],
        # With an autoscaler the field is left out: server-side apply then never resets the HPA's count.
        replicas=1 if canary else s.replicas if s.autoscaling is None else None,
    )


# The canary's pods are told apart from the serving ones by their stage label (the Service of each selects
# its own).
CANARY_STAGE = "canary"
GATEWAY_API = "gateway.networking.k8s.io"


def canary_objects(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The new revision's canary: one replica and a Service of its own, which the HTTPRoute weighs."""
    return [merged_deployment(job, settings, canary=True),
            service_for(pods.metadata(job, names.canary(job.metadata.name), CANARY_STAGE),
                        pods.selector_labels(job, CANARY_STAGE))]


def http_route(job: FineTuneJob, canary_weight: Optional[int] = None) -> dict[str, Any]:
    """The job's HTTPRoute on its Gateway: all requests to the serving Service, or `canary_weight` percent
    of them to the canary's while a canary runs."""
    c = job.spec.serving.canary
    assert c is not None
    parent: dict[str, Any] = {"name": c.gateway.name}
    if c.gateway.section_name:
        parent["sectionName"] = c.gateway.section_name
    backends = [{"name": names.serving(job.metadata.name), "port": PORT, "weight": 100 - (canary_weight or 0)}]
    if canary_weight:
        backends.append({"name": names.canary(job.metadata.name), "port": PORT, "weight": canary_weight})
    return {
        "apiVersion": f"{GATEWAY_API}/v1",
        "kind": "HTTPRoute",
        "metadata": pods.metadata(job, names.serving(job.metadata.name), "serve"),
        "spec": {"parentRefs": [parent], "rules": [{"backendRefs": backends}]},
    }


def service(job: FineTuneJob) -> dict[str, Any]:
    return service_for(pods.metadata(job, names.serving(job.metadata.name), "serve"), pods.selector_labels(job, "serve"))


def service_for(metadata: dict[str, Any], selector: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {"selector": selector, "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]},
    }


def allowed_namespaces(job: FineTuneJob, settings: OperatorSettings) -> list[str]:
    return allowed_namespaces_for(job.metadata.namespace, settings)


def allowed_namespaces_for(namespace: str, settings: OperatorSettings) -> list[str]:
    extra = [n.strip() for n in settings.serving_allowed_namespaces.split(",") if n.strip()]
    return sorted({namespace, *extra})


def network_policy(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    return network_policy_for(pods.metadata(job, names.serving(job.metadata.name), "serve"),
                              pods.selector_labels(job, "serve"), allowed_namespaces(job, settings))


def network_policy_for(metadata: dict[str, Any], selector: dict[str, str], allowed: list[str]) -> dict[str, Any]:
    """Ingress to the vLLM pods: the vLLM port, from the server's namespace and the installation's
    serving_allowed_namespaces; everything else is denied (a NetworkPolicy that selects a pod denies what
    it does not allow). Egress stays open: the pods stream from S3 endpoints the operator cannot enumerate."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"namespaceSelector": {"matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": allowed}]}}],
                "ports": [{"protocol": "TCP", "port": PORT}],
            }],
        },
    }


def pod_disruption_budget(job: FineTuneJob) -> dict[str, Any]:
    return pod_disruption_budget_for(pods.metadata(job, names.serving(job.metadata.name), "serve"),
                                     pods.selector_labels(job, "serve"))


def pod_disruption_budget_for(metadata: dict[str, Any], selector: dict[str, str]) -> dict[str, Any]:
    """Voluntary disruptions (node drains) take one vLLM pod at a time. maxUnavailable, not minAvailable:
    a single replica can still be drained; a crash-looping pod never blocks a drain."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata,
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def autoscaler(job: FineTuneJob) -> dict[str, Any]:
    a = job.spec.serving.autoscaling
    assert a is not None
    name = names.serving(job.metadata.name)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": pods.metadata(job, name, "serve"),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": a.min_replicas,
            "maxReplicas": a.max_replicas,
            "metrics": [{
                "type": "Pods",
                "pods": {
                    "metric": {"name": WAITING_METRIC},
                    "target": {"type": "AverageValue", "averageValue": str(a.target_waiting_requests)},
                },
            }],
            # A new replica needs minutes to load weights: scale down slowly, so that a lull does not
            # throw away replicas the next burst needs again.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}},
        },
    }


# The kinds of a merged-mode server, all named names.serving(job): deleted, Deployment last, when the job
# stops serving that way (reconcile.retire_old_serving).
MERGED_KINDS = (
    (f"{GATEWAY_API}/v1", "HTTPRoute"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
)


def merged_objects(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    objs = []
    if job.spec.serving.api_key_secret_ref:
        objs.append(auth_config_map(job))  # before the pods that mount it
    objs += [merged_deployment(job, settings), service(job), network_policy(job, settings),
             pod_disruption_budget(job)]
    if job.spec.serving.autoscaling is not None:
        objs.append(autoscaler(job))
    if job.spec.serving.canary is not None:
        objs.append(http_route(job))  # all traffic to the serving Service (a canary weighs it: reconcile.canary)
    return objs
