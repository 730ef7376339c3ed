"""A FineTuneJob through its whole lifecycle on the real control plane, with
kwok completing the pods and the operator running as a subprocess under the
chart's RBAC."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.devcluster.cluster import wait_for
from kubetune.devcluster.fakenodes import DEFAULT_GPU_PRODUCT

from .ftj import (
    EVALUATE_OK, GROUP, KWOK_DURATION, KWOK_EXIT_CODE, KWOK_FAIL, KWOK_FAIL_REASON, KWOK_MESSAGE, PLURAL, VERSION,
    Api, body, condition, env_of, fleet, message,
)

KUBETUNE = Path(sys.executable).with_name("kubetune")
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def assert_owned_by(obj: dict, ftj: dict) -> None:
    (ref,) = obj["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("FineTuneJob", ftj["metadata"]["name"], ftj["metadata"]["uid"], True)


def assert_restricted(pod_spec: dict) -> None:
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod_spec["containers"]:
        assert RESTRICTED_CONTAINER.items() <= c["securityContext"].items()


def make_secrets(api: Api) -> None:
    api.core.create_namespaced_secret(api.ns, {"metadata": {"name": "s3-creds"},
                                               "stringData": {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}})
    api.core.create_namespaced_secret(api.ns, {"metadata": {"name": "vllm-key"}, "stringData": {"api-key": "sk-test"}})


def trainer_token(api: Api, job: str) -> str:
    return api.core.create_namespaced_service_account_token(
        f"{job}-trainer", api.ns, {"spec": {"expirationSeconds": 600}}
    ).status.token


def test_full_lifecycle_pending_to_serving(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    make_secrets(api)
    op = start_operator(namespace)
    api.create(body(
        "support-bot",
        storage={"endpointUrl": "http://s3.test:9000", "region": "us-east-1", "credentialsSecretRef": {"name": "s3-creds"}},
        serving={"apiKeySecretRef": {"name": "vllm-key"}},
        # Training runs long enough for rank 0 to report progress.
        podMetadata={"train": {"annotations": {KWOK_DURATION: "6s"}}},
    ))

    status = api.wait_phase("support-bot", "Training", timeout=60)
    ftj = api.get("support-bot")
    assert ftj["metadata"]["generation"] == 1 and status["observedGeneration"] == 1

    # Rank 0 reports progress with the job's own ServiceAccount, which may
    # patch this job's status and nothing else.
    token = trainer_token(api, "support-bot")
    as_trainer = client.CustomObjectsApi(cluster.token_client(token))
    as_trainer.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "support-bot",
        {"status": {"progress": {"step": 30, "totalSteps": 120, "loss": 1.75, "epoch": 0.5}}},
    )
    wait_for("progress percent", lambda: (api.status("support-bot").get("progress") or {}).get("percent") == 25, timeout=20)
    with pytest.raises(ApiException) as denied:
        as_trainer.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "support-bot", {"spec": {"serving": {"replicas": 5}}})
    assert denied.value.status == 403
    printed = cluster.kubectl("get", "ftj", "-n", namespace, "support-bot").stdout
    assert "Training" in printed and "25" in printed and "1.75" in printed

    # A spec edit while training never touches the running children.
    api.patch("support-bot", {"spec": {"serving": {"replicas": 2}}})

    status = api.wait_phase("support-bot", "Serving", timeout=120)
    ftj = api.get("support-bot")
    name, uid = "support-bot", ftj["metadata"]["uid"]

    # Every transition has its Event, in order.
    reasons = [e["reason"] for e in api.events(name) if e["type"] == "Normal"]
    assert reasons == ["Pending", "Validating", "Training", "Merging", "Evaluating", "Deploying", "Serving"], reasons

    # Status.
    assert status["observedGeneration"] == 2
    for type_ in ("Validated", "Trained", "Merged", "Evaluated", "Deployed", "Ready"):
        cond = condition(status, type_)
        assert cond["status"] == "True", cond
        assert cond["lastTransitionTime"] and cond["reason"][0].isupper()
    assert condition(status, "Ready")["observedGeneration"] == 2
    assert condition(status, "Reconciling")["status"] == "False" and condition(status, "Stalled")["status"] == "False"
    assert status["progress"]["percent"] == 100
    assert status["validation"]["reason"] == "DatasetValid" and status["validation"]["rows"] == 120
    assert status["evaluation"]["improvement"] == EVALUATE_OK["improvement"]
    rev = api.rev("support-bot")
    assert status["revision"] == rev and status["servingRevision"] == rev
    assert status["artifacts"]["merged"] == f"s3://artifacts/support-bot/revisions/{rev}/merged/"
    assert status["artifacts"]["adapter"] == f"s3://artifacts/support-bot/revisions/{rev}/adapter/"
    assert status["endpoint"] == {"service": "support-bot-serve", "url": f"http://support-bot-serve.{namespace}.svc:8000/v1",
                                  "model": "support-bot"}

    # Validate Job.
    validate = api.job(api.child("support-bot", "validate"))
    assert_owned_by(validate, ftj)
    pod = validate["spec"]["template"]["spec"]
    assert_restricted(pod)
    (c,) = pod["containers"]
    assert c["command"] == ["kubetune", "validate", "--config", "/etc/kubetune/trainer.yaml"]
    assert c["image"] == "registry.test/kubetune:test"
    env = env_of(c)
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://s3.test:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    assert validate["metadata"]["labels"]["kubetune.io/generation"] == "1"

    # Train Job + headless Service + config.
    train = api.job(api.child("support-bot", "train"))
    assert_owned_by(train, ftj)
    assert train["metadata"]["labels"]["kubetune.io/generation"] == "1"  # built before the edit, never rebuilt
    assert train["spec"]["completionMode"] == "Indexed" and train["spec"]["completions"] == 1
    pod = train["spec"]["template"]["spec"]
    assert_restricted(pod)
    assert pod["subdomain"] == api.child("support-bot", "train") and pod["serviceAccountName"] == "support-bot-trainer"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": DEFAULT_GPU_PRODUCT}
    (c,) = pod["containers"]
    args = c["command"]
    assert args[:2] == ["accelerate", "launch"]
    assert args[args.index("--main_process_ip") + 1] == f"{api.child('support-bot', 'train')}-0.{api.child('support-bot', 'train')}.{namespace}.svc"
    assert args[args.index("--machine_rank") + 1] == "$(JOB_COMPLETION_INDEX)"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env_of(c)["KUBETUNE_JOB_NAME"]["value"] == "support-bot"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["config"]["configMap"]["name"] == api.child("support-bot", "config")
    svc = api.raw(api.core.read_namespaced_service, api.child("support-bot", "train"), namespace)
    assert svc["spec"]["clusterIP"] == "None"
    assert_owned_by(svc, ftj)
    cm = api.raw(api.core.read_namespaced_config_map, api.child("support-bot", "config"), namespace)
    assert "s3://data/support.jsonl" in cm["data"]["trainer.yaml"]
    assert "AWS_SECRET_ACCESS_KEY" not in cm["data"]["trainer.yaml"]
    role = api.raw(api.rbac.read_namespaced_role, "support-bot-trainer", namespace)
    assert role["rules"][0]["resourceNames"] == ["support-bot"]

    for stage, command in (("merge", "merge"), ("evaluate", "evaluate")):
        job = api.job(api.child("support-bot", stage))
        assert_owned_by(job, ftj)
        assert job["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["kubetune", command]

    # Serving: built after the edit, so from generation 2, with 2 replicas.
    dep = api.raw(api.apps.read_namespaced_deployment, "support-bot-serve", namespace)
    assert_owned_by(dep, ftj)
    assert dep["metadata"]["labels"]["kubetune.io/generation"] == "2"
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    assert_restricted(pod)
    (c,) = pod["containers"]
    assert c["image"] == "registry.test/vllm:test"
    assert c["command"][:3] == ["vllm", "serve", f"s3://artifacts/support-bot/revisions/{rev}/merged/"]
    assert "--load-format" in c["command"] and "runai_streamer" in c["command"]
    assert env_of(c)["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "vllm-key", "key": "api-key"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert (dep["status"].get("readyReplicas") or 0) >= 1

    # What a person sees.
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    shown = subprocess.run([str(KUBETUNE), "status", "support-bot", "-n", namespace], env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "phase:      Serving" in shown.stdout and "support-bot-serve" in shown.stdout

    # The operator's own endpoints.
    with urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'kubetune_finetunejobs{phase="Serving"} 1.0' in metrics
    assert "kubetune_reconcile_duration_seconds_count" in metrics
    assert 'kubetune_children_created_total{kind="Job"} 4.0' in metrics
    assert uid


def test_two_nodes_by_four_gpus_is_one_indexed_job(cluster, namespace, gpu_nodes, start_operator):
    nodes = set(fleet(gpu_nodes, count=2, gpus=4))
    api = Api(cluster, namespace)
    start_operator(namespace)
    api.create(body(
        "wide",
        resources={"nodes": 2, "gpusPerNode": 4, "strategy": "deepspeed-zero2"},
        output={"merge": False}, evaluation={"enabled": False}, serving={"enabled": False},
        podMetadata={"train": {"annotations": {KWOK_DURATION: "3s"}}},
    ))
    api.wait_phase("wide", "Training", timeout=60)
    train = api.job(api.child("wide", "train"))
    assert (train["spec"]["completions"], train["spec"]["parallelism"], train["spec"]["completionMode"]) == (2, 2, "Indexed")
    args = train["spec"]["template"]["spec"]["containers"][0]["command"]
    assert args[args.index("--num_machines") + 1] == "2"
    assert args[args.index("--num_processes") + 1] == "8"
    assert args[args.index("--main_process_ip") + 1] == f"{api.child('wide', 'train')}-0.{api.child('wide', 'train')}.{namespace}.svc"
    assert args[args.index("--deepspeed_config_file") + 1] == "/etc/kubetune/deepspeed.json"
    cm = api.raw(api.core.read_namespaced_config_map, api.child("wide", "config"), namespace)
    assert '"stage": 2' in cm["data"]["deepspeed.json"]

    pods = wait_for("two train pods scheduled", lambda: [
        p for p in api.pods("kubetune.io/job=wide,kubetune.io/stage=train") if p["spec"].get("nodeName")
    ] if len(api.pods("kubetune.io/job=wide,kubetune.io/stage=train")) == 2 else None, timeout=30)
    pods = api.pods("kubetune.io/job=wide,kubetune.io/stage=train")
    indexes = sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods)
    assert indexes == ["0", "1"]
    assert sorted(p["spec"]["hostname"] for p in pods) == [f"{api.child('wide', 'train')}-{i}" for i in (0, 1)]
    assert {p["spec"]["subdomain"] for p in pods} == {api.child("wide", "train")}
    # 4 GPUs each on 4-GPU nodes: one pod per node.
    assert {p["spec"]["nodeName"] for p in pods} == nodes
    status = api.wait_phase("wide", "Succeeded", timeout=60)
    assert condition(status, "Trained")["status"] == "True"


def test_training_pod_failure_fails_the_job_with_the_pod_reason(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace)
    api.create(body("oom", podMetadata={"train": {
        "labels": {KWOK_FAIL: "true"},
        "annotations": {KWOK_FAIL_REASON: "OOMKilled", KWOK_EXIT_CODE: "137"},
    }}))
    status = api.wait_phase("oom", "Failed", timeout=90)
    trained = condition(status, "Trained")
    assert (trained["status"], trained["reason"]) == ("False", "OOMKilled")
    assert f"{api.child('oom', 'train')}-0" in trained["message"] and "137" in trained["message"]
    assert condition(status, "Validated")["status"] == "True"
    warnings = [e for e in api.events("oom") if e["type"] == "Warning"]
    assert warnings and warnings[-1]["reason"] == "Failed" and "OOMKilled" in warnings[-1]["message"]
    assert "merge" not in str(api.children("oom")["Job"])  # nothing after a failure


def test_validation_failure_reports_the_bad_rows(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace)
    verdict = {"stage": "validate", "ok": False, "reason": "InvalidRows",
               "message": "2 bad rows: row 4 messages: no assistant turn; row 9 text: empty",
               "errorCount": 2, "errors": [{"row": 4, "field": "messages", "message": "no assistant turn"}]}
    api.create(body("badrows", podMetadata={"validate": {
        "labels": {KWOK_FAIL: "true"}, "annotations": {KWOK_MESSAGE: message(verdict)},
    }}))
    status = api.wait_phase("badrows", "Failed", timeout=60)
    validated = condition(status, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "InvalidRows")
    assert "row 4" in validated["message"] and "row 9" in validated["message"]
    assert status["validation"]["errors"][0]["row"] == 4
    assert api.children("badrows")["Job"] == [api.child("badrows", "validate")]  # no GPU time spent


def test_evaluation_gate_keeps_a_worse_model_from_serving(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace)
    worse = {**EVALUATE_OK, "improvement": 0.01, "message": "eval loss 2.00 -> 1.98"}
    api.create(body("gated", evaluation={"minImprovement": 0.05},
                    podMetadata={"evaluate": {"annotations": {KWOK_MESSAGE: message(worse)}}}))
    status = api.wait_phase("gated", "Failed", timeout=90)
    evaluated = condition(status, "Evaluated")
    assert (evaluated["status"], evaluated["reason"]) == ("False", "EvaluationGateFailed")
    assert "0.05" in evaluated["message"]
    assert api.children("gated")["Deployment"] == []


def test_delete_removes_children_and_keeps_s3_artifacts(cluster, namespace, gpu_nodes, start_operator, s3):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace)
    bucket = f"artifacts-{namespace}"
    s3.client.create_bucket(Bucket=bucket)
    api.create(body("doomed", output={"uri": f"s3://{bucket}/doomed/"}))
    api.wait_phase("doomed", "Serving", timeout=120)
    for key in ("doomed/adapter/MANIFEST.json", "doomed/merged/model.safetensors", "doomed/merged/MANIFEST.json"):
        s3.client.put_object(Bucket=bucket, Key=key, Body=b"{}")
    before = api.children("doomed")
    assert before["Job"] and before["Deployment"] and before["ConfigMap"] and before["Role"]

    api.delete("doomed")
    wait_for("children garbage-collected",
             lambda: all(not names for names in api.children("doomed").values()), timeout=90, interval=0.5)
    keys = sorted(o["Key"] for o in s3.client.list_objects_v2(Bucket=bucket, Prefix="doomed/")["Contents"])
    assert keys == ["doomed/adapter/MANIFEST.json", "doomed/merged/MANIFEST.json", "doomed/merged/model.safetensors"]


def test_preempted_training_pod_is_replaced_without_using_a_retry(cluster, namespace, gpu_nodes, start_operator):
    """A preempted pod ends Failed with the DisruptionTarget condition (set by the
    scheduler or the eviction API, phase by the kubelet; here by the test, as
    kwok runs no kubelet). The train Job's podFailurePolicy ignores it, so even
    with no retries left (backoff 0 in these tests) a new pod takes over."""
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace)
    api.create(body("preempted", output={"merge": False}, evaluation={"enabled": False}, serving={"enabled": False},
                    podMetadata={"train": {"annotations": {KWOK_DURATION: "4s"}}}))
    api.wait_phase("preempted", "Training", timeout=60)
    selector = "kubetune.io/job=preempted,kubetune.io/stage=train"
    (victim,) = wait_for("a running train pod", lambda: [
        p for p in api.pods(selector) if p["status"].get("phase") == "Running"
    ], timeout=30)
    name = victim["metadata"]["name"]
    now = victim["status"]["startTime"]
    api.core.patch_namespaced_pod_status(name, namespace, {"status": {
        "phase": "Failed",
        "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                        "message": "preempted by a higher-priority pod", "lastTransitionTime": now}],
        "containerStatuses": [{"name": "kubetune", "image": "registry.test/kubetune:test", "imageID": "", "ready": False,
                               "restartCount": 0, "state": {"terminated": {"exitCode": 143, "reason": "Error",
                                                                           "startedAt": now, "finishedAt": now}}}],
    }})

    status = api.wait_phase("preempted", "Succeeded", timeout=90)
    assert condition(status, "Trained")["status"] == "True"
    train = api.job(api.child("preempted", "train"))
    # Ignored, not counted: without the policy this Job fails (BackoffLimitExceeded).
    assert train["status"]["succeeded"] == 1 and train["status"].get("failed", 0) == 0


def test_delete_on_job_deletion_holds_the_job_until_its_cleanup_job_finishes(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace)
    api.create(body("purged", output={"merge": False, "deleteOnJobDeletion": True}, evaluation={"enabled": False},
                    serving={"enabled": False}, podMetadata={"all": {"annotations": {KWOK_DURATION: "3s"}}}))
    api.wait_phase("purged", "Succeeded", timeout=90)
    uid = api.get("purged")["metadata"]["uid"]
    cleanup_name = f"purged-cleanup-{uid.replace('-', '')[:8]}"

    api.delete("purged")
    cleanup = wait_for("cleanup Job", lambda: _maybe(lambda: api.job(cleanup_name)), timeout=30)
    # While the cleanup runs, the finalizer keeps the FineTuneJob (and so its children).
    assert api.get("purged")["metadata"].get("deletionTimestamp")
    assert "ownerReferences" not in cleanup["metadata"]
    assert cleanup["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["kubetune", "delete-artifacts"]

    wait_for("FineTuneJob gone", lambda: _maybe(lambda: api.get("purged")) is None, timeout=60, interval=0.5)
    done = api.job(cleanup_name)
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in done["status"]["conditions"])
    assert "ArtifactsDeleted" in [e["reason"] for e in api.events("purged")]
    wait_for("children garbage-collected", lambda: not api.children("purged")["ConfigMap"], timeout=60, interval=0.5)
    assert api.job(cleanup_name)  # not owned: outlives the job until its TTL


def _maybe(read):
    try:
        return read()
    except ApiException as e:
        if e.status == 404:
            return None
        raise
