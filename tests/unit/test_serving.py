"""Merged-mode serving, point by point (issue 13's hardening list), plus the vLLM pin's agreement.

Each row of HARDENING is one point of the list and the test that shows it in
the built objects or the observed outcome. The cluster half (the same objects
accepted and acted on by a real control plane) is tests/operator/test_serving.py;
vLLM's own parser, loaders and app are tests/vllm.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubetune.contract import vllm as pin
from kubetune.operator import children, rbac, serving, stages, vllm_auth
from kubetune.operator.api import FineTuneJob
from kubetune.operator.crdgen import build_crd
from kubetune.operator.lifecycle import decide
from kubetune.operator.outcomes import StageOutcome, deployment_outcome
from kubetune.operator.settings import OperatorSettings

from .jobs import job

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = OperatorSettings(trainer_image="registry.local/kubetune:test", serving_allowed_namespaces="ingress, monitoring")
OK = StageOutcome("succeeded", "Completed", "", {"ok": True})  # evaluate: a passing verdict
DONE = {s: OK for s in ("validate", "train", "merge", "evaluate")}


def ftj(**serving_spec) -> FineTuneJob:
    return FineTuneJob.from_body(job(serving=serving_spec))


def objects(j: FineTuneJob, settings: OperatorSettings = SETTINGS) -> dict[str, dict]:
    return {o["kind"]: o for o in serving.merged_objects(j, settings)}


def pod_spec(j: FineTuneJob, settings: OperatorSettings = SETTINGS) -> dict:
    return objects(j, settings)["Deployment"]["spec"]["template"]["spec"]


def vllm_container(j: FineTuneJob, settings: OperatorSettings = SETTINGS) -> dict:
    (c,) = pod_spec(j, settings)["containers"]
    return c


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def deployment(replicas=1, ready=0, conditions=(), generation=1, observed=1, updated=None) -> dict:
    return {"metadata": {"labels": {"kubetune.io/generation": "1"}, "generation": generation},
            "spec": {"replicas": replicas},
            "status": {"readyReplicas": ready, "conditions": list(conditions), "observedGeneration": observed,
                       "updatedReplicas": replicas if updated is None else updated}}


def serving_pod(main=None, init=None, name="bot-serve-abc") -> dict:
    status = {"phase": "Pending", "containerStatuses": [{"name": "vllm", **(main or {})}]}
    if init is not None:
        status["initContainerStatuses"] = [{"name": "verify-artifact", **init}]
    return {"metadata": {"name": name, "creationTimestamp": "2026-12-01T00:00:00Z"}, "status": status}


AVAILABLE = [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]


# ---------------------------------------------------------------- the hardening points, one row each


def requests_for_weight_streaming():
    j = ftj(cpu="12", memory="96Gi", gpus=2)
    c = vllm_container(j)
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert requests == {"nvidia.com/gpu": "2", "cpu": "12", "memory": "96Gi"}  # Burstable, not BestEffort
    assert limits["memory"] == "96Gi" and "cpu" not in limits
    # The streamer's host buffer is bounded well inside the memory limit.
    extra = json.loads(arg(c["command"], "--model-loader-extra-config"))
    assert extra == {"memory_limit": 48 * 2**30}
    defaults = vllm_container(ftj())["resources"]["requests"]
    assert defaults["cpu"] and defaults["memory"]


def progress_deadline_beyond_the_startup_probe():
    dep = objects(ftj())["Deployment"]
    probe = vllm_container(ftj())["startupProbe"]
    startup_budget = probe["periodSeconds"] * probe["failureThreshold"]
    assert startup_budget == SETTINGS.serving_startup_seconds
    # A healthy slow start (pull, checksum pass, then the whole startup budget) never hits the deadline.
    assert dep["spec"]["progressDeadlineSeconds"] >= startup_budget + SETTINGS.serving_progress_margin_seconds
    assert dep["spec"]["progressDeadlineSeconds"] > 600  # the Deployment default that failed slow starts


def crash_loop_surfaced_then_failed_after_the_bound():
    looping = {"restartCount": 2, "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
               "lastState": {"terminated": {"reason": "Error", "exitCode": 1, "message": "RuntimeError: no CUDA"}}}
    early = deployment_outcome(deployment(), [serving_pod(looping)], max_restarts=5)
    assert early.state == "running" and early.reason == "CrashLoopBackOff"
    assert "restart 2" in early.message and "RuntimeError: no CUDA" in early.message
    # lifecycle: the job says Stalled while it loops below the bound.
    d = decide(ftj(), {**DONE, "serve": early})
    assert d.stalled == "CrashLoopBackOff"
    late = deployment_outcome(deployment(), [serving_pod({**looping, "restartCount": 5})], max_restarts=5)
    assert late.state == "failed" and late.reason == "CrashLoopBackOff"
    assert "restarted 5 times" in late.message and "exit code 1" in late.message
    assert decide(ftj(), {**DONE, "serve": late}).phase == "Failed"
    # Restarts a running, Ready pod gathered over time are no crash loop.
    healthy = {"restartCount": 9, "state": {"running": {}}, "ready": True}
    assert deployment_outcome(deployment(ready=1, conditions=AVAILABLE), [serving_pod(healthy)]).state == "succeeded"
    # One looping pod while another replica serves: the Deployment replaces it; the endpoint stays up.
    two = deployment(replicas=2, ready=1, conditions=AVAILABLE)
    assert deployment_outcome(two, [serving_pod({**looping, "restartCount": 7})]).state == "succeeded"


def image_pull_backoff_surfaced_with_its_reason():
    waiting = {"restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff",
                                                        "message": "Back-off pulling image vllm/vllm-openai:v9"}}}
    out = deployment_outcome(deployment(), [serving_pod(waiting)])
    assert out.state == "running" and out.reason == "ImagePullBackOff" and "v9" in out.message
    d = decide(ftj(), {**DONE, "serve": out})
    assert d.stalled == "ImagePullBackOff"
    assert ("Deployed", "False", "ImagePullBackOff") == d.conditions[-1][:3]
    # The init container's pull too (the trainer image).
    init = deployment_outcome(deployment(), [serving_pod({}, init=waiting)])
    assert init.reason == "ImagePullBackOff" and "verify-artifact" in init.message


def refused_artifact_fails_at_once():
    verdict = json.dumps({"stage": "verify-artifact", "ok": False, "reason": "ArtifactCorrupted",
                          "message": "s3://b/merged/model-00001-of-00002.safetensors: content does not match"})
    init = {"restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"reason": "Error", "exitCode": 1, "message": verdict}}}
    out = deployment_outcome(deployment(), [serving_pod({"state": {"waiting": {"reason": "PodInitializing"}}}, init=init)])
    assert out.state == "failed" and out.reason == "ArtifactCorrupted" and "model-00001" in out.message
    # Any other failure of the init container (S3 unreachable: an InternalError verdict) is retried, bounded.
    flaky = {**init, "lastState": {"terminated": {"exitCode": 1, "message": json.dumps(
        {"stage": "verify-artifact", "ok": False, "reason": "InternalError", "message": "EndpointConnectionError"})}}}
    out = deployment_outcome(deployment(), [serving_pod({}, init=flaky)], max_restarts=5)
    assert out.state == "running" and out.reason == "CrashLoopBackOff" and "EndpointConnectionError" in out.message
    out = deployment_outcome(deployment(), [serving_pod({}, init={**flaky, "restartCount": 5})], max_restarts=5)
    assert out.state == "failed" and out.reason == "CrashLoopBackOff"


def endpoint_published_only_when_ready():
    j = ftj()
    for outcome in (StageOutcome("absent"), StageOutcome("running", "Deploying", ""),
                    StageOutcome("running", "ScaledToZero", ""), StageOutcome("failed", "CrashLoopBackOff", "")):
        # None, not a missing key: the merge patch removes an endpoint published before.
        assert stages.SERVE.extra_status(j, outcome) == {"endpoint": None}
        assert decide(j, {**DONE, "serve": outcome}).status["endpoint"] is None
    ready = StageOutcome("succeeded", "MinimumReplicasAvailable", "", details={"replicas": 1})
    assert decide(j, {**DONE, "serve": ready}).status["endpoint"] == serving.endpoint(j)


def scaled_to_zero_is_its_own_state():
    zero = deployment(replicas=0, ready=0, conditions=AVAILABLE)  # a 0-replica Deployment says Available
    out = deployment_outcome(zero, [])
    assert out.state == "running" and out.reason == "ScaledToZero" and "replicas" in out.message
    d = decide(ftj(replicas=0), {**DONE, "serve": out})
    assert d.phase != "Serving" and d.status["endpoint"] is None
    assert ("Deployed", "False", "ScaledToZero") == d.conditions[-1][:3] and d.stalled is None
    assert objects(ftj(replicas=0))["Deployment"]["spec"]["replicas"] == 0


def tensor_parallel_size_checked():
    for gpus in (1, 2, 4, 8):
        ftj(gpus=gpus)
    for gpus in (3, 5, 6, 7):
        with pytest.raises(ValidationError, match="1, 2, 4 or 8"):
            ftj(gpus=gpus)
    crd = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in crd["properties"]["serving"].get("x-kubernetes-validations", [])]
    assert "!has(self.gpus) || self.gpus in [1, 2, 4, 8]" in rules
    # The model's heads: checked by the verify init container before vLLM starts.
    assert pin.tensor_parallel_problem({"num_attention_heads": 32, "num_key_value_heads": 8}, 8) is None
    assert pin.tensor_parallel_problem({"num_attention_heads": 32, "num_key_value_heads": 2}, 4) is None  # replicated
    assert "cannot split" in pin.tensor_parallel_problem({"num_attention_heads": 28, "num_key_value_heads": 4}, 8)
    assert "cannot split" in pin.tensor_parallel_problem({"text_config": {"num_attention_heads": 12}}, 8)
    assert "--tensor-parallel-size" in serving.verify_args(ftj(gpus=4))


def graceful_drain():
    c = vllm_container(ftj())
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = int(arg(c["command"], "--shutdown-timeout"))
    assert pause == SETTINGS.serving_prestop_seconds and drain == SETTINGS.serving_drain_seconds > 0
    assert pod_spec(ftj())["terminationGracePeriodSeconds"] > pause + drain


def reads_verified_against_the_manifest():
    j = ftj(gpus=2)
    (init,) = pod_spec(j)["initContainers"]
    assert init["image"] == "registry.local/kubetune:test"
    assert init["command"] == ["kubetune", "verify-artifact", serving.merged_model_uri(j), "--tensor-parallel-size", "2"]
    assert {e["name"] for e in init["env"]} >= {e["name"] for e in vllm_container(j)["env"] if e["name"].startswith("AWS_")}
    assert init["resources"]["requests"]["memory"] and init["securityContext"]["readOnlyRootFilesystem"] is True


def api_key_covers_every_path():
    j = ftj(apiKeySecretRef={"name": "vllm-key"})
    objs = objects(j)
    c = vllm_container(j)
    assert arg(c["command"], "--middleware") == f"{serving.AUTH_MODULE}.RequireApiKey"
    assert "--api-key" not in c["command"]
    env = {e["name"]: e for e in c["env"]}
    assert env["VLLM_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "vllm-key", "key": "api-key"}}
    assert env["PYTHONPATH"]["value"] == serving.AUTH_DIR
    cm = objs["ConfigMap"]
    assert cm["data"] == {f"{serving.AUTH_MODULE}.py": serving.AUTH_SOURCE.read_text()}
    volume = next(v for v in pod_spec(j)["volumes"] if v["name"] == "auth")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert any(m["mountPath"] == serving.AUTH_DIR for m in c["volumeMounts"])
    assert serving.merged_objects(j, SETTINGS)[0]["kind"] == "ConfigMap"  # before the pods that mount it
    assert "ConfigMap" not in objects(ftj()) and "--middleware" not in vllm_container(ftj())["command"]


def network_policy_default_deny():
    j = ftj()
    np = objects(j)["NetworkPolicy"]["spec"]
    assert np["podSelector"]["matchLabels"] == objects(j)["Deployment"]["spec"]["selector"]["matchLabels"]
    assert np["policyTypes"] == ["Ingress"]
    (rule,) = np["ingress"]
    (peer,) = rule["from"]
    assert peer["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["ingress", "monitoring", "tenant-a"]}]
    assert rule["ports"] == [{"protocol": "TCP", "port": serving.PORT}]
    only_own = objects(j, OperatorSettings())["NetworkPolicy"]["spec"]["ingress"][0]["from"][0]
    assert only_own["namespaceSelector"]["matchExpressions"][0]["values"] == ["tenant-a"]


def autoscaler_owns_replicas():
    j = ftj(replicas=3, autoscaling={"minReplicas": 2, "maxReplicas": 6, "targetWaitingRequests": 8})
    objs = objects(j)
    assert "replicas" not in objs["Deployment"]["spec"]  # server-side apply leaves the field to the HPA
    hpa = objs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "support-bot-serve"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    (metric,) = hpa["metrics"]
    assert metric["pods"]["metric"]["name"] == "vllm:num_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "8"}
    plain = objects(ftj(replicas=3))
    assert plain["Deployment"]["spec"]["replicas"] == 3 and "HorizontalPodAutoscaler" not in plain
    with pytest.raises(ValidationError, match="minReplicas"):
        ftj(autoscaling={"minReplicas": 5, "maxReplicas": 2})


def disruption_budget():
    pdb = objects(ftj())["PodDisruptionBudget"]["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["selector"]["matchLabels"] == objects(ftj())["Deployment"]["spec"]["selector"]["matchLabels"]


HARDENING = [
    ("CPU/memory requests sized for weight streaming", requests_for_weight_streaming),
    ("progressDeadlineSeconds consistent with the startup probe", progress_deadline_beyond_the_startup_probe),
    ("CrashLoopBackOff surfaced, failed after a bounded number of restarts", crash_loop_surfaced_then_failed_after_the_bound),
    ("ImagePullBackOff surfaced with its reason", image_pull_backoff_surfaced_with_its_reason),
    ("a tampered/stale artifact refused, the job says so", refused_artifact_fails_at_once),
    ("endpoint published only when Ready", endpoint_published_only_when_ready),
    ("replicas: 0 is a visible scaled-to-zero state, not Serving", scaled_to_zero_is_its_own_state),
    ("tensor-parallel size checked", tensor_parallel_size_checked),
    ("graceful drain (preStop and grace period)", graceful_drain),
    ("S3 reads verified against the manifest's checksums", reads_verified_against_the_manifest),
    ("API key covers every inference path", api_key_covers_every_path),
    ("NetworkPolicy: default deny plus allowed namespaces", network_policy_default_deny),
    ("optional HPA, the operator leaves replicas alone", autoscaler_owns_replicas),
    ("PodDisruptionBudget", disruption_budget),
]


@pytest.mark.parametrize("point, check", HARDENING, ids=[p for p, _ in HARDENING])
def test_merged_mode_hardening(point, check):
    check()


# ---------------------------------------------------------------- the middleware, as an ASGI app sees it


def _call(path: str, headers=(), app_calls=None):
    async def app(scope, receive, send):
        app_calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request"}

    mw = vllm_auth.RequireApiKey(app)
    scope = {"type": "http", "method": "POST", "path": path, "root_path": "",
             "headers": [(k.encode(), v.encode()) for k, v in headers]}
    asyncio.run(mw(scope, receive, send))
    return sent[0]["status"]


def test_the_middleware_guards_every_path_but_the_probe(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "k1")
    calls: list[str] = []
    for path in ("/v1/chat/completions", "/invocations", "/tokenize", "/metrics", "/pooling", "/score", "/anything"):
        assert _call(path, app_calls=calls) == 401
        assert _call(path, [("authorization", "Bearer wrong")], app_calls=calls) == 401
        assert _call(path, [("Authorization", "Bearer k1")], app_calls=calls) == 200
    assert _call("/health", app_calls=calls) == 200
    assert calls.count("/health") == 1 and calls.count("/metrics") == 1


def test_the_middleware_refuses_to_start_without_a_key(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="VLLM_API_KEY"):
        vllm_auth.RequireApiKey(lambda *a: None)


# ---------------------------------------------------------------- children, RBAC


def test_every_serving_kind_is_a_managed_child_with_rbac():
    kinds = {o["kind"] for o in serving.merged_objects(
        ftj(apiKeySecretRef={"name": "k"}, autoscaling={"maxReplicas": 2}), SETTINGS)}
    assert kinds == {"ConfigMap", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    granted = {(g, r, v) for rule in rbac.RULES for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    for obj in serving.merged_objects(ftj(apiKeySecretRef={"name": "k"}, autoscaling={"maxReplicas": 2}), SETTINGS):
        k = children.kind_of(obj)
        for verb in ("get", "create") + (("patch",) if k.applied else ()):
            assert (k.group, k.plural, verb) in granted
    hpa = children.BY_KIND[("autoscaling/v2", "HorizontalPodAutoscaler")]
    assert (hpa.group, hpa.plural, "delete") in granted  # autoscaling switched off removes it


# ---------------------------------------------------------------- the pin: trainer and serving agree


def _lock() -> dict[str, str]:
    text = (ROOT / "tests" / "vllm" / "vllm-env.lock").read_text()
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s]+)", text, re.M))


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def test_the_serving_image_the_tested_package_and_the_chart_agree():
    lock = _lock()
    assert lock["vllm"] == pin.VERSION
    assert OperatorSettings().vllm_image == pin.IMAGE == f"vllm/vllm-openai:v{pin.VERSION}"
    # The chart defers to the operator's pin (an empty value is "unset" for OperatorSettings.from_env).
    values = yaml.safe_load((ROOT / "charts" / "kubetune" / "values.yaml").read_text())
    assert values["vllmImage"] in ("", pin.IMAGE)
    assert OperatorSettings.from_env({"KUBETUNE_VLLM_IMAGE": ""}).vllm_image == pin.IMAGE
    # The transformers vLLM runs with (what a resolver picks) is inside the range the pin states.
    low, high = pin.TRANSFORMERS
    assert _version(low) <= _version(lock["transformers"]) < _version(high)


def test_the_trainer_writes_merged_for_a_newer_transformers_than_vllms_range():
    """The choice of issue 13: the trainer keeps its transformers (requirements.lock) and writes merged/ in a
    form vLLM's range loads (trainer/merge.py make_servable; tests/vllm loads it for real). When the
    trainer's transformers falls inside vLLM's range this test fails, saying the compatibility layer may go."""
    lock = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s]+)", (ROOT / "requirements.lock").read_text(), re.M))
    trainer = _version(lock["transformers"])
    low, high = pin.TRANSFORMERS
    assert trainer >= _version(high), (trainer, pin.TRANSFORMERS)


def test_make_servable_writes_what_older_readers_need(tmp_path):
    from kubetune.trainer.merge import PORTABLE_TOKENIZER_CLASS, make_servable

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_parameters": rope}))
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    changed = make_servable(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_parameters"] == rope  # v5 readers: unchanged
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    tok = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS and tok["chat_template"] == "{{ messages }}"
    assert set(changed) == {"config.json", "tokenizer_config.json"}
    assert make_servable(tmp_path) == {}  # idempotent
    # Default rope: rope_theta only (a classic reader's "no scaling" is rope_scaling absent).
    (tmp_path / "config.json").write_text(json.dumps({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}))
    make_servable(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_theta"] == 1e6 and "rope_scaling" not in config


def test_a_republished_merged_folder_leaves_no_stale_shard(tmp_path):
    from kubetune.trainer.merge import remove_stale
    from kubetune.trainer.storage import LocalStore

    store = LocalStore(tmp_path)
    for name in ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                 "model-00003-of-00003.safetensors", "config.json", "MANIFEST.json"):
        store.put_bytes(b"old", f"merged/{name}")
    keep = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json"}
    deleted = remove_stale(store, "merged", keep)
    assert sorted(deleted) == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                               "model-00003-of-00003.safetensors"]
    assert sorted(o.key for o in store.list("merged/")) == ["merged/MANIFEST.json", "merged/config.json"]


# ---------------------------------------------------------------- kubetune verify-artifact


def _published(tmp_path: Path) -> Path:
    from kubetune.trainer import artifacts
    from kubetune.trainer.storage import LocalStore

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"num_attention_heads": 12, "num_key_value_heads": 4}))
    (src / "model-00001-of-00002.safetensors").write_bytes(b"a" * 10_000)
    (src / "model-00002-of-00002.safetensors").write_bytes(b"b" * 10_000)
    artifacts.publish_dir(LocalStore(tmp_path / "out"), src, "merged")
    return tmp_path / "out" / "merged"


def test_verify_artifact_passes_a_published_folder_and_refuses_changes(tmp_path, monkeypatch):
    from kubetune.trainer.verify import ArtifactRefused, run_verify, verify_artifact
    from kubetune.trainer.storage import LocalStore

    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination"))
    merged = _published(tmp_path)
    assert len(verify_artifact(LocalStore(merged), 4)["files"]) == 3
    with pytest.raises(ArtifactRefused, match="cannot split") as e:
        verify_artifact(LocalStore(merged), 8)
    assert e.value.reason == "TensorParallelMismatch"
    # A tampered shard of the same size.
    (merged / "model-00002-of-00002.safetensors").write_bytes(b"c" * 10_000)
    with pytest.raises(ArtifactRefused, match="model-00002-of-00002") as e:
        verify_artifact(LocalStore(merged))
    assert e.value.reason == "ArtifactCorrupted"
    assert run_verify(str(merged)) == 1
    verdict = json.loads((tmp_path / "termination").read_text())
    assert verdict["ok"] is False and verdict["reason"] == "ArtifactCorrupted"
    # The operator turns that verdict into the failed serve stage's reason.
    init = {"restartCount": 1, "lastState": {"terminated": {"exitCode": 1, "message": json.dumps(verdict)}}}
    assert deployment_outcome(deployment(), [serving_pod({}, init=init)]).reason == "ArtifactCorrupted"


def test_verify_artifact_refuses_files_the_manifest_does_not_list(tmp_path):
    from kubetune.trainer.verify import ArtifactRefused, verify_artifact
    from kubetune.trainer.storage import LocalStore

    merged = _published(tmp_path)
    (merged / "model-00003-of-00003.safetensors").write_bytes(b"stale")
    with pytest.raises(ArtifactRefused, match="model-00003-of-00003") as e:
        verify_artifact(LocalStore(merged))
    assert e.value.reason == "UnmanifestedFiles"
    (merged / "model-00003-of-00003.safetensors").unlink()
    (merged / "MANIFEST.json").unlink()
    with pytest.raises(ArtifactRefused) as e:
        verify_artifact(LocalStore(merged))
    assert e.value.reason == "ArtifactIncomplete"


def test_a_canary_has_its_own_pods_service_and_a_weighted_route():
    j = ftj(canary={"gateway": {"name": "public", "sectionName": "https"}, "weight": 25})
    route = objects(j)["HTTPRoute"]  # the stable route, with merged serving
    assert route["spec"]["parentRefs"] == [{"name": "public", "sectionName": "https"}]
    assert route["spec"]["rules"] == [{"backendRefs": [{"name": "support-bot-serve", "port": serving.PORT, "weight": 100}]}]
    weighted = serving.http_route(j, 25)["spec"]["rules"][0]["backendRefs"]
    assert [(b["name"], b["weight"]) for b in weighted] == [("support-bot-serve", 75), ("support-bot-canary", 25)]
    dep, svc = serving.canary_objects(j, SETTINGS)
    main = objects(j)
    assert dep["spec"]["replicas"] == 1 and dep["metadata"]["name"] == svc["metadata"]["name"] == "support-bot-canary"
    # Neither Service selects the other's pods: the route alone decides who gets what.
    canary_labels = dep["spec"]["template"]["metadata"]["labels"]
    main_labels = main["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert not set(main["Service"]["spec"]["selector"].items()) <= set(canary_labels.items())
    assert not set(svc["spec"]["selector"].items()) <= set(main_labels.items())
    assert "HTTPRoute" not in objects(ftj())  # no canary, no route
    # Adapter mode swaps in place on its shared server: a canary there is refused at admission.
    (message,) = stages.refusals(FineTuneJob.from_body(job(serving={"mode": "adapter", "canary": {
        "gateway": {"name": "public"}}})).spec)
    assert message.startswith("spec.serving.canary:")


def test_a_shared_server_rolling_for_a_neighbour_keeps_serving_this_jobs_adapter():
    from kubetune.operator import adapter_servers

    j = ftj(mode="adapter")
    name, uri = adapter_servers.server_name(j), adapter_servers.adapter_uri(j)
    server = {"metadata": {"name": name}, "spec": {"adapters": [{"name": "support-bot", "job": "support-bot", "uri": uri}]},
              "status": {"adapters": {"support-bot": {"uri": uri, "state": "Loaded", "servedUri": uri}}}}
    rolling = deployment(replicas=1, ready=1, observed=1, generation=2, updated=0)
    assert adapter_servers.job_outcome(j, server, rolling, [], 5).state == "succeeded"
    # Nothing Ready while it rolls: not served.
    assert adapter_servers.job_outcome(j, server, deployment(replicas=1, ready=0, observed=1, generation=2,
                                                             updated=0), [], 5).state == "running"


def test_a_new_revisions_canary_record_keeps_nothing_of_the_last_ones():
    """status.canary is merge-patched: the first record of a new revision's canary must clear the
    readySince of the revision before, or the next pass counts the new canary healthy since then and
    promotes it without its durationSeconds (seen as an intermittent failure on the control plane)."""
    from kubetune.operator import canary, lifecycle
    from tests.gitops.record import merge_patch  # RFC 7386, as the API server applies the status patch

    j = ftj(canary={"gateway": {"name": "public", "sectionName": "https"}, "weight": 20, "durationSeconds": 60})

    class Kube:  # the calls step makes; no canary Deployment yet: it is starting
        def preferred_version(self, group):
            return "v1"

        def ensure(self, obj):
            return True

        def get(self, *args):
            return None

        def list_pods(self, *args):
            return []

        def delete(self, *args):
            return True

    status = {"servingRevision": "rev2", "canary": {"revision": "rev2", "weight": 20, "state": "Promoted",
                                                    "readySince": "2026-12-02T13:52:51Z", "message": "promoted"}}
    decision = lifecycle.Decision("Deploying", "serving", [("Deployed", "False", "Deploying", "")], current="serve")
    decision, may_act = canary.step(Kube(), j, status, "rev3", decision, SETTINGS, True, lambda *a: None)
    assert not may_act
    record = merge_patch(status, {"canary": decision.status["canary"]})["canary"]
    assert record["revision"] == "rev3" and record["state"] == "Starting"
    assert "readySince" not in record
