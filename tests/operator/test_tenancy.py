"""Tenant policy on the real control plane, with Kueue running.

The module's fixture performs docs/multi-tenancy.md: it runs every command of
the guide's console blocks, in order, from the repository root, with the
cluster's kubectl (two tenant namespaces, their Kueue quotas, their
TenantPolicies, the tenants' RBAC, a job within policy, refusals), and the
guide's "Tear down" commands after the module. The first test checks that
each command printed what the guide shows; the others build on the two
tenants it leaves: every limit is refused by the API server naming the field
(and the operator's Python twin says the same words), a namespace without
the tenant label is unaffected, a job admitted before its policy is refused
by the operator, and a tenant's job runs through its own queue.
"""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.devcluster.cluster import wait_for
from kubetune.devcluster.queues import is_true
from kubetune.operator import tenancy
from kubetune.operator.api import FineTuneJob
from kubetune.operator.api import tenancy as tenancy_api
from kubetune.operator.kube import Kube
from kubetune.operator.packaging import ROOT

from .ftj import EVALUATE_OK, GROUP, KWOK_DURATION, KWOK_MESSAGE, PLURAL, VALIDATE_OK, VERSION, Api, condition, fleet, message
from .guide import FAIR_SHARING_HEADING, GUIDE, guide_steps, run_step, shows

EXAMPLES = ROOT / "manifests" / "examples" / "tenancy"


@pytest.fixture(scope="module")
def walkthrough(cluster, crd, kueue):
    """The guide, performed; its teardown after the module (also after a failure)."""
    # The guide up to its fair-sharing walkthrough, which tests/operator/test_fair_sharing.py runs.
    setup, teardown = guide_steps(GUIDE.read_text().split(FAIR_SHARING_HEADING)[0])
    assert setup and teardown, f"{GUIDE} has no console blocks"
    for step in setup:
        run_step(cluster, step)
    yield setup
    failures = [s for s in (run_step(cluster, s) for s in teardown) if s.returncode != 0]
    assert not failures, "\n".join(f"$ {s.command}\n{s.output}" for s in failures)


def test_the_guide_prints_what_it_shows(walkthrough):
    for step in walkthrough:
        refused = any(line.startswith("Error from server") for line in step.expected)
        assert (step.returncode != 0) == refused, f"$ {step.command}\n{step.output}"
        for line in step.expected:
            assert shows(step.output, line), f"$ {step.command}\nexpected: {line}\ngot:\n{step.output}"


# ---------------------------------------------------------------- refusals, each naming its field


def _example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def _merge(doc: dict, changes: dict) -> dict:
    """A deep merge where None deletes the key."""
    out = copy.deepcopy(doc)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def job_of(example: str, name: str, **spec) -> dict:
    doc = _example(example)
    doc["metadata"]["name"] = name
    doc["spec"] = _merge(doc["spec"], spec)
    return doc


def policies(cluster) -> list[dict]:
    return client.CustomObjectsApi(cluster.api_client()).list_cluster_custom_object(
        GROUP, VERSION, tenancy_api.PLURAL)["items"]


def namespace_labels(cluster, namespace: str) -> dict[str, str]:
    return client.CoreV1Api(cluster.api_client()).read_namespace(namespace).metadata.labels or {}


def refusal(api: Api, obj: dict) -> str:
    with pytest.raises(ApiException) as err:
        api.create(obj)
    assert err.value.status == 403, err.value.body
    return json.loads(err.value.body)["message"]


def python_twin(cluster, namespace: str, obj: dict) -> list[tenancy.Violation]:
    job = FineTuneJob.from_body({**obj, "metadata": {**obj["metadata"], "namespace": namespace}})
    return tenancy.violations(job, namespace_labels(cluster, namespace), policies(cluster))


# (case id, changes to team-a's example job, the field the refusal names)
TEAM_A_REFUSED = [
    ("other-tenants-dataset", {"dataset": {"uri": "s3://team-b-data/chat.jsonl"}}, "spec.dataset.uri"),
    ("other-tenants-output", {"output": {"uri": "s3://team-b-artifacts/support-bot/"}}, "spec.output.uri"),
    ("bucket-sharing-a-prefix", {"output": {"uri": "s3://team-a-artifacts-old/x/"}}, "spec.output.uri"),
    ("other-tenants-kernel-cache", {"output": {"kernelCacheUri": "s3://team-b-artifacts/kernels/"}},
     "spec.output.kernelCacheUri"),
    ("dot-segments", {"dataset": {"uri": "s3://team-a-data/../team-b-data/chat.jsonl"}}, "spec.dataset.uri"),
    ("model-outside-prefixes", {"baseModel": {"uri": "s3://team-b-data/models/llama/"}}, "spec.baseModel.uri"),
    ("base-model-not-listed", {"baseModel": {"uri": "s3://shared-models/mistral-7b/"}}, "spec.baseModel.uri"),
    ("too-many-gpus", {"resources": {"nodes": 2, "gpusPerNode": 8}}, "spec.resources.nodes * spec.resources.gpusPerNode"),
    ("too-many-serving-gpus", {"serving": {"gpus": 8, "replicas": 2}}, "spec.serving.gpus * spec.serving.replicas"),
    ("gpu-type", {"resources": {"gpuType": "NVIDIA-A100-SXM4-80GB"}}, "spec.resources.gpuType"),
    ("gpu-type-unset", {"resources": {"gpuType": None}}, "spec.resources.gpuType"),
    ("serving-gpu-type", {"serving": {"gpuType": "NVIDIA-L4"}}, "spec.serving.gpuType"),
    ("image", {"image": "docker.io/someone/kubetune:latest"}, "spec.image"),
    ("image-repository-prefix", {"image": "registry.example.com/kubetune-fork:1.0"}, "spec.image"),
    ("too-many-replicas", {"serving": {"replicas": 3}}, "spec.serving.replicas"),
    ("service-account", {"storage": {"credentialsSecretRef": None, "serviceAccountName": "default"}},
     "spec.storage.serviceAccountName"),
    ("priority-class", {"resources": {"priorityClassName": "high-priority"}}, "spec.resources.priorityClassName"),
    ("kueue-priority", {"resources": {"workloadPriorityClassName": "urgent"}}, "spec.resources.workloadPriorityClassName"),
    ("queue-unset", {"resources": {"queueName": None}}, "spec.resources.queueName"),
    ("queue-not-listed", {"resources": {"queueName": "team-b"}}, "spec.resources.queueName"),
]


@pytest.mark.parametrize("case, changes, field", TEAM_A_REFUSED, ids=[c[0] for c in TEAM_A_REFUSED])
def test_the_api_server_refuses_naming_the_field(cluster, walkthrough, case, changes, field):
    api = Api(cluster, "team-a")
    obj = job_of("job-team-a.yaml", f"refused-{case}"[:40].rstrip("-"), **changes)
    text = refusal(api, obj)
    assert "ValidatingAdmissionPolicy 'kubetune-tenancy'" in text, text
    assert text.split("denied request: ", 1)[1].startswith(field + " "), text
    # The operator's check (operator/tenancy.py) refuses the same object in the same words:
    # the API server reports the first limit that fails, the operator lists them in that order.
    found = python_twin(cluster, "team-a", obj)
    assert found and found[0].field == field and found[0].policy == "team-a", found
    assert text.endswith(found[0].message), (text, found[0].message)


def test_the_refusal_names_the_allowed_prefixes(cluster, walkthrough):
    api = Api(cluster, "team-a")
    text = refusal(api, job_of("job-team-a.yaml", "reads-team-b", dataset={"uri": "s3://team-b-data/chat.jsonl"}))
    assert "spec.dataset.uri s3://team-b-data/chat.jsonl" in text and "[s3://team-a-data/]" in text, text


def test_jobs_within_policy_are_admitted_up_to_each_limit(cluster, walkthrough):
    api = Api(cluster, "team-a")
    created = api.create(job_of(
        "job-team-a.yaml", "at-the-limits",
        resources={"nodes": 2, "gpusPerNode": 4},  # 8 GPUs: team-a's maximum
        serving={"gpus": 4, "replicas": 2},  # 8 GPUs, 2 replicas: both maxima
        baseModel={"uri": "s3://shared-models/qwen3-8b/"},
        image="registry.example.com/kubetune:1.2.3",  # 'registry.example.com/kubetune:' allows every tag
    ))
    assert created["metadata"]["uid"]
    assert python_twin(cluster, "team-a", created) == []


def test_each_tenant_has_its_own_limits(cluster, walkthrough):
    team_b = Api(cluster, "team-b")
    # 8 GPUs: team-a's policy allows them (above), team-b's does not (the guide shows it).
    text = refusal(team_b, job_of("job-team-b-8-gpus.yaml", "team-b-reads-team-a",
                                  resources={"nodes": 1}, dataset={"uri": "s3://team-a-data/support/train.jsonl"}))
    assert "spec.dataset.uri s3://team-a-data/support/train.jsonl" in text and "TenantPolicy team-b" in text, text
    assert "[s3://team-b-data/]" in text, text
    # Team-a's base model is not on team-b's list.
    text = refusal(team_b, job_of("job-team-b-8-gpus.yaml", "team-b-llama", resources={"nodes": 1},
                                  baseModel={"uri": "s3://shared-models/llama-3.1-8b-instruct/"}))
    assert "spec.baseModel.uri" in text and "[s3://shared-models/qwen3-8b/]" in text, text
    created = team_b.create(job_of("job-team-b-8-gpus.yaml", "within-team-b", resources={"nodes": 1}))
    assert created["spec"]["resources"]["nodes"] * created["spec"]["resources"]["gpusPerNode"] == 4


def test_spec_edits_are_checked_too(cluster, walkthrough):
    api = Api(cluster, "team-a")
    api.create(job_of("job-team-a.yaml", "edited"))
    with pytest.raises(ApiException) as err:
        api.patch("edited", {"spec": {"serving": {"replicas": 3}}})
    assert err.value.status == 403 and "spec.serving.replicas is 3" in err.value.body, err.value.body
    api.patch("edited", {"spec": {"serving": {"replicas": 2}}})
    assert api.get("edited")["spec"]["serving"]["replicas"] == 2


def test_a_namespace_without_the_tenant_label_is_unaffected(cluster, walkthrough, namespace):
    api = Api(cluster, namespace)
    anything = job_of("job-team-a.yaml", "unrestricted", dataset={"uri": "s3://team-b-data/chat.jsonl"},
                      resources={"nodes": 4, "gpusPerNode": 8, "gpuType": None, "queueName": None},
                      image="docker.io/someone/kubetune:latest", serving={"replicas": 5})
    anything["metadata"]["namespace"] = namespace
    assert api.create(anything)["metadata"]["uid"]
    assert python_twin(cluster, namespace, anything) == []


def test_a_reference_into_another_namespace_cannot_be_written(cluster, walkthrough):
    api = Api(cluster, "team-a")
    obj = job_of("job-team-a.yaml", "cross-namespace",
                 storage={"credentialsSecretRef": {"name": "s3-credentials", "namespace": "team-b"}},
                 serving={"apiKeySecretRef": {"name": "vllm-key", "namespace": "team-b"}})
    # kubectl asks for strict field validation: the field does not exist.
    result = subprocess.run([str(cluster.kubectl_binary), f"--kubeconfig={cluster.kubeconfig}", "create", "-f", "-"],
                            input=yaml.safe_dump(obj), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and 'unknown field "spec.storage.credentialsSecretRef.namespace"' in result.stderr, result.stderr
    # Other clients get it pruned: what is stored names a Secret of the job's own namespace only.
    stored = api.create(obj)
    assert stored["spec"]["storage"]["credentialsSecretRef"] == {"name": "s3-credentials"}
    assert stored["spec"]["serving"]["apiKeySecretRef"] == {"name": "vllm-key", "key": "api-key"}


@pytest.mark.parametrize("uri_prefixes, text", [
    # s3://team-c would also allow s3://team-c-old/...
    ({"datasets": ["s3://team-c"], "models": [], "outputs": []}, "ending with '/'"),
    ({"datasets": [], "models": [], "outputs": ["s3://team-c/../team-a-artifacts/"]}, "no '.' or '..' segment"),
])
def test_the_api_server_refuses_a_tenant_policy_that_would_allow_too_much(cluster, walkthrough, uri_prefixes, text):
    policy = {"apiVersion": tenancy_api.API_VERSION, "kind": tenancy_api.KIND, "metadata": {"name": "team-c"},
              "spec": {"namespaceSelector": {"matchLabels": {"kubetune.io/tenant": "team-c"}}, "uriPrefixes": uri_prefixes}}
    with pytest.raises(ApiException) as err:
        client.CustomObjectsApi(cluster.api_client()).create_cluster_custom_object(GROUP, VERSION, tenancy_api.PLURAL, policy)
    assert err.value.status == 422 and "spec.uriPrefixes" in err.value.body and text in err.value.body, err.value.body


# ---------------------------------------------------------------- a job admitted before its policy


def _admitted_before_its_policy(cluster, namespace: str, request) -> dict:
    """A job writing into team-b's prefix, created while no TenantPolicy selected its
    namespace; then a policy that selects it, with team-a's prefixes."""
    api = Api(cluster, namespace)
    cluster.kubectl("label", "namespace", namespace, f"kubetune.io/tenant={namespace}")
    obj = job_of("job-team-a.yaml", "slipped-in", output={"uri": "s3://team-b-artifacts/slipped-in/"},
                 resources={"queueName": None}, serving={"enabled": False})
    obj["metadata"]["namespace"] = namespace
    obj["spec"]["podMetadata"] = {"validate": {"annotations": {KWOK_MESSAGE: message(VALIDATE_OK)}},
                                  "evaluate": {"annotations": {KWOK_MESSAGE: message(EVALUATE_OK)}}}
    api.create(obj)
    team_a = next(yaml.safe_load_all((EXAMPLES / "policies.yaml").read_text()))
    policy = {**team_a, "metadata": {"name": namespace}}
    policy["spec"] = {**policy["spec"], "namespaceSelector": {"matchLabels": {"kubetune.io/tenant": namespace}}}
    policy["spec"].pop("queueNames")
    custom = client.CustomObjectsApi(cluster.api_client())
    custom.create_cluster_custom_object(GROUP, VERSION, tenancy_api.PLURAL, policy)
    request.addfinalizer(lambda: custom.delete_cluster_custom_object(GROUP, VERSION, tenancy_api.PLURAL, namespace))
    # From now on the API server refuses spec edits that stay outside the policy, while
    # metadata edits (the operator's finalizer, labels) still go through. The admission
    # policy's parameters reach the API server through an informer: a moment after the create.
    def refused():
        try:
            api.patch("slipped-in", {"spec": {"serving": {"replicas": 2}}})
        except ApiException as e:
            return e
        return None

    err = wait_for("the policy's refusal", refused, timeout=30, interval=0.3)
    assert err.status == 403 and "spec.output.uri" in err.body, err.body
    api.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "slipped-in",
                                              {"metadata": {"labels": {"team": "a"}}})
    return obj


def test_the_operator_check_reads_the_policy_and_refuses_a_job_admitted_before_it(
        cluster, walkthrough, namespace, operator_kubeconfig, request):
    _admitted_before_its_policy(cluster, namespace, request)
    # What the operator reads, with the operator's own credentials (the chart's ClusterRole):
    # the namespace's labels and the TenantPolicies.
    from kubernetes import config

    kube = Kube(config.new_client_from_config(config_file=str(operator_kubeconfig)))
    labels, found = tenancy.read(kube, namespace)
    assert labels["kubetune.io/tenant"] == namespace
    assert namespace in {p["metadata"]["name"] for p in found}
    job = FineTuneJob.from_body(Api(cluster, namespace).get("slipped-in"))
    (violation,) = tenancy.violations(job, labels, found)
    assert (violation.policy, violation.field) == (namespace, "spec.output.uri")
    assert tenancy.refusal(job, labels, found) == violation.message
    assert "s3://team-b-artifacts/slipped-in/" in violation.message and "[s3://team-a-artifacts/]" in violation.message


def test_the_operator_refuses_a_job_admitted_before_its_policy(cluster, walkthrough, namespace, gpu_nodes,
                                                              start_operator, request):
    fleet(gpu_nodes)
    _admitted_before_its_policy(cluster, namespace, request)
    api = Api(cluster, namespace)
    start_operator(namespace)

    def refused():
        status = api.status("slipped-in")
        stalled = next((c for c in status.get("conditions") or [] if c["type"] == "Stalled"), {})
        return status if stalled.get("reason") == "PolicyViolation" else None

    # Refused on the operator's first pass (seconds); 30 s bounds what the marker above costs.
    status = wait_for("slipped-in refused for PolicyViolation", refused, timeout=30, interval=0.3)
    assert status["phase"] == "Failed"
    assert "spec.output.uri s3://team-b-artifacts/slipped-in/" in condition(status, "Stalled")["message"]
    # Refused before any work: nothing was created for it.
    assert all(names == [] for names in api.children("slipped-in").values()), api.children("slipped-in")

    # An edit that brings it within policy lets it go on.
    generation = api.patch("slipped-in", {"spec": {"output": {"uri": "s3://team-a-artifacts/slipped-in/"}}})["metadata"]["generation"]

    def recovered():
        status = api.status("slipped-in")
        if status.get("observedGeneration") != generation:
            return None  # the operator has not seen the edit yet
        assert status.get("phase") != "Failed", status
        return status

    wait_for("slipped-in going on after the edit", recovered, timeout=60, interval=0.3)
    api.wait_phase("slipped-in", "Succeeded", timeout=90)


# ---------------------------------------------------------------- a tenant's job in its own queue


def test_a_tenants_job_runs_through_its_own_queue(cluster, walkthrough, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, "team-a")
    # Only the guide's job: the other tests' jobs here must not take team-a's quota first.
    for other in api.custom.list_namespaced_custom_object(GROUP, VERSION, "team-a", PLURAL)["items"]:
        if other["metadata"]["name"] != "support-bot":
            api.delete(other["metadata"]["name"])
    # The guide's job, with what kwok needs to play its pods (their verdicts, a training that lasts).
    api.patch("support-bot", {"spec": {"podMetadata": {
        "validate": {"annotations": {KWOK_MESSAGE: message(VALIDATE_OK)}},
        "train": {"annotations": {KWOK_DURATION: "1h"}},
        "evaluate": {"annotations": {KWOK_MESSAGE: message(EVALUATE_OK)}},
    }}})
    start_operator("team-a")
    api.wait_phase("support-bot", "Training", timeout=90)
    train = api.child("support-bot", "train")
    from kubetune.devcluster.queues import Queues

    workload = Queues(cluster.api_client()).wait_workload("team-a", train, lambda w: is_true(w, "Admitted"), "admitted")
    # Admitted by team-a's own ClusterQueue, within its quota.
    assert workload["status"]["admission"]["clusterQueue"] == "team-a"
    (assignment,) = workload["status"]["admission"]["podSetAssignments"]
    assert assignment["resourceUsage"]["nvidia.com/gpu"] == "4"
