"""Merged-mode serving on the real control plane: the hardened children accepted by the API server and
acted on by its controllers, and the serve stage's states as a person reads them in status.

kwok runs the serving pods (Ready once scheduled, init container completed). A crash loop and a refused
artifact are written into a pod's status as the kubelet would write them (this cluster has no kubelet):
the operator reads pods only through the API, so what it sees is what a real kubelet's report shows.
"""

from __future__ import annotations

import json

from kubetune.devcluster.cluster import wait_for
from kubetune.operator import serving

from .ftj import Api, body, condition, fleet



def reconciles(op) -> float:
    """Reconcile passes the operator process has made so far (its own metric)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("kubetune_reconcile_duration_seconds_count"))


def make_key(api: Api) -> None:
    api.core.create_namespaced_secret(api.ns, {"metadata": {"name": "vllm-key"}, "stringData": {"api-key": "sk-test"}})


def deployment(api: Api, name: str) -> dict:
    return api.raw(api.apps.read_namespaced_deployment, f"{name}-serve", api.ns)


def serving_pods(api: Api, name: str) -> list[dict]:
    return [p for p in api.pods(f"kubetune.io/job={name},kubetune.io/stage=serve") if not p["metadata"].get("deletionTimestamp")]


def read(api: Api, kind: str, name: str) -> dict | None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    fns = {
        "NetworkPolicy": lambda: client.NetworkingV1Api(api.api).read_namespaced_network_policy,
        "PodDisruptionBudget": lambda: client.PolicyV1Api(api.api).read_namespaced_pod_disruption_budget,
        "HorizontalPodAutoscaler": lambda: client.AutoscalingV2Api(api.api).read_namespaced_horizontal_pod_autoscaler,
        "ConfigMap": lambda: api.core.read_namespaced_config_map,
    }
    try:
        return api.raw(fns[kind](), name, api.ns)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def set_container_status(api: Api, pod: dict, *, main: dict | None = None, init: dict | None = None,
                         ready: bool = False) -> None:
    """Write what a kubelet reports for a crash-looping container (or a failed init container)."""
    status = pod["status"]
    conds = [c for c in status.get("conditions", []) if c["type"] not in ("Ready", "ContainersReady")]
    conds += [{"type": t, "status": str(ready), "lastTransitionTime": "2026-12-01T00:00:00Z"}
              for t in ("Ready", "ContainersReady")]
    patch: dict = {"status": {"conditions": conds}}
    if main is not None:
        patch["status"]["containerStatuses"] = [{"name": "vllm", "image": "registry.test/vllm:test", "imageID": "",
                                                 "ready": ready, **main}]
    if init is not None:
        patch["status"]["initContainerStatuses"] = [{"name": "verify-artifact", "image": "registry.test/kubetune:test",
                                                     "imageID": "", "ready": False, **init}]
    api.core.patch_namespaced_pod_status(pod["metadata"]["name"], api.ns, patch)


def test_hardened_children_are_accepted_and_the_endpoint_follows_readiness(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    make_key(api)
    start_operator(namespace, KUBETUNE_SERVING_ALLOWED_NAMESPACES="monitoring")
    api.create(body("bot", serving={"apiKeySecretRef": {"name": "vllm-key"}, "gpus": 2, "cpu": "4", "memory": "48Gi"}))
    status = api.wait_phase("bot", "Serving", timeout=120)
    assert status["endpoint"]["url"] == f"http://bot-serve.{namespace}.svc:8000/v1"

    dep = deployment(api, "bot")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert spec["progressDeadlineSeconds"] > c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert c["resources"]["requests"] == {"cpu": "4", "memory": "48Gi", "nvidia.com/gpu": "2"}
    assert c["lifecycle"]["preStop"] == {"sleep": {"seconds": 10}}  # the API server accepts the sleep action
    assert pod["terminationGracePeriodSeconds"] > 10 + int(c["command"][c["command"].index("--shutdown-timeout") + 1])
    (init,) = pod["initContainers"]
    assert init["command"][:2] == ["kubetune", "verify-artifact"] and init["image"] == "registry.test/kubetune:test"
    assert c["command"][c["command"].index("--middleware") + 1] == f"{serving.AUTH_MODULE}.RequireApiKey"
    cm_name = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "auth")
    assert read(api, "ConfigMap", cm_name)["data"] == {f"{serving.AUTH_MODULE}.py": serving.AUTH_SOURCE.read_text()}
    np = read(api, "NetworkPolicy", "bot-serve")["spec"]
    assert np["ingress"][0]["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["monitoring", namespace]
    assert np["podSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    pdb = read(api, "PodDisruptionBudget", "bot-serve")
    assert pdb["spec"]["maxUnavailable"] == 1
    # The disruption controller counts the Ready vLLM pod: one may go.
    wait_for("PDB observed", lambda: (read(api, "PodDisruptionBudget", "bot-serve").get("status") or {})
             .get("disruptionsAllowed") == 1, timeout=60, interval=0.5)
    assert read(api, "HorizontalPodAutoscaler", "bot-serve") is None

    # The pod stops being Ready (its engine died): the endpoint goes; Ready again: it comes back.
    (p,) = serving_pods(api, "bot")
    set_container_status(api, p, main={"restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff",
                                                                                "message": "back-off 10s"}},
                                       "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                                                    "message": "engine core died"}}})
    wait_for("endpoint withdrawn", lambda: api.status("bot").get("endpoint") is None
             and condition(api.status("bot"), "Deployed")["reason"] == "CrashLoopBackOff", timeout=60, interval=0.3)
    status = api.status("bot")
    assert status["phase"] == "Deploying" and condition(status, "Stalled")["status"] == "True"
    assert "engine core died" in condition(status, "Deployed")["message"]
    set_container_status(api, serving_pods(api, "bot")[0], main={"restartCount": 1, "state": {"running": {}}},
                         ready=True)
    status = api.wait_phase("bot", "Serving", timeout=60)
    assert status["endpoint"]["model"] == "bot"


def test_a_crash_loop_fails_the_job_after_the_bound(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace, KUBETUNE_SERVING_MAX_RESTARTS="3")
    api.create(body("loop"))
    api.wait_phase("loop", "Serving", timeout=120)
    crash = {"state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
             "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "RuntimeError: CUDA error"}}}
    set_container_status(api, serving_pods(api, "loop")[0], main={"restartCount": 2, **crash})
    wait_for("crash loop surfaced", lambda: condition(api.status("loop"), "Deployed")["reason"] == "CrashLoopBackOff",
             timeout=60, interval=0.3)
    assert api.status("loop")["phase"] == "Deploying"
    set_container_status(api, serving_pods(api, "loop")[0], main={"restartCount": 3, **crash})
    status = api.wait_phase("loop", "Failed", timeout=60)
    deployed = condition(status, "Deployed")
    assert deployed["status"] == "False" and deployed["reason"] == "CrashLoopBackOff"
    assert "restarted 3 times" in deployed["message"] and "RuntimeError: CUDA error" in deployed["message"]
    assert status.get("endpoint") is None


def test_a_refused_artifact_fails_the_job_naming_the_file(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace)
    api.create(body("tampered"))
    api.wait_phase("tampered", "Serving", timeout=120)
    verdict = {"stage": "verify-artifact", "ok": False, "reason": "ArtifactCorrupted",
               "message": "s3://artifacts/tampered/merged/model-00002-of-00004.safetensors: content does not match "
                          "MANIFEST.json"}
    set_container_status(api, serving_pods(api, "tampered")[0],
                         main={"restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}},
                         init={"restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                               "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                                            "message": json.dumps(verdict)}}})
    status = api.wait_phase("tampered", "Failed", timeout=60)
    deployed = condition(status, "Deployed")
    assert deployed["reason"] == "ArtifactCorrupted" and "model-00002-of-00004" in deployed["message"]


def test_scaled_to_zero_is_not_serving_and_scaling_up_serves_again(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace)
    api.create(body("idle"))
    api.wait_phase("idle", "Serving", timeout=120)
    api.patch("idle", {"spec": {"serving": {"replicas": 0}}})
    wait_for("scaled to zero", lambda: condition(api.status("idle"), "Deployed")["reason"] == "ScaledToZero",
             timeout=60, interval=0.3)
    status = api.status("idle")
    assert status["phase"] != "Serving" and status.get("endpoint") is None
    assert condition(status, "Deployed")["status"] == "False" and condition(status, "Ready")["status"] == "False"
    assert condition(status, "Stalled")["status"] == "False"
    wait_for("no vLLM pod", lambda: not serving_pods(api, "idle"), timeout=60, interval=0.5)
    api.patch("idle", {"spec": {"serving": {"replicas": 1}}})
    status = api.wait_phase("idle", "Serving", timeout=60)
    assert status["endpoint"]["service"] == "idle-serve"


def test_with_autoscaling_the_operator_leaves_replicas_to_the_hpa(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes, count=2)
    api = Api(cluster, namespace)
    op = start_operator(namespace)
    api.create(body("scaled", serving={"autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetWaitingRequests": 2}}))
    api.wait_phase("scaled", "Serving", timeout=120)
    hpa = read(api, "HorizontalPodAutoscaler", "scaled-serve")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm:num_requests_waiting"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "scaled-serve"
    managers = {m["manager"]: m for m in deployment(api, "scaled")["metadata"]["managedFields"]}
    assert "f:replicas" not in json.dumps(managers["kubetune-operator"]["fieldsV1"])  # the operator does not own it

    # The autoscaler's decision, written as it writes it (the scale subresource, its own field manager).
    api.apps.patch_namespaced_deployment_scale("scaled-serve", namespace, {"spec": {"replicas": 3}},
                                               field_manager="horizontal-pod-autoscaler")
    wait_for("three replicas Ready", lambda: (deployment(api, "scaled").get("status") or {}).get("readyReplicas") == 3,
             timeout=60, interval=0.5)
    passes = reconciles(op)
    # Passes of the operator re-apply the serving children (every 0.5 s here); none may reset replicas.
    wait_for("operator passes", lambda: reconciles(op) >= passes + 3, timeout=30, interval=0.5)
    assert deployment(api, "scaled")["spec"]["replicas"] == 3
    assert api.status("scaled")["phase"] == "Serving"

    # Autoscaling switched off: the HPA goes and spec.serving.replicas is the operator's again.
    api.patch("scaled", {"spec": {"serving": {"autoscaling": None, "replicas": 2}}})
    wait_for("HPA removed", lambda: read(api, "HorizontalPodAutoscaler", "scaled-serve") is None, timeout=60, interval=0.5)
    wait_for("replicas back to the spec", lambda: deployment(api, "scaled")["spec"]["replicas"] == 2, timeout=60,
             interval=0.5)


def test_kubetune_chat_reads_the_endpoint_and_key_with_the_users_kubeconfig(cluster, namespace, gpu_nodes,
                                                                          start_operator, tmp_path):
    """The CLI against the control plane: the job's status and its key's Secret read with a kubeconfig, the
    request sent to a local server speaking the chat API (--url: this cluster has no kubelet to forward to)."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("test_chat_fake", Path(__file__).parents[1] / "unit" / "test_chat.py")
    fake = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fake
    spec.loader.exec_module(fake)
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    make_key(api)
    start_operator(namespace)
    api.create(body("talk", serving={"apiKeySecretRef": {"name": "vllm-key"}, "servedModelName": "support-v3"}))
    api.wait_phase("talk", "Serving", timeout=120)
    server = fake.FakeOpenAI("sk-test")
    try:
        kubetune = Path(sys.executable).with_name("kubetune")
        out = subprocess.run([str(kubetune), "chat", "talk", "where is my refund?", "-n", namespace, "--url", server.url,
                              "--kubeconfig", str(cluster.kubeconfig), "--system", "be brief"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "echo: where is my refund?"
        headers, sent = server.requests[-1]
        assert headers["authorization"] == "Bearer sk-test"  # read from the job's Secret
        assert sent["model"] == "support-v3" and sent["messages"][0] == {"role": "system", "content": "be brief"}
        api.patch("talk", {"spec": {"serving": {"replicas": 0}}})
        wait_for("scaled to zero", lambda: api.status("talk").get("endpoint") is None, timeout=60, interval=0.3)
        out = subprocess.run([str(kubetune), "chat", "talk", "hi", "-n", namespace, "--url", server.url,
                              "--kubeconfig", str(cluster.kubeconfig)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "is not serving" in out.stderr and "replicas is 0" in out.stderr
    finally:
        server.close()
