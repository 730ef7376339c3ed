"""The Helm chart, rendered by Helm itself (`helm lint`, `helm template`), in
both modes: watching every namespace (one ClusterRole with every rule of
kubetune.operator.rbac.RULES) and watching only `watchNamespaces` (a Role and
RoleBinding in each of those namespaces with the namespaced rules, and a
ClusterRole with only the cluster-scoped ones). The install into a real
control plane is tests/operator/test_chart_install.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune.operator import children, rbac
from kubetune.operator.packaging import ROOT

CHART = ROOT / "charts" / "kubetune"
RELEASE, RELEASE_NAMESPACE = "kt", "kubetune-system"
FULLNAME = f"{RELEASE}-operator"
WATCHED = ["team-a", "team-b"]

Grant = tuple[str, str, str]


def grants(rules: list[dict]) -> set[Grant]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def values_file(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def render(helm, tmp_path: Path, values: dict) -> list[dict]:
    out = helm("template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
               "--values", str(values_file(tmp_path, values))).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def operator_args(docs: list[dict]) -> list[str]:
    (deployment,) = of_kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container["command"]


def test_helm_is_the_pinned_release_and_renders_for_the_harness_kubernetes(helm, tmp_path):
    from kubetune.devcluster import versions

    assert helm("version", "--template", "{{ .Version }}").stdout == versions.HELM
    # Without a cluster, Helm renders for its built-in Kubernetes version, stamped at build time.
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.0.1\n")
    (chart / "templates" / "v.yaml").write_text("# {{ .Capabilities.KubeVersion.Version }}\n")
    rendered = helm("template", "p", str(chart)).stdout
    major_minor = ".".join(versions.KUBERNETES.split(".")[:2])
    assert f"# {major_minor}.0" in rendered, rendered


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": WATCHED}], ids=["all-namespaces", "watch-namespaces"])
def test_helm_lint_strict_passes(helm, tmp_path, values):
    result = helm("lint", "--strict", str(CHART), "--values", str(values_file(tmp_path, values)))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, result.stdout


def test_all_namespaces_one_cluster_role_with_every_rule(helm, tmp_path):
    docs = render(helm, tmp_path, {})
    (role,) = of_kind(docs, "ClusterRole")
    assert role["metadata"]["name"] == FULLNAME and role["rules"] == rbac.RULES
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": FULLNAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NAMESPACE}]
    assert of_kind(docs, "Role") == [] and of_kind(docs, "RoleBinding") == []
    assert "--namespace" not in operator_args(docs)


def test_watch_namespaces_grants_roles_in_exactly_those_namespaces(helm, tmp_path):
    docs = render(helm, tmp_path, {"watchNamespaces": WATCHED})
    roles, bindings = of_kind(docs, "Role"), of_kind(docs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == WATCHED
    assert sorted(b["metadata"]["namespace"] for b in bindings) == WATCHED
    for role in roles:
        assert role["metadata"]["name"] == FULLNAME
        assert role["rules"] == rbac.namespaced_rules()
    for binding in bindings:
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": FULLNAME}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NAMESPACE}]

    # The ClusterRole keeps only what a Role cannot grant: cluster-scoped resources.
    (cluster_role,) = of_kind(docs, "ClusterRole")
    assert cluster_role["rules"] == rbac.cluster_scoped_rules()
    cluster_wide = grants(cluster_role["rules"])
    assert {(g, r.partition("/")[0]) for g, r, _ in cluster_wide} == set(rbac.CLUSTER_SCOPED)
    namespaced_kinds = {(k.group, k.plural) for k in children.KINDS} | {
        ("kubetune.io", "finetunejobs"), ("", "pods"), ("", "events"),
        ("kueue.x-k8s.io", "localqueues"), ("kueue.x-k8s.io", "workloads")}
    assert not {(g, r.partition("/")[0]) for g, r, _ in cluster_wide} & namespaced_kinds, cluster_role["rules"]
    # Scoped differently, the same permissions as the cluster-wide install: nothing lost, nothing added.
    assert cluster_wide | grants(roles[0]["rules"]) == grants(rbac.RULES)
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == FULLNAME

    # And the operator watches exactly those namespaces.
    args = operator_args(docs)
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == WATCHED


def test_the_rendered_rbac_objects_are_the_generated_ones(helm, tmp_path):
    """What Helm renders is what the generator produces (no template drift between the two)."""
    docs = render(helm, tmp_path, {"watchNamespaces": ["only"]})
    (role,) = of_kind(docs, "Role")
    generated = rbac.role("only", name=FULLNAME)
    assert role["rules"] == generated["rules"]
    assert role["metadata"]["labels"]["app.kubernetes.io/name"] == generated["metadata"]["labels"]["app.kubernetes.io/name"]
    # Every object of the release carries the chart's labels.
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, json.dumps(doc["metadata"])


# ---------------------------------------------------------------- the documented install commands


DOCUMENTS = [ROOT / "docs" / "multi-tenancy.md", CHART / "README.md"]


def documented_installs() -> list[tuple[str, str]]:
    return [(path.relative_to(ROOT).as_posix(), line.strip())
            for path in DOCUMENTS for line in path.read_text().splitlines() if line.strip().startswith("helm install ")]


def test_the_documents_show_both_modes():
    commands = [c for _, c in documented_installs()]
    assert any("watchNamespaces" in c for c in commands) and any("watchNamespaces" not in c for c in commands), commands


@pytest.mark.parametrize("source, command", documented_installs(),
                         ids=[f"{source}-{i}" for i, (source, _) in enumerate(documented_installs())])
def test_a_documented_helm_install_renders_what_the_documents_say(helm, source, command):
    """The command as written, with `template` for `install` (Helm's own dry run, no cluster)."""
    import shlex

    argv = shlex.split(command)
    assert argv[:2] == ["helm", "install"], command
    out = helm("template", *argv[2:], "--create-namespace").stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    watched = next((a.split("=", 1)[1].strip("{}").split(",") for a in argv if a.startswith("watchNamespaces=")), [])
    roles = of_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(watched)
    assert sorted(b["metadata"]["namespace"] for b in of_kind(docs, "RoleBinding")) == sorted(watched)
    (cluster_role,) = of_kind(docs, "ClusterRole")
    assert cluster_role["rules"] == (rbac.cluster_scoped_rules() if watched else rbac.RULES)
    args = operator_args(docs)
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == watched


def test_the_argo_cd_health_check_ships_with_the_chart_when_asked(helm, tmp_path):
    key = "resource.customizations.health.kubetune.io_FineTuneJob"
    assert not [d for d in of_kind(render(helm, tmp_path, {}), "ConfigMap") if key in (d.get("data") or {})]
    (cm,) = [d for d in of_kind(render(helm, tmp_path, {"argocd": {"healthCheck": True}}), "ConfigMap")
             if key in (d.get("data") or {})]
    assert cm["metadata"]["name"] == f"{RELEASE}-argocd-health"
    # The very script the Lua tests run (tests/gitops), byte for byte.
    assert cm["data"][key] == (CHART / "files" / "argocd-health.lua").read_text()
