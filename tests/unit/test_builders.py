"""Pure manifest builders: every child of a FineTuneJob, no cluster."""

import json

import pytest
import yaml

from kubetune.operator import configmaps, deepspeed, job_rbac, names, revisions, serving, stage_jobs, stages, training
from kubetune.operator.api import FineTuneJob
from kubetune.operator.settings import OperatorSettings
from kubetune.trainer.config import parse_config

from .jobs import job

SETTINGS = OperatorSettings(trainer_image="registry.local/kubetune:test", vllm_image="registry.local/vllm:test")


def ftj(**overrides):
    return FineTuneJob.from_body(job(**overrides))


def env_of(container):
    return {e["name"]: e for e in container["env"]}


def assert_restricted(pod_spec):
    psc = pod_spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod_spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["runAsNonRoot"] is True


def assert_owned(obj, name="support-bot", uid="1111-2222"):
    (ref,) = obj["metadata"]["ownerReferences"]
    assert ref == {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": name, "uid": uid,
        "controller": True, "blockOwnerDeletion": True,
    }
    assert obj["metadata"]["labels"]["kubetune.io/job"] == name
    assert obj["metadata"]["namespace"] == "tenant-a"


def test_child_names_are_deterministic():
    assert names.stage_job("a", "train", "r1") == "a-train-r1"
    assert names.train_pod_host("a", "r1", 1, "ns") == "a-train-r1-1.a-train-r1.ns.svc"
    # The longest: a 40-character job's evaluate Job of a revision still fits a 63-character label value.
    assert len(names.stage_job("a" * 40, "evaluate", revisions.of(ftj()))) <= 63


def test_per_revision_children_carry_the_revision_in_name_and_labels():
    rev = revisions.of(ftj())
    assert len(rev) == revisions.ID_LENGTH
    for obj in stages.TRAIN.build(ftj(), SETTINGS):
        if obj["kind"] in ("Job", "ConfigMap", "Service"):
            assert obj["metadata"]["name"].endswith(f"-{rev}")
            assert obj["metadata"]["labels"]["kubetune.io/revision"] == rev
        else:  # RBAC belongs to the job
            assert "kubetune.io/revision" not in obj["metadata"]["labels"]


def test_single_node_train_job():
    obj = training.train_job(ftj(method={"type": "lora"}), SETTINGS)
    assert_owned(obj)
    spec = obj["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 1 and spec["parallelism"] == 1
    assert spec["suspend"] is False and "kueue.x-k8s.io/queue-name" not in obj["metadata"]["labels"]
    pod = spec["template"]["spec"]
    assert_restricted(pod)
    assert pod["subdomain"] == f"support-bot-train-{revisions.of(ftj(method={'type': 'lora'}))}"
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is True  # rank 0 patches status
    assert pod["serviceAccountName"] == "support-bot-trainer"
    (c,) = pod["containers"]
    assert c["image"] == "registry.local/kubetune:test"
    args = c["command"]
    assert args[:2] == ["accelerate", "launch"]
    assert args[args.index("--num_processes") + 1] == "1"
    assert "--multi_gpu" not in args and "--use_deepspeed" not in args
    assert args[-5:] == ["-m", "kubetune", "train", "--config", "/etc/kubetune/trainer.yaml"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "nodeSelector" not in pod
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/etc/kubetune"] == "config" and mounts["/dev/shm"] == "dshm"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert vols["config"]["configMap"]["name"] == f"support-bot-config-{revisions.of(ftj(method={'type': 'lora'}))}"
    env = env_of(c)
    assert env["KUBETUNE_JOB_NAME"]["value"] == "support-bot"
    assert env["KUBETUNE_JOB_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_multi_node_deepspeed_train_job_ranks_and_dns():
    job_ = ftj(
        method={"type": "lora"},
        resources={"nodes": 2, "gpusPerNode": 4, "strategy": "deepspeed-zero3", "gpuType": "NVIDIA-H100-80GB-HBM3"},
    )
    obj = training.train_job(job_, SETTINGS)
    spec = obj["spec"]
    assert spec["completions"] == 2 and spec["parallelism"] == 2 and spec["completionMode"] == "Indexed"
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    args = c["command"]
    assert args[args.index("--num_machines") + 1] == "2"
    assert args[args.index("--num_processes") + 1] == "8"
    assert args[args.index("--machine_rank") + 1] == "$(JOB_COMPLETION_INDEX)"
    rev = revisions.of(job_)
    assert args[args.index("--main_process_ip") + 1] == f"support-bot-train-{rev}-0.support-bot-train-{rev}.tenant-a.svc"
    assert args[args.index("--main_process_port") + 1] == "29500"
    assert args[args.index("--deepspeed_config_file") + 1] == "/etc/kubetune/deepspeed.json"
    assert "--use_deepspeed" in args and args[args.index("--deepspeed_multinode_launcher") + 1] == "standard"
    index_env = env_of(c)["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index_env == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    svc = training.train_service(job_, SETTINGS)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["metadata"]["name"] == pod["subdomain"]
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()


def test_multi_gpu_ddp_uses_multi_gpu_flag():
    args = training.accelerate_args(ftj(resources={"gpusPerNode": 2}), SETTINGS)
    assert "--multi_gpu" in args and "--use_deepspeed" not in args


def test_queue_name_creates_suspended_jobs_with_kueue_label():
    job_ = ftj(resources={"queueName": "team-a", "workloadPriorityClassName": "tenant-high"})
    for name in ("train", "evaluate"):  # the GPU stages
        jobs = [o for o in stages.BY_NAME[name].build(job_, SETTINGS) if o["kind"] == "Job"]
        assert len(jobs) == 1
        assert jobs[0]["spec"]["suspend"] is True
        assert jobs[0]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert jobs[0]["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "tenant-high"
        # Only the Jobs wait: the ConfigMap and RBAC they mount exist before admission.
        assert all("kueue.x-k8s.io/queue-name" not in o["metadata"].get("labels", {})
                   for o in stages.BY_NAME[name].build(job_, SETTINGS) if o["kind"] != "Job")
    # Validation and merge are CPU stages: never queued behind GPU quota.
    for cpu_stage in (stages.VALIDATE, stages.MERGE):
        (cpu_job,) = [o for o in cpu_stage.build(job_, SETTINGS) if o["kind"] == "Job"]
        assert cpu_job["spec"]["suspend"] is False
        assert "kueue.x-k8s.io/queue-name" not in cpu_job["metadata"]["labels"]


def test_s3_env_references_secrets_and_never_copies_them():
    job_ = ftj(storage={"endpointUrl": "http://s3.local:9000", "region": "eu-1", "credentialsSecretRef": {"name": "s3-creds"}})
    for obj in (stage_jobs.validate_job(job_, SETTINGS), training.train_job(job_, SETTINGS)):
        env = env_of(obj["spec"]["template"]["spec"]["containers"][0])
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://s3.local:9000"
        assert env["AWS_REGION"]["value"] == "eu-1"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": key}}}


def test_irsa_service_account_runs_the_pods_and_gets_the_role_binding():
    job_ = ftj(storage={"serviceAccountName": "irsa-sa"})
    pod = training.train_job(job_, SETTINGS)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "irsa-sa"
    kinds = [o["kind"] for o in job_rbac.rbac_objects(job_)]
    assert kinds == ["Role", "RoleBinding"]
    binding = job_rbac.role_binding(job_)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "irsa-sa", "namespace": "tenant-a"}]


def test_per_job_role_may_only_patch_its_own_status():
    (rule,) = job_rbac.role(ftj())["rules"]
    assert rule == {
        "apiGroups": ["kubetune.io"], "resources": ["finetunejobs/status"],
        "resourceNames": ["support-bot"], "verbs": ["get", "patch"],
    }
    sa = job_rbac.service_account(ftj())
    assert sa["automountServiceAccountToken"] is False
    assert_owned(sa)


@pytest.mark.parametrize("stage, command", [("validate", "validate"), ("merge", "merge"), ("evaluate", "evaluate")])
def test_stage_jobs_run_their_command(stage, command):
    build = {"validate": stage_jobs.validate_job, "merge": stage_jobs.merge_job, "evaluate": stage_jobs.evaluate_job}[stage]
    obj = build(ftj(), SETTINGS)
    assert_owned(obj)
    assert obj["metadata"]["name"] == f"support-bot-{stage}-{revisions.of(ftj())}"
    assert obj["spec"]["backoffLimit"] == 0
    pod = obj["spec"]["template"]["spec"]
    assert_restricted(pod)
    assert pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    assert c["command"] == ["kubetune", command, "--config", "/etc/kubetune/trainer.yaml"]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    gpus = c["resources"]["requests"].get("nvidia.com/gpu", "0")
    assert gpus == ("1" if stage == "evaluate" else "0")


def test_generation_label_records_the_spec_generation():
    obj = training.train_job(FineTuneJob.from_body(job(generation=7)), SETTINGS)
    assert obj["metadata"]["labels"]["kubetune.io/generation"] == "7"
    assert obj["spec"]["template"]["metadata"]["labels"]["kubetune.io/generation"] == "7"


def test_config_map_holds_the_trainer_config_and_deepspeed():
    job_ = ftj(method={"type": "lora"}, resources={"strategy": "deepspeed-zero2"}, training={"maxSteps": 10})
    cm = configmaps.config_map(job_)
    assert_owned(cm)
    rev = revisions.of(job_)
    assert cm["metadata"]["name"] == f"support-bot-config-{rev}"
    cfg = parse_config(yaml.safe_load(cm["data"]["trainer.yaml"]))
    assert cfg.training.max_steps == 10 and cfg.job.name == "support-bot"
    # The revision writes under its own prefix.
    assert cfg.output.uri == f"s3://artifacts/tenant-a/support-bot/revisions/{rev}/"
    ds = json.loads(cm["data"]["deepspeed.json"])
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    assert "deepspeed.json" not in configmaps.config_map(ftj())["data"]


def test_deepspeed_zero3_gathers_weights_on_save_and_ddp_has_none():
    z3 = deepspeed.deepspeed_config(ftj(method={"type": "lora"}, resources={"strategy": "deepspeed-zero3"}))
    assert z3["zero_optimization"]["stage"] == 3
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert deepspeed.deepspeed_config(ftj()) is None


def test_merged_serving_deployment():
    job_ = ftj(
        serving={"gpus": 2, "maxModelLen": 4096, "apiKeySecretRef": {"name": "vllm-key"}, "replicas": 2},
        storage={"endpointUrl": "http://s3.local:9000"},
    )
    by_kind = {o["kind"]: o for o in serving.merged_objects(job_, SETTINGS)}
    dep, svc = by_kind["Deployment"], by_kind["Service"]
    assert_owned(dep)
    assert_owned(svc)
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    assert_restricted(pod)
    (c,) = pod["containers"]
    assert c["image"] == "registry.local/vllm:test"
    args = c["command"]
    assert args[:3] == ["vllm", "serve", f"s3://artifacts/tenant-a/support-bot/revisions/{revisions.of(job_)}/merged/"]
    assert args[args.index("--host") + 1] == "0.0.0.0" and args[args.index("--port") + 1] == "8000"
    assert args[args.index("--served-model-name") + 1] == "support-bot"
    assert args[args.index("--load-format") + 1] == "runai_streamer"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--max-model-len") + 1] == "4096"
    assert "--api-key" not in args
    env = env_of(c)
    assert env["VLLM_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "vllm-key", "key": "api-key"}}
    assert env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"]["value"] == "0"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert serving.endpoint(job_)["url"] == "http://support-bot-serve.tenant-a.svc:8000/v1"


@pytest.mark.parametrize("method, serving_spec, field", [
    ({"r": 1024}, {}, "spec.method.r:"),
    ({"useDora": True}, {}, "spec.method.useDora:"),
    ({"bias": "all"}, {}, "spec.method.bias:"),
    ({"modulesToSave": ["lm_head"]}, {}, "spec.method.modulesToSave:"),
    ({}, {"autoscaling": {"maxReplicas": 2}}, "spec.serving.autoscaling:"),
])
def test_adapters_a_shared_vllm_server_cannot_load_are_refused_before_any_work(method, serving_spec, field):
    # The Python twins of the CRD's rules (tests/operator/test_admission.py sends the same to the API server).
    spec = ftj(method=method, serving={"mode": "adapter", **serving_spec}).spec
    (message,) = stages.refusals(spec)
    assert message.startswith(field) and "adapter" in message
    # The same recipe in merged mode is served (merged/ carries no adapter for vLLM to check).
    if not serving_spec:
        assert stages.refusals(ftj(method=method).spec) == []
    assert stages.refusals(ftj(serving={"mode": "adapter"}, method={"r": 512, "modulesToSave": ["score"]}).spec) == []


def test_children_need_an_owner_uid():
    body = job()
    del body["metadata"]["uid"]
    with pytest.raises(ValueError, match="uid"):
        training.train_job(FineTuneJob.from_body(body), SETTINGS)


def test_pod_metadata_per_stage_never_overrides_operator_labels():
    job_ = ftj(podMetadata={
        "all": {"labels": {"team": "search", "kubetune.io/job": "hijack"}, "annotations": {"cost": "a"}},
        "train": {"annotations": {"cost": "b", "sidecar": "off"}},
    })
    train_meta = training.train_job(job_, SETTINGS)["spec"]["template"]["metadata"]
    assert train_meta["labels"]["team"] == "search"
    assert train_meta["labels"]["kubetune.io/job"] == "support-bot"
    assert train_meta["annotations"] == {"cost": "b", "sidecar": "off"}
    validate_meta = stage_jobs.validate_job(job_, SETTINGS)["spec"]["template"]["metadata"]
    assert validate_meta["annotations"] == {"cost": "a"}
    dep = next(o for o in serving.merged_objects(job_, SETTINGS) if o["kind"] == "Deployment")
    assert dep["spec"]["template"]["metadata"]["annotations"] == {"cost": "a"}


CLIENT_MODELS = {
    "Job": "V1Job", "Service": "V1Service", "ConfigMap": "V1ConfigMap", "ServiceAccount": "V1ServiceAccount",
    "Role": "V1Role", "RoleBinding": "V1RoleBinding", "Deployment": "V1Deployment",
    "NetworkPolicy": "V1NetworkPolicy", "PodDisruptionBudget": "V1PodDisruptionBudget",
    "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler",
}


@pytest.mark.parametrize("stage", ["validate", "train", "merge", "evaluate", "serve"])
@pytest.mark.parametrize("variant", [
    {},
    {"method": {"type": "lora"}, "resources": {"nodes": 2, "gpusPerNode": 8, "strategy": "deepspeed-zero3", "queueName": "q"},
     "storage": {"serviceAccountName": "irsa"}, "serving": {"apiKeySecretRef": {"name": "k"}, "gpus": 2}},
], ids=["defaults", "wide"])
def test_every_child_is_a_valid_kubernetes_object(stage, variant):
    """The kubernetes client's own models (unknown fields forbidden, typed
    quantities) accept every manifest the operator would create."""
    from kubernetes import client

    for obj in stages.BY_NAME[stage].build(ftj(**variant), SETTINGS):
        model = getattr(client, CLIENT_MODELS[obj["kind"]])
        model.model_validate(obj)
