"""Adapter mode: one vLLM server per base model (and shared serving settings), carrying the adapters of
several FineTuneJobs (pure builders and readings; the I/O is in reconcile.py and handlers.py).

How the pieces fit (docs/serving.md, "Adapter mode"):

- a job in adapter mode applies its `intent`: the AdapterServer named by the hash of the
  server-defining fields, with the job's own entry in `spec.adapters` and the job's own owner
  reference, under the job's own field manager (`children.owner_manager`). Server-side apply merges the
  entries of every job (a list-map keyed by name) and removes only the applying job's entry
  when it applies `leave_intent`;
- the operator's server pass (`server_objects`, `server_status`) builds the server's children
  from the entries of jobs that still own it (`live_adapters`): a Deployment of vLLM with
  `--enable-lora` sized for them plus the loader sidecar, Service, NetworkPolicy,
  PodDisruptionBudget, and the loader's ServiceAccount and Role;
- the loader sidecar (trainer/adapter_loader.py, `kubetune adapter-loader`) reads the
  AdapterServer, fetches and verifies each adapter, loads it through vLLM's runtime API, writes
  `status.adapters`, and answers the pod's readiness probe: a pod is Ready only with every
  assigned adapter loaded;
- the job reads the server's Deployment and `status.adapters` (`job_outcome`); its endpoint is the
  shared Service with the job's model name.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from kubetune.contract import vllm as pin
from kubetune.contract.adapters import live_adapters, owners, stale_entries
from kubetune.contract.facts import (
    API_VERSION,
    GROUP,
    KIND,
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    MANAGED_BY,
)

from . import pods, revisions, serving
from .api import FineTuneJob
from .api.adapterserver import KIND as SERVER_KIND
from .api.adapterserver import PLURAL as SERVER_PLURAL
from .api.adapterserver import AdapterServerSpec, ServerServing
from .conditions import now, set_condition
from .outcomes import StageOutcome, deployment_outcome
from .settings import OperatorSettings

# The label on every child of a server: its Service selects the pods by it, the operator finds them by it.
LABEL_SERVER = f"{GROUP}/adapter-server"
COMPONENT = "adapter-server"
LOADER_CONTAINER = "adapter-loader"
LOADER_PORT = 8001
ADAPTER_DIR = "/adapters"
# Where a container reads its API token (the path the Kubernetes client looks at in a pod).
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# vLLM's switch for /v1/load_lora_adapter and /v1/unload_lora_adapter.
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
# The middleware that admits those two routes from the pod's loopback only (the sidecar).
LOOPBACK_MIDDLEWARE = f"{serving.AUTH_MODULE}.LoopbackAdapterUpdates"


# ---------------------------------------------------------------- which server a job belongs on


def server_serving(job: FineTuneJob) -> ServerServing:
    s = job.spec.serving
    return ServerServing(gpus=s.gpus, gpu_type=s.gpu_type, replicas=s.replicas, cpu=s.cpu, memory=s.memory,
                         max_model_len=s.max_model_len, api_key_secret_ref=s.api_key_secret_ref)


def _shared_spec(job: FineTuneJob) -> dict[str, Any]:
    """The server-defining fields, as applied (camelCase, no nulls)."""
    return {
        "baseModel": job.spec.base_model.uri,
        "serving": server_serving(job).model_dump(by_alias=True, exclude_none=True),
        "storage": job.spec.storage.model_dump(by_alias=True, exclude_none=True),
    }


def server_name(job: FineTuneJob) -> str:
    """Jobs whose server-defining fields agree share a server; any difference is another server (so
    two jobs never fight over a field of one object)."""
    digest = hashlib.sha256(json.dumps(_shared_spec(job), sort_keys=True).encode()).hexdigest()[:10]
    return f"adapters-{digest}"


def wanted_server(job: FineTuneJob) -> Optional[str]:
    """The server the spec puts the job's adapter on, or None (merged mode, serving off)."""
    s = job.spec.serving
    return server_name(job) if s.enabled and s.mode == "adapter" else None


def adapter_uri(job: FineTuneJob) -> str:
    return f"{revisions.artifact_root(job.spec, revisions.of(job))}adapter/"


def _job_reference(job: FineTuneJob) -> dict[str, Any]:
    ref = pods.owner_reference(job)
    # One of several owners: not the controller, and a job's foreground deletion does not wait for the
    # shared server.
    return {**ref, "controller": False, "blockOwnerDeletion": False}


def intent(job: FineTuneJob) -> dict[str, Any]:
    """What the job applies, with `children.owner_manager(uid)`: the server's shared fields, its own entry and its
    own owner reference."""
    return {
        "apiVersion": API_VERSION,
        "kind": SERVER_KIND,
        "metadata": {
            "name": server_name(job),
            "namespace": job.metadata.namespace,
            "labels": {LABEL_NAME: "kubetune", LABEL_COMPONENT: COMPONENT, LABEL_MANAGED_BY: MANAGED_BY},
            "ownerReferences": [_job_reference(job)],
        },
        "spec": {
            **_shared_spec(job),
            "adapters": [{"name": serving.served_model_name(job), "job": job.metadata.name, "uri": adapter_uri(job),
                          "rank": job.spec.method.r}],
        },
    }


def leave_intent(server: str, namespace: str) -> dict[str, Any]:
    """Applied with the job's manager: it owns nothing any more, so its entry and owner reference go."""
    return {"apiVersion": API_VERSION, "kind": SERVER_KIND, "metadata": {"name": server, "namespace": namespace}}


# ---------------------------------------------------------------- the server's own objects


def prune_patch(server: dict[str, Any]) -> list[dict[str, Any]]:
    """A JSON patch removing the stale entries, each guarded by a test of its job (so an entry that moved
    or changed in between is not removed by mistake: the patch fails and the next pass reads again)."""
    entries = (server.get("spec") or {}).get("adapters") or []
    ops: list[dict[str, Any]] = []
    for i in reversed(stale_entries(server)):
        ops.append({"op": "test", "path": f"/spec/adapters/{i}/job", "value": entries[i]["job"]})
        ops.append({"op": "remove", "path": f"/spec/adapters/{i}"})
    return ops


def _bucket(n: int) -> int:
    out = 1
    while out < n:
        out *= 2
    return out


def lora_slots(count: int, settings: OperatorSettings) -> tuple[int, int]:
    """(--max-loras, --max-cpu-loras) for `count` adapters.

    Powers of two: a change of these flags is a new pod template (a rolling restart of the shared
    server), so they grow and shrink in steps, not with every job. GPU slots are capped by the
    installation (`adapter_max_gpu_loras`): each reserves GPU memory for a rank-`--max-lora-rank`
    adapter on every layer; the CPU cache holds them all (vLLM swaps an adapter in on demand)."""
    n = max(1, _bucket(count))
    gpu = min(n, settings.adapter_max_gpu_loras)
    return gpu, max(n, gpu)


def lora_rank(adapters: list[dict[str, Any]]) -> int:
    """--max-lora-rank for these adapters: vLLM's smallest choice at or above the largest rank."""
    return pin.max_lora_rank_for(max([a["rank"] for a in adapters] or [1]))


def server_labels(name: str) -> dict[str, str]:
    return {LABEL_NAME: "kubetune", LABEL_INSTANCE: name, LABEL_COMPONENT: COMPONENT, LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_SERVER: name}


def _metadata(server: dict[str, Any], name: str) -> dict[str, Any]:
    meta = server["metadata"]
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": server_labels(meta["name"]),
        "ownerReferences": [{"apiVersion": API_VERSION, "kind": SERVER_KIND, "name": meta["name"], "uid": meta["uid"],
                             "controller": True, "blockOwnerDeletion": True}],
    }


def loader_account(server: str) -> str:
    return f"{server}-loader"


def service_account(server: dict[str, Any], spec: AdapterServerSpec) -> str:
    """IRSA: the user's ServiceAccount carries the cloud credentials the pods read S3 with."""
    return spec.storage.service_account_name or loader_account(server["metadata"]["name"])


def loader_rbac(server: dict[str, Any], spec: AdapterServerSpec) -> list[dict[str, Any]]:
    """The sidecar reads its server and writes `status.adapters`, of this one object only."""
    name = server["metadata"]["name"]
    account = loader_account(name)
    objs = [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _metadata(server, account),
         "rules": [
             {"apiGroups": [GROUP], "resources": [SERVER_PLURAL], "resourceNames": [name], "verbs": ["get"]},
             {"apiGroups": [GROUP], "resources": [f"{SERVER_PLURAL}/status"], "resourceNames": [name],
              "verbs": ["get", "patch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _metadata(server, account),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
         "subjects": [{"kind": "ServiceAccount", "name": service_account(server, spec),
                       "namespace": server["metadata"]["namespace"]}]},
    ]
    if not spec.storage.service_account_name:
        objs.insert(0, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(server, account),
                        "automountServiceAccountToken": False})
    return objs


def vllm_command(server: dict[str, Any], spec: AdapterServerSpec, adapters: list[dict[str, Any]],
                 settings: OperatorSettings) -> list[str]:
    gpu_slots, cpu_slots = lora_slots(len(adapters), settings)
    return serving.server_args(spec.serving, spec.base_model, server["metadata"]["name"], settings) + [
        "--enable-lora",
        "--max-loras", str(gpu_slots),
        "--max-cpu-loras", str(cpu_slots),
        "--max-lora-rank", str(lora_rank(adapters)),
        "--middleware", LOOPBACK_MIDDLEWARE,
    ]


def _token_volume() -> dict[str, Any]:
    """The API token for the sidecar alone (the pod mounts none: vLLM gets no credentials)."""
    return {"name": "api-token", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
    ]}}


def loader_container(server: dict[str, Any], spec: AdapterServerSpec, settings: OperatorSettings) -> dict[str, Any]:
    env = pods.s3_env_for(spec.storage) + [
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if spec.serving.api_key_secret_ref:
        env.append(serving.api_key_env(spec.serving.api_key_secret_ref))
    return {
        "name": LOADER_CONTAINER,
        "image": settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["kubetune", "adapter-loader", "--server", server["metadata"]["name"],
                    "--vllm-url", f"http://127.0.0.1:{serving.PORT}", "--dir", ADAPTER_DIR,
                    "--port", str(LOADER_PORT)],
        "env": env,
        "ports": [{"name": "loader", "containerPort": LOADER_PORT}],
        # The pod's readiness: every adapter assigned to the server is loaded into this pod's vLLM. A
        # restarted vLLM container or a new replica takes no traffic before the sidecar loaded them again.
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "loader"}, "periodSeconds": 5, "failureThreshold": 1},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "loader"}, "periodSeconds": 20,
                          "failureThreshold": 3},
        # Adapters are tens to hundreds of MB, streamed to disk and hashed in chunks.
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "adapters", "mountPath": ADAPTER_DIR}, {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "api-token", "mountPath": TOKEN_DIR, "readOnly": True}],
        "securityContext": pods.container_security_context(read_only_root=True),
    }


def server_objects(server: dict[str, Any], settings: OperatorSettings) -> list[dict[str, Any]]:
    """The server's children, in creation order; owned (controller) by the AdapterServer, so they go with it."""
    spec = AdapterServerSpec.model_validate(server.get("spec") or {})
    name, namespace = server["metadata"]["name"], server["metadata"]["namespace"]
    adapters = live_adapters(server)
    selector = {LABEL_SERVER: name}
    s = spec.serving
    auth = serving.auth_name(name)
    container = serving.vllm_container(
        s, spec.storage, vllm_command(server, spec, adapters, settings), settings, middleware=True,
        extra_env=({"name": RUNTIME_LORA_ENV, "value": "True"},),
        extra_mounts=({"name": "adapters", "mountPath": ADAPTER_DIR, "readOnly": True},),
    )
    volumes = serving.server_volumes(auth) + [{"name": "adapters", "emptyDir": {}}, _token_volume()]
    deployment = serving.server_deployment(
        metadata=_metadata(server, name), selector=selector, template_metadata={"labels": server_labels(name)},
        s=s, service_account=service_account(server, spec), settings=settings,
        containers=[container, loader_container(server, spec, settings)], volumes=volumes, init_containers=[],
        replicas=s.replicas,
    )
    return [
        *loader_rbac(server, spec),
        serving.auth_config_map_for(_metadata(server, auth)),  # before the pods that mount it
        deployment,
        serving.service_for(_metadata(server, name), selector),
        serving.network_policy_for(_metadata(server, name), selector,
                                   serving.allowed_namespaces_for(namespace, settings)),
        serving.pod_disruption_budget_for(_metadata(server, name), selector),
    ]


def server_status(server: dict[str, Any], outcome: StageOutcome, settings: OperatorSettings,
                  previous: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    """The operator's part of the server's status (the sidecar writes `adapters`)."""
    adapters = live_adapters(server)
    gpu_slots, _ = lora_slots(len(adapters), settings)
    ready = outcome.state == "succeeded"
    generation = server["metadata"].get("generation")
    conditions = set_condition(
        list(previous or []), "Ready", "True" if ready else "False",
        outcome.reason or ("Ready" if ready else "Deploying"),
        outcome.message or ("a replica serves every assigned adapter" if ready else "starting"),
        generation,
    )
    stale = {n: None for n in ((server.get("status") or {}).get("adapters") or {})
             if n not in {a["name"] for a in adapters}}
    return {
        "observedGeneration": generation,
        "conditions": conditions,
        "adapterCount": len(adapters),
        "maxLoras": gpu_slots,
        "maxLoraRank": lora_rank(adapters),
        "endpoint": serving.service_url(server["metadata"]["name"], server["metadata"]["namespace"]),
        # A departed job's line goes (merge patch null).
        **({"adapters": stale} if stale else {}),
    }


# ---------------------------------------------------------------- what a job reads


def job_outcome(job: FineTuneJob, server: Optional[dict[str, Any]], deployment: Optional[dict[str, Any]],
                server_pods: list[dict[str, Any]], max_restarts: int) -> StageOutcome:
    """The serve stage of an adapter-mode job: succeeded when a replica of its server is Ready and the
    sidecar reports this job's adapter (this revision's URI) loaded."""
    name, uri = serving.served_model_name(job), adapter_uri(job)
    entries = (server or {}).get("spec", {}).get("adapters") or []
    entry = next((a for a in entries if a.get("name") == name), None)
    if server is None or entry is None:
        return StageOutcome("absent")
    if entry.get("job") != job.metadata.name:
        return StageOutcome("failed", "ModelNameTaken",
                            f"model name {name} is already served by FineTuneJob {entry.get('job')} on the shared "
                            f"server {server['metadata']['name']}: set serving.servedModelName")
    where = f"shared server {server['metadata']['name']}"
    state = ((server.get("status") or {}).get("adapters") or {}).get(name) or {}
    if state.get("uri") == uri and state.get("state") == "Refused":
        return StageOutcome("failed", "AdapterRefused", f"{where} refused the adapter {uri}: {state.get('message')}")
    base = deployment_outcome(deployment, server_pods, max_restarts)
    # The shared server rolls when another job joins or leaves (its LoRA slots change): its Ready replicas
    # (maxUnavailable 0) keep serving this adapter meanwhile, so a neighbour's change is not this job's.
    serving_through_rollout = (base.state == "running" and base.reason == "RollingOut"
                               and (base.details.get("readyReplicas") or 0) >= 1)
    if base.state in ("failed", "running", "absent") and not serving_through_rollout:
        return StageOutcome("running" if base.state == "absent" else base.state, base.reason or "Deploying",
                            f"{where}: {base.message or 'starting'}", details=base.details)
    if state.get("uri") == uri and state.get("state") == "Loaded":
        return StageOutcome("succeeded", "AdapterLoaded", f"{uri} loaded on {where}", details=base.details)
    return StageOutcome("running", "LoadingAdapter", f"{where} is loading {uri}", details=base.details)


def endpoint(job: FineTuneJob) -> dict[str, str]:
    server = server_name(job)
    return {"service": server, "url": serving.service_url(server, job.metadata.namespace),
            "model": serving.served_model_name(job), "server": server}
