"""Invalid FineTuneJobs are rejected by the API server itself (OpenAPI schema +
CEL rules of the generated CRD), each with a message naming the field."""

from __future__ import annotations

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kubetune.devcluster.cluster import wait_for
from kubetune.operator.packaging import ROOT

from .ftj import GROUP, PLURAL, VERSION, Api, body

EXAMPLES = ROOT / "manifests" / "examples"

# (case id, spec sections to merge, text that must appear in the rejection)
INVALID = [
    ("base-model-scheme", {"baseModel": {"uri": "gs://models/x/"}}, "spec.baseModel.uri"),
    # Hugging Face ids are refused at admission (no hub downloads), saying how to copy the snapshot to S3.
    ("base-model-hf-id", {"baseModel": {"uri": "Qwen/Qwen2.5-7B-Instruct"}}, "huggingface-cli download"),
    ("base-model-revision", {"baseModel": {"uri": "s3://models/x/", "revision": "main"}}, "spec.baseModel.revision"),
    ("base-model-empty", {"baseModel": {"uri": ""}}, "spec.baseModel.uri"),
    ("dataset-scheme", {"dataset": {"uri": "https://example.org/data.jsonl"}}, "spec.dataset.uri"),
    ("output-scheme", {"output": {"uri": "/mnt/out"}}, "spec.output.uri"),
    ("output-bucket-uppercase", {"output": {"uri": "s3://Bad_Bucket/x"}}, "spec.output.uri"),
    ("dataset-format", {"dataset": {"format": "csv-ish"}}, "spec.dataset.format"),
    ("validation-split", {"dataset": {"validationSplit": 1.0}}, "spec.dataset.validationSplit"),
    ("max-length", {"dataset": {"maxLength": 8}}, "spec.dataset.maxLength"),
    ("method-type", {"method": {"type": "full"}}, "spec.method.type"),
    ("lora-rank", {"method": {"r": 0}}, "spec.method.r"),
    ("lora-dropout", {"method": {"dropout": 1.5}}, "spec.method.dropout"),
    ("quant-bits", {"method": {"type": "qlora", "quantization": {"bits": 3}}}, "spec.method.quantization.bits"),
    ("target-modules-empty", {"method": {"targetModules": []}}, "spec.method.targetModules"),
    ("learning-rate", {"training": {"learningRate": 0}}, "spec.training.learningRate"),
    ("epochs", {"training": {"epochs": -1}}, "spec.training.epochs"),
    ("batch-size-zero", {"training": {"batchSize": 0}}, "spec.training.batchSize"),
    ("batch-size-word", {"training": {"batchSize": "big"}}, "spec.training.batchSize"),
    ("scheduler", {"training": {"scheduler": "sawtooth"}}, "spec.training.scheduler"),
    ("gpus-per-node-high", {"resources": {"gpusPerNode": 9}}, "spec.resources.gpusPerNode"),
    ("gpus-per-node-zero", {"resources": {"gpusPerNode": 0}}, "spec.resources.gpusPerNode"),
    ("nodes", {"resources": {"nodes": 0}}, "spec.resources.nodes"),
    ("strategy", {"resources": {"strategy": "fsdp"}}, "spec.resources.strategy"),
    ("qlora8-zero3", {"method": {"type": "qlora", "quantization": {"bits": 8}}, "resources": {"strategy": "deepspeed-zero3"}},
     "spec.method.quantization.bits"),
    ("fp8-mode", {"training": {"performance": {"fp8": "fp4"}}}, "spec.training.performance.fp8"),
    ("fp8-on-zero3", {"training": {"performance": {"fp8": "on"}}, "resources": {"strategy": "deepspeed-zero3"}},
     "spec.training.performance.fp8"),
    ("fused-lora-on-zero3", {"training": {"performance": {"fusedLora": "on"}}, "resources": {"strategy": "deepspeed-zero3"}},
     "spec.training.performance.fusedLora"),
    ("fused-lora-on-dora", {"training": {"performance": {"fusedLora": "on"}}, "method": {"useDora": True}},
     "spec.training.performance.fusedLora"),
    # What a shared vLLM server cannot load is refused before anything runs (the serve stage's rules).
    ("adapter-rank-above-vllm", {"serving": {"mode": "adapter"}, "method": {"r": 1024}}, "spec.method.r"),
    ("adapter-dora", {"serving": {"mode": "adapter"}, "method": {"useDora": True}}, "spec.method.useDora"),
    ("adapter-bias", {"serving": {"mode": "adapter"}, "method": {"bias": "all"}}, "spec.method.bias"),
    ("adapter-lm-head", {"serving": {"mode": "adapter"}, "method": {"modulesToSave": ["lm_head"]}},
     "spec.method.modulesToSave"),
    ("adapter-autoscaling", {"serving": {"mode": "adapter", "autoscaling": {"maxReplicas": 2}}},
     "spec.serving.autoscaling"),
    # The knobs of the recipe (kubetune.contract.recipe), each refused naming its field.
    ("optimizer", {"training": {"optimizer": "lion"}}, "spec.training.optimizer"),
    ("weight-decay", {"training": {"weightDecay": -0.1}}, "spec.training.weightDecay"),
    ("max-grad-norm", {"training": {"maxGradNorm": -1}}, "spec.training.maxGradNorm"),
    ("lora-bias", {"method": {"bias": "some"}}, "spec.method.bias"),
    ("use-dora", {"method": {"useDora": "yes"}}, "spec.method.useDora"),
    ("modules-to-save", {"method": {"modulesToSave": [""]}}, "spec.method.modulesToSave"),
    ("compute-dtype", {"method": {"quantization": {"computeDtype": "float8"}}}, "spec.method.quantization.computeDtype"),
    ("completion-only-loss", {"training": {"completionOnlyLoss": "sometimes"}}, "spec.training.completionOnlyLoss"),
    ("eval-every", {"training": {"evalEvery": 0}}, "spec.training.evalEvery"),
    ("keep-checkpoints", {"training": {"keepCheckpoints": 0}}, "spec.training.keepCheckpoints"),
    ("log-every", {"training": {"logEvery": 0}}, "spec.training.logEvery"),
    ("chat-template-empty", {"dataset": {"chatTemplate": ""}}, "spec.dataset.chatTemplate"),
    ("attention", {"training": {"performance": {"attention": "flash9"}}}, "spec.training.performance.attention"),
    ("liger", {"training": {"performance": {"liger": "maybe"}}}, "spec.training.performance.liger"),
    ("compile", {"training": {"performance": {"compile": 1}}}, "spec.training.performance.compile"),
    ("selective-checkpointing", {"training": {"performance": {"selectiveCheckpointing": "sometimes"}}},
     "spec.training.performance.selectiveCheckpointing"),
    ("memory-budget", {"training": {"performance": {"memoryBudgetGiB": 0}}}, "spec.training.performance.memoryBudgetGiB"),
    ("max-eval-rows", {"evaluation": {"maxEvalRows": 0}}, "spec.evaluation.maxEvalRows"),
    # Quantities and image references are checked at admission, not by a create that fails every pass.
    ("memory-quantity", {"resources": {"memory": "lots"}}, "spec.resources.memory"),
    ("cpu-quantity", {"resources": {"cpu": "4 cores"}}, "spec.resources.cpu"),
    ("shm-quantity", {"resources": {"shmSize": "-1Gi"}}, "spec.resources.shmSize"),
    ("image-reference", {"image": "Registry.Example.com/Kubetune:latest tag"}, "spec.image"),
    ("queue-name", {"resources": {"queueName": "Team_A"}}, "spec.resources.queueName"),
    ("credentials-and-irsa", {"storage": {"credentialsSecretRef": {"name": "s3"}, "serviceAccountName": "irsa"}},
     "spec.storage.serviceAccountName"),
    ("endpoint-url", {"storage": {"endpointUrl": "s3.local:9000"}}, "spec.storage.endpointUrl"),
    ("merged-serving-without-merge", {"output": {"merge": False}}, "spec.serving.mode"),
    ("gate-without-evaluation", {"evaluation": {"enabled": False, "minImprovement": 0.1}}, "spec.evaluation.minImprovement"),
    ("min-improvement-range", {"evaluation": {"minImprovement": 2}}, "spec.evaluation.minImprovement"),
    ("serving-replicas", {"serving": {"replicas": -1}}, "spec.serving.replicas"),
    ("serving-gpus", {"serving": {"gpus": 9}}, "spec.serving.gpus"),
    ("api-key-secret-name", {"serving": {"apiKeySecretRef": {"name": "Not_A_Name"}}}, "spec.serving.apiKeySecretRef.name"),
]


@pytest.fixture
def api(cluster, crd, namespace):
    return Api(cluster, namespace)


def _rejection(api: Api, obj: dict) -> str:
    with pytest.raises(ApiException) as err:
        api.create(obj)
    assert err.value.status == 422, err.value.body
    return err.value.body


@pytest.mark.parametrize("case, spec, field", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_is_rejected_naming_the_field(api, case, spec, field):
    obj = body(f"bad-{case}"[:40].rstrip("-"), **spec)
    assert field in _rejection(api, obj)


def test_missing_required_section(api):
    obj = body("no-dataset")
    del obj["spec"]["dataset"]
    assert "spec.dataset" in _rejection(api, obj)


@pytest.mark.parametrize("name, text", [
    ("a" * 41, "at most 40 characters"),
    ("1-starts-with-digit", "DNS-1035"),
])
def test_bad_names(api, name, text):
    assert text in _rejection(api, body(name))


def test_4bit_qlora_with_zero3_is_admitted(api):
    # The CEL rule refuses only 8-bit QLoRA under ZeRO-3, also when bits comes from the default.
    created = api.create(body("qlora-zero3", method={"type": "qlora"}, resources={"strategy": "deepspeed-zero3"}))
    assert created["spec"]["method"]["quantization"]["bits"] == 4
    assert created["spec"]["resources"]["strategy"] == "deepspeed-zero3"


def test_defaults_are_applied_by_the_api_server(api):
    created = api.create(body("defaults"))
    spec = created["spec"]
    assert spec["resources"]["nodes"] == 1 and spec["resources"]["gpusPerNode"] == 1
    assert spec["training"]["batchSize"] == "auto" and spec["training"]["checkpointEvery"] == 200
    assert spec["training"]["performance"] == {"attention": "auto", "liger": "auto", "fusedLora": "auto", "fp8": "auto",
                                               "compile": "auto", "selectiveCheckpointing": "auto"}
    assert spec["training"]["gradientCheckpointing"] is True and spec["training"]["optimizer"] == "auto"
    assert spec["serving"] == {**spec["serving"], "enabled": True, "mode": "merged", "replicas": 1}
    assert spec["output"]["merge"] is True


# (spec sections, trainer config path, value there): each knob the API server admits reaches the trainer.
KNOBS = [
    ({"training": {"optimizer": "paged_adamw_8bit"}}, "training.optimizer", "paged_adamw_8bit"),
    ({"training": {"optimizer": "adamw_8bit"}}, "training.optimizer", "adamw_8bit"),
    ({"training": {"weightDecay": 0.01}}, "training.weight_decay", 0.01),
    ({"training": {"maxGradNorm": 0.3}}, "training.max_grad_norm", 0.3),
    ({"method": {"bias": "lora_only"}}, "method.bias", "lora_only"),
    ({"method": {"useDora": True}}, "method.use_dora", True),
    ({"method": {"useRslora": True}}, "method.use_rslora", True),
    ({"method": {"modulesToSave": ["lm_head", "embed_tokens"]}}, "method.modules_to_save", ["lm_head", "embed_tokens"]),
    ({"method": {"quantization": {"computeDtype": "float16"}}}, "method.quantization.compute_dtype", "float16"),
    ({"training": {"completionOnlyLoss": False}}, "training.completion_only_loss", False),
    ({"training": {"evalEvery": 50}}, "training.eval_every", 50),
    ({"training": {"keepCheckpoints": 5}}, "training.keep_checkpoints", 5),
    ({"training": {"logEvery": 10}}, "training.log_every", 10),
    ({"dataset": {"chatTemplate": "{% for m in messages %}{{ m.content }}{% endfor %}"}}, "dataset.chat_template",
     "{% for m in messages %}{{ m.content }}{% endfor %}"),
    ({"training": {"performance": {"attention": "sdpa", "liger": "off", "fusedLora": "off"}}},
     "training.performance.fused_lora", "off"),
    ({"training": {"performance": {"fp8": "on", "compile": "on", "selectiveCheckpointing": "off"}}},
     "training.performance.selective_checkpointing", "off"),
    ({"training": {"performance": {"memoryBudgetGiB": 15.6}}}, "training.performance.memory_budget_gib", 15.6),
    ({"evaluation": {"maxEvalRows": 64}}, "evaluation.max_eval_rows", 64),
]


@pytest.mark.parametrize("spec, path, value", KNOBS, ids=[k[1] + "=" + str(k[2])[:20] for k in KNOBS])
def test_recipe_knobs_are_admitted_and_reach_the_trainer_config(api, spec, path, value):
    from kubetune.operator.render import trainer_config_for

    name = ("knob-" + path.split(".")[-1].replace("_", "-"))[:40]
    created = api.create(body(name, **spec))
    cfg = trainer_config_for(created)  # what the operator renders into the ConfigMap, from the stored object
    got = cfg
    for part in path.split("."):
        got = getattr(got, part)
    assert got == value


@pytest.mark.parametrize("field, patch", [
    ("spec.dataset", {"dataset": {"uri": "s3://data/other.jsonl"}}),
    ("spec.baseModel", {"baseModel": {"uri": "s3://models/other/"}}),
    ("spec.method", {"method": {"r": 64}}),
    ("spec.training", {"training": {"learningRate": 0.001}}),
    ("spec.resources", {"resources": {"gpusPerNode": 2}}),
    ("spec.output", {"output": {"uri": "s3://artifacts/elsewhere/"}}),
    ("spec.serving", {"serving": {"enabled": False}}),
])
def test_every_section_may_be_edited_for_gitops(api, field, patch):
    # An Argo CD or Flux sync of an edit must apply: recipe edits become a new revision.
    name = f"edit-{field.split('.')[-1].lower()}"
    api.create(body(name))
    patched = api.patch(name, {"spec": patch})
    assert patched["metadata"]["generation"] == 2


def test_serving_replicas_may_change(api):
    api.create(body("scalable"))
    patched = api.patch("scalable", {"spec": {"serving": {"replicas": 3}}})
    assert patched["spec"]["serving"]["replicas"] == 3 and patched["metadata"]["generation"] == 2


def test_kubectl_explain_reads_the_field_descriptions(cluster, crd):
    # Discovery and the OpenAPI document pick a new CRD up a moment after Established.
    explain = lambda: cluster.kubectl("explain", "ftj.spec.resources.gpusPerNode", check=False)  # noqa: E731
    out = wait_for("kubectl explain ftj", lambda: (r := explain()).returncode == 0 and r.stdout, timeout=30, interval=1)
    assert "GPUs per machine" in out
    out = cluster.kubectl("explain", "finetunejob.spec.storage").stdout
    assert "credentialsSecretRef" in out and "IRSA" in out


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_pass_the_api_servers_validation(api, example):
    for doc in yaml.safe_load_all(example.read_text()):
        doc["metadata"].pop("namespace", None)
        created = api.custom.create_namespaced_custom_object(GROUP, VERSION, api.ns, PLURAL, doc, dry_run="All")
        assert created["metadata"]["name"] == doc["metadata"]["name"]


def test_kustomize_base_renders_the_operator(cluster):
    docs = list(yaml.safe_load_all(cluster.kubectl("kustomize", str(ROOT / "manifests" / "base")).stdout))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("CustomResourceDefinition", "finetunejobs.kubetune.io") in kinds
    assert ("ClusterRole", "kubetune-operator") in kinds and ("Deployment", "kubetune-operator") in kinds
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["metadata"]["namespace"] == "kubetune-system"
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/kubetune/kubetune:0.1.0"


def test_examples_apply_cleanly_on_a_fresh_cluster_with_their_prerequisites(cluster, crd):
    """The first hour: prerequisites (namespaces with Pod Security, the IRSA account, the
    Secrets) and then every example, applied as a user would, with kubectl."""
    prerequisites = EXAMPLES / "prerequisites"
    try:
        for path in (prerequisites / "namespaces.yaml", prerequisites / "secrets.example.yaml", *sorted(EXAMPLES.glob("*.yaml"))):
            out = cluster.kubectl("apply", "-f", str(path), check=False)
            assert out.returncode == 0, f"{path.name}: {out.stderr}"
        listed = {ns: cluster.kubectl("get", "ftj", "-n", ns, "-o", "name").stdout.split()
                  for ns in ("team-a", "team-b", "team-c")}
        assert listed == {"team-a": ["finetunejob.kubetune.io/support-bot"],
                          "team-b": ["finetunejob.kubetune.io/legal-summarizer"],
                          "team-c": ["finetunejob.kubetune.io/sql-adapter"]}
        labels = cluster.kubectl("get", "namespace", "team-a", "-o", "jsonpath={.metadata.labels}").stdout
        assert '"pod-security.kubernetes.io/enforce":"restricted"' in labels
    finally:
        cluster.kubectl("delete", "-f", str(prerequisites / "namespaces.yaml"), "--wait=false", check=False)
