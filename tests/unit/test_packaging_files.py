"""Generated packaging files (chart CRD copy, ClusterRoles) match their sources;
the chart and kustomize base keep their production guarantees; examples are valid."""

from pathlib import Path

import pytest
import yaml

from kubetune.operator import children, rbac
from kubetune.operator.api import FineTuneJob
from kubetune.operator.packaging import ROOT, generated_files


@pytest.mark.parametrize("path", sorted(generated_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_generated_file_is_up_to_date(path):
    assert path.read_text() == generated_files()[path], f"{path} is stale: run python -m kubetune.operator.packaging"


def test_chart_crd_is_the_generated_crd():
    assert (ROOT / "charts/kubetune/crds/finetunejob.yaml").read_text() == (ROOT / "crds/finetunejob.yaml").read_text()


def test_kustomize_cluster_role_rules_are_the_python_rules():
    role = yaml.safe_load((ROOT / "manifests/base/clusterrole.yaml").read_text())
    assert role["rules"] == rbac.RULES


def _chart_template(name):
    return (ROOT / "charts/kubetune/templates" / name).read_text()


def test_chart_cluster_role_rules_are_the_python_rules():
    text = _chart_template("clusterrole.yaml")
    # Two branches without template expressions inside; each parses as YAML on its own.
    namespaced_mode, cluster_wide_mode = text.split("{{- if .Values.watchNamespaces }}\n")[1].split("{{- else }}\n")
    cluster_wide_mode = cluster_wide_mode.split("{{- end }}\n")[0]
    assert yaml.safe_load(cluster_wide_mode) == rbac.RULES
    assert yaml.safe_load(namespaced_mode) == rbac.cluster_scoped_rules()


def test_chart_role_rules_are_the_python_namespaced_rules():
    text = _chart_template("role.yaml")
    role_part = text.split("rules:\n", 1)[1].split("---\n", 1)[0]
    assert yaml.safe_load(role_part) == rbac.namespaced_rules()
    assert "{{- range .Values.watchNamespaces }}" in text and "kind: RoleBinding" in text


def _grants(rules):
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_namespaced_and_cluster_scoped_rules_partition_the_rules():
    cluster, namespaced = _grants(rbac.cluster_scoped_rules()), _grants(rbac.namespaced_rules())
    assert cluster and namespaced and not cluster & namespaced
    assert cluster | namespaced == _grants(rbac.RULES)
    assert {(g, r) for g, r, _ in cluster} == set(rbac.CLUSTER_SCOPED)
    # The operator's children are all namespaced.
    assert {(k.group, k.plural) for k in children.KINDS} <= {(g, r) for g, r, _ in namespaced}


def test_a_rule_mixing_scopes_across_groups_is_refused(monkeypatch):
    monkeypatch.setattr(rbac, "RULES", [{"apiGroups": ["", "apps"], "resources": ["namespaces"], "verbs": ["get"]}])
    with pytest.raises(ValueError, match="mixes scopes"):
        rbac.namespaced_rules()


def test_chart_operator_deployment_is_single_replica_recreate_and_restricted():
    text = _chart_template("deployment.yaml")
    assert "replicas: 1" in text
    assert "type: Recreate" in text
    for needle in ("runAsNonRoot: true", "allowPrivilegeEscalation: false", 'drop: ["ALL"]', "type: RuntimeDefault"):
        assert needle in text, needle


def test_kustomize_operator_matches_the_chart_guarantees():
    docs = list(yaml.safe_load_all((ROOT / "manifests/base/operator.yaml").read_text()))
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == rbac.CLUSTER_ROLE_NAME


@pytest.mark.parametrize("path", sorted((ROOT / "manifests/examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid_finetunejobs(path: Path):
    for doc in yaml.safe_load_all(path.read_text()):
        job = FineTuneJob.from_body(doc)
        assert job.kind == "FineTuneJob" and job.metadata.name


def test_every_operator_env_var_in_the_packaging_is_a_setting():
    import re

    from kubetune.operator.settings import ENV_PREFIX, OperatorSettings

    known = {ENV_PREFIX + f.upper() for f in OperatorSettings.__dataclass_fields__}
    for path in (ROOT / "charts/kubetune/templates/deployment.yaml", ROOT / "manifests/base/operator.yaml"):
        used = set(re.findall(r"name: (KUBETUNE_[A-Z_]+)", path.read_text()))
        assert used, path
        assert used <= known, f"{path}: unknown settings {sorted(used - known)}"
