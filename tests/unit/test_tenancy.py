"""Tenant policy without a cluster: the TenantPolicy model and CRD, the operator's
pure check (kubetune.operator.tenancy), the generated admission policy, and the
FineTuneJob API offering no reference into another namespace. The CEL side is
proven on the control plane (tests/operator/test_tenancy.py), against the same
limits and in the same words."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from pydantic import ValidationError

from kubetune.operator import rbac, tenancy
from kubetune.operator.api import FineTuneJob
from kubetune.operator.api import tenancy as api
from kubetune.operator.crdgen import TENANT_POLICY_CRD_PATH, build_crd, build_tenant_policy_crd
from kubetune.operator.packaging import ROOT, chart_tenancy, kustomize_tenancy

EXAMPLES = ROOT / "manifests" / "examples" / "tenancy"
LABELS = {"kubetune.io/tenant": "team-a", "kubernetes.io/metadata.name": "team-a"}


def policies() -> list[dict]:
    return list(yaml.safe_load_all((EXAMPLES / "policies.yaml").read_text()))


def team_a_job(**spec) -> dict:
    doc = yaml.safe_load((EXAMPLES / "job-team-a.yaml").read_text())
    doc["spec"] = _merge(doc["spec"], spec)
    return doc


def _merge(doc: dict, changes: dict) -> dict:
    out = copy.deepcopy(doc)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def fields(obj: dict, labels=LABELS, found=None) -> list[str]:
    return [v.field for v in tenancy.violations(FineTuneJob.from_body(obj), labels, policies() if found is None else found)]


# ---------------------------------------------------------------- selectors


@pytest.mark.parametrize("selector, labels, selected", [
    ({"matchLabels": {"t": "a"}}, {"t": "a", "x": "y"}, True),
    ({"matchLabels": {"t": "a"}}, {"t": "b"}, False),
    ({"matchLabels": {"t": "a"}}, {}, False),
    ({"matchExpressions": [{"key": "t", "operator": "In", "values": ["a", "b"]}]}, {"t": "b"}, True),
    ({"matchExpressions": [{"key": "t", "operator": "In", "values": ["a"]}]}, {}, False),
    ({"matchExpressions": [{"key": "t", "operator": "NotIn", "values": ["a"]}]}, {}, True),
    ({"matchExpressions": [{"key": "t", "operator": "NotIn", "values": ["a"]}]}, {"t": "a"}, False),
    ({"matchExpressions": [{"key": "t", "operator": "Exists"}]}, {"t": ""}, True),
    ({"matchExpressions": [{"key": "t", "operator": "Exists"}]}, {}, False),
    ({"matchExpressions": [{"key": "t", "operator": "DoesNotExist"}]}, {}, True),
    ({"matchExpressions": [{"key": "t", "operator": "DoesNotExist"}]}, {"t": "a"}, False),
    # Every requirement must hold.
    ({"matchLabels": {"t": "a"}, "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]},
     {"t": "a", "env": "dev"}, False),
    # An operator this code does not know selects nothing rather than everything.
    ({"matchExpressions": [{"key": "t", "operator": "Gt", "values": ["1"]}]}, {"t": "2"}, False),
])
def test_selector_semantics_are_kubernetes(selector, labels, selected):
    assert tenancy.selects(selector, labels) is selected


# ---------------------------------------------------------------- the operator's check


def test_a_job_within_policy_has_no_violation():
    assert fields(team_a_job()) == []
    assert tenancy.refusal(FineTuneJob.from_body(team_a_job()), LABELS, policies()) is None


@pytest.mark.parametrize("changes, field", [
    ({"dataset": {"uri": "s3://team-b-data/x.jsonl"}}, "spec.dataset.uri"),
    ({"dataset": {"uri": "s3://team-a-data/./x.jsonl"}}, "spec.dataset.uri"),
    ({"dataset": {"uri": "s3://team-a-data/a/.."}}, "spec.dataset.uri"),
    ({"output": {"uri": "s3://team-a-artifacts-old/x/"}}, "spec.output.uri"),
    ({"output": {"uri": "s3://team-a-artifacts/x/", "kernelCacheUri": "s3://team-b-artifacts/kernels/"}},
     "spec.output.kernelCacheUri"),
    ({"output": {"uri": "s3://team-a-artifacts/x/", "kernelCacheUri": "s3://team-a-artifacts/../b/"}},
     "spec.output.kernelCacheUri"),
    ({"baseModel": {"uri": "s3://shared-models/mistral-7b/"}}, "spec.baseModel.uri"),
    ({"resources": {"nodes": 3}}, "spec.resources.nodes * spec.resources.gpusPerNode"),
    ({"serving": {"gpus": 8, "replicas": 2}}, "spec.serving.gpus * spec.serving.replicas"),
    ({"resources": {"gpuType": None}}, "spec.resources.gpuType"),
    ({"serving": {"gpuType": "NVIDIA-L4"}}, "spec.serving.gpuType"),
    ({"image": "registry.example.com/kubetune-evil:1"}, "spec.image"),
    ({"serving": {"replicas": 3}}, "spec.serving.replicas"),
    ({"storage": {"credentialsSecretRef": None, "serviceAccountName": "irsa"}}, "spec.storage.serviceAccountName"),
    ({"resources": {"priorityClassName": "high"}}, "spec.resources.priorityClassName"),
    ({"resources": {"queueName": None}}, "spec.resources.queueName"),
])
def test_each_limit_names_its_field(changes, field):
    assert fields(team_a_job(**changes)) == [field]


def test_a_kueue_priority_must_be_allowed():
    assert fields(team_a_job(resources={"workloadPriorityClassName": "urgent"})) == ["spec.resources.workloadPriorityClassName"]
    allowed = policies()
    allowed[0]["spec"]["workloadPriorityClassNames"] = ["urgent"]
    assert fields(team_a_job(resources={"workloadPriorityClassName": "urgent"}), found=allowed) == []


def test_serving_limits_do_not_apply_when_serving_is_off():
    assert fields(team_a_job(serving={"enabled": False, "replicas": 9, "gpus": 8, "gpuType": "NVIDIA-L4"})) == []


def test_entries_ending_in_a_separator_are_prefixes():
    found = policies()
    found[0]["spec"]["baseModels"] = ["s3://shared-models/llama/"]
    assert fields(team_a_job(baseModel={"uri": "s3://shared-models/llama/3.1-8b/"}), found=found) == []
    assert fields(team_a_job(baseModel={"uri": "s3://shared-models/llama-3/"}), found=found) == ["spec.baseModel.uri"]
    for image in ("registry.example.com/kubetune:1.2.3", "registry.example.com/kubetune:1.2.3@sha256:" + "a" * 64):
        assert fields(team_a_job(image=image)) == []
    found = policies()
    found[0]["spec"]["images"] = ["registry.example.com/kubetune"]  # no separator: exactly this reference
    assert fields(team_a_job(image="registry.example.com/kubetune"), found=found) == []
    assert fields(team_a_job(image="registry.example.com/kubetune:1"), found=found) == ["spec.image"]


def test_unset_limits():
    minimal = {"metadata": {"name": "minimal"}, "spec": {
        "namespaceSelector": {"matchLabels": {"kubetune.io/tenant": "team-a"}},
        "uriPrefixes": {"datasets": ["s3://team-a-data/"], "models": ["s3://shared-models/"],
                        "outputs": ["s3://team-a-artifacts/"]}}}
    # No limit on GPUs, types, base models, replicas or queues...
    assert fields(team_a_job(resources={"nodes": 64, "gpusPerNode": 8, "gpuType": None, "queueName": None},
                             serving={"replicas": 64, "gpuType": None}), found=[minimal]) == []
    # ...but no custom image, ServiceAccount or PriorityClass either: those are opt-in.
    assert fields(team_a_job(image="registry.example.com/kubetune:1"), found=[minimal]) == ["spec.image"]
    assert fields(team_a_job(storage={"credentialsSecretRef": None, "serviceAccountName": "irsa"}),
                  found=[minimal]) == ["spec.storage.serviceAccountName"]
    # And an empty prefix list allows nothing.
    minimal["spec"]["uriPrefixes"]["outputs"] = []
    assert fields(team_a_job(), found=[minimal]) == ["spec.output.uri"]


def test_only_policies_selecting_the_namespace_apply_and_all_of_them_do():
    job = team_a_job(serving={"replicas": 2})
    assert fields(job, labels={"kubetune.io/tenant": "team-c"}) == []
    assert fields(job, labels={}) == []
    stricter = copy.deepcopy(policies()[1])  # team-b's limits...
    stricter["metadata"]["name"] = "team-a-extra"
    stricter["spec"]["namespaceSelector"] = {"matchLabels": {"kubetune.io/tenant": "team-a"}}  # ...on team-a too
    found = tenancy.violations(FineTuneJob.from_body(job), LABELS, policies() + [stricter])
    assert {v.policy for v in found} == {"team-a-extra"}
    assert "spec.dataset.uri" in [v.field for v in found] and "spec.serving.replicas" in [v.field for v in found]


def test_a_policy_the_operator_cannot_read_refuses_in_its_namespaces_only():
    broken = {"metadata": {"name": "broken"},
              "spec": {"namespaceSelector": {"matchLabels": {"kubetune.io/tenant": "team-a"}}, "maxGpusPerJob": "many"}}
    (violation,) = tenancy.violations(FineTuneJob.from_body(team_a_job()), LABELS, [broken])
    assert violation.policy == "broken" and "TenantPolicy broken cannot be read" in violation.message
    assert tenancy.violations(FineTuneJob.from_body(team_a_job()), {"kubetune.io/tenant": "team-b"}, [broken]) == []


def test_the_refusal_message_names_field_value_policy_and_what_is_allowed():
    message = tenancy.refusal(FineTuneJob.from_body(team_a_job(output={"uri": "s3://team-b-artifacts/x/"})), LABELS, policies())
    assert message == ("spec.output.uri s3://team-b-artifacts/x/ is outside the output prefixes TenantPolicy team-a "
                       "allows (no . or .. segments): [s3://team-a-artifacts/]")


# ---------------------------------------------------------------- the TenantPolicy API


def _policy_spec(**changes) -> dict:
    """team-a's policy spec with whole sections replaced."""
    return {**policies()[0]["spec"], **changes}


@pytest.mark.parametrize("changes, text", [
    # Would also allow s3://team-a-data-old/...
    ({"uriPrefixes": {"datasets": ["s3://team-a-data"], "models": [], "outputs": []}}, "ending with '/'"),
    ({"uriPrefixes": {"datasets": [], "models": [], "outputs": ["s3://team-a/../team-b/"]}}, "no '.' or '..' segment"),
    ({"uriPrefixes": {"datasets": [], "models": [], "outputs": ["s3://team-a/./"]}}, "no '.' or '..' segment"),
    ({"uriPrefixes": {"datasets": [], "models": [], "outputs": ["gs://team-a/"]}}, "ending with '/'"),
    ({"uriPrefixes": {"datasets": [], "models": []}}, "outputs"),
    ({"namespaceSelector": {"matchLabels": {}}}, "must not be empty"),
    ({"namespaceSelector": {"matchExpressions": [{"key": "t", "operator": "In"}]}}, "need values"),
    ({"namespaceSelector": {"matchExpressions": [{"key": "t", "operator": "Exists", "values": ["a"]}]}}, "take none"),
    ({"maxGpusPerJob": -1}, "greater than or equal"),
])
def test_a_bad_policy_is_refused(changes, text):
    with pytest.raises(ValidationError, match=re.escape(text)):
        api.TenantPolicySpec.model_validate(_policy_spec(**changes))


def test_the_examples_are_valid_policies():
    for doc in policies():
        assert api.TenantPolicy.model_validate(doc).spec.uri_prefixes.datasets


def _walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def test_the_tenant_policy_crd_is_cluster_scoped_described_and_checked_in():
    crd = build_tenant_policy_crd()
    assert crd["metadata"]["name"] == f"{api.PLURAL}.kubetune.io" and crd["spec"]["scope"] == "Cluster"
    (version,) = crd["spec"]["versions"]
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Datasets", "Outputs", "Max GPUs", "GPU types"}
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for path, node in _walk(spec):
        if path.endswith(".properties") and isinstance(node, dict):
            for name, prop in node.items():
                assert prop.get("description"), f"{path}.{name} has no description (kubectl explain)"
    assert set(spec["required"]) == {"namespaceSelector", "uriPrefixes"}
    assert yaml.safe_load(TENANT_POLICY_CRD_PATH.read_text()) == crd


# ---------------------------------------------------------------- no reference into another namespace


def test_a_finetunejob_cannot_name_another_namespace():
    """By construction: no `namespace` field anywhere in the spec, nothing that keeps
    unknown fields, and every reference is a bare name (and a key)."""
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    refs = []
    for path, node in _walk(spec):
        if not isinstance(node, dict):
            continue
        assert not node.get("x-kubernetes-preserve-unknown-fields"), path
        for name, prop in (node.get("properties") or {}).items():
            assert "namespace" not in name.lower(), f"{path}.{name}"
            if name.endswith("Ref"):
                refs.append(name)
                assert set(prop["properties"]) <= {"name", "key"}, f"{path}.{name}"
    assert sorted(refs) == ["apiKeySecretRef", "credentialsSecretRef"]


# ---------------------------------------------------------------- the admission policy and its packaging


def test_the_admission_policy_has_one_validation_per_limit_in_order():
    policy = tenancy.admission_policy()
    validations = policy["spec"]["validations"]
    assert len(validations) == len(tenancy.LIMITS)
    for limit, validation in zip(tenancy.LIMITS, validations):
        assert validation["expression"] == f"!variables.selected || ({limit.cel})"
        assert validation["messageExpression"].startswith(f"'{limit.field} ")
        assert validation["reason"] == "Forbidden"
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert policy["spec"]["paramKind"] == {"apiVersion": api.API_VERSION, "kind": api.KIND}
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["finetunejobs"] and rule["operations"] == ["CREATE", "UPDATE"]
    binding = tenancy.admission_binding()
    assert binding["spec"]["paramRef"] == {"selector": {}, "parameterNotFoundAction": "Allow"}
    assert binding["spec"]["validationActions"] == ["Deny"]


def test_the_chart_template_is_the_kustomize_copy_behind_a_switch():
    text = chart_tenancy()
    assert "{{- if .Values.tenancy.enabled }}" in text and text.rstrip().endswith("{{- end }}")
    rendered = (text.replace("{{ .Release.Name }}-tenancy", tenancy.POLICY_NAME)
                .replace("{{ toJson .Values.tenancy.validationActions }}", '["Deny"]')
                .replace('{{- include "kubetune.labels" . | nindent 4 }}', "app.kubernetes.io/name: kubetune"))
    rendered = "\n".join(line for line in rendered.splitlines() if not line.startswith("{{-"))
    assert list(yaml.safe_load_all(rendered)) == list(yaml.safe_load_all(kustomize_tenancy()))
    values = yaml.safe_load((ROOT / "charts/kubetune/values.yaml").read_text())
    assert values["tenancy"] == {"enabled": True, "validationActions": ["Deny"]}


def test_the_operator_may_list_tenant_policies_and_nothing_more():
    (rule,) = [r for r in rbac.RULES if api.PLURAL in r["resources"]]
    assert rule == {"apiGroups": ["kubetune.io"], "resources": [api.PLURAL], "verbs": ["list"]}
    # It reads the namespace's labels.
    assert any("namespaces" in r["resources"] and "get" in r["verbs"] for r in rbac.RULES)
