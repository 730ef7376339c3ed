"""The chart, installed by Helm into the real control plane (Kueue running) and
told to watch one namespace: its CRDs, RBAC and tenancy policy land; the
operator's ServiceAccount may act in the watched namespace and not in another
(`kubectl auth can-i --as=system:serviceaccount:...`, the harness's kubectl of
the server's version); the split between the ClusterRole and the Roles
(kubetune.operator.rbac.CLUSTER_SCOPED) agrees with the API server's own
discovery; and the operator, run with a token of the chart's ServiceAccount,
takes a job in the watched namespace to Serving without one refused request."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
import yaml

from kubetune.devcluster.cluster import RESTRICTED_LABELS, wait_for
from kubetune.operator import rbac
from kubetune.operator.packaging import ROOT

from .ftj import GROUP, PLURAL, VERSION, Api, body, fleet

CHART = ROOT / "charts" / "kubetune"

Grant = tuple[str, str, str]


def grants(rules: list[dict]) -> set[Grant]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def kube_name(group: str, resource: str) -> str:
    """`jobs.batch`, `finetunejobs.kubetune.io/status`, `pods`: how kubectl names a resource."""
    plural, slash, sub = resource.partition("/")
    return (f"{plural}.{group}" if group else plural) + slash + sub


_LIST_LINE = re.compile(r"^(\S+)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$")


def parse_can_i_list(output: str) -> set[tuple[str, str]]:
    """(kubectl resource name, verb) from `kubectl auth can-i --list` (resource rules only)."""
    found: set[tuple[str, str]] = set()
    for line in output.splitlines()[1:]:
        match = _LIST_LINE.match(line.strip())
        if match and not match.group(1).startswith("["):
            found |= {(match.group(1), verb) for verb in match.group(4).split()}
    return found


@pytest.fixture
def installed(cluster, kueue, helm, tmp_path):
    """The chart installed with watchNamespaces = [watched]; uninstalled afterwards."""
    release = f"kt-{uuid.uuid4().hex[:6]}"
    release_ns = cluster.create_namespace("kubetune-system", labels=RESTRICTED_LABELS)
    watched = cluster.create_namespace("watched", labels=RESTRICTED_LABELS)
    unwatched = cluster.create_namespace("unwatched", labels=RESTRICTED_LABELS)
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"watchNamespaces": [watched],
                                      "image": {"repository": "registry.test/kubetune", "tag": "test"}}))
    try:
        notes = helm("install", release, str(CHART), "--namespace", release_ns, "--values", str(values),
                     kubeconfig=cluster.kubeconfig).stdout
        yield {"notes": notes, "release": release, "release_ns": release_ns, "watched": watched, "unwatched": unwatched,
               "account": f"system:serviceaccount:{release_ns}:{release}-operator"}
    finally:
        helm("uninstall", release, "--namespace", release_ns, kubeconfig=cluster.kubeconfig, check=False)
        for ns in (watched, unwatched, release_ns):
            cluster.delete_namespace(ns)


def can_i(cluster, account: str, *args: str) -> bool:
    result = cluster.kubectl("auth", "can-i", *args, f"--as={account}", check=False)
    assert result.stdout.strip() in ("yes", "no"), (args, result.stdout, result.stderr)
    return result.stdout.strip() == "yes"


def test_a_namespaced_install_grants_the_operator_exactly_its_watched_namespace(cluster, installed):
    account, watched, unwatched = installed["account"], installed["watched"], installed["unwatched"]
    release, release_ns = installed["release"], installed["release_ns"]

    # What the chart installs besides RBAC: the CRDs (from crds/; kept if a previous install
    # made them), the tenancy policy and its binding, the operator's Deployment, whose pod
    # the API server admits into a namespace enforcing Pod Security `restricted`.
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/finetunejobs.kubetune.io", "crd/tenantpolicies.kubetune.io")
    cluster.kubectl("get", f"validatingadmissionpolicy/{release}-tenancy", f"validatingadmissionpolicybinding/{release}-tenancy")
    roles = yaml.safe_load(cluster.kubectl("get", "roles,rolebindings", "--all-namespaces", "-l",
                                           f"app.kubernetes.io/instance={release}", "-o", "yaml").stdout)["items"]
    assert sorted((r["kind"], r["metadata"]["namespace"]) for r in roles) == [("Role", watched), ("RoleBinding", watched)]
    wait_for("the operator's pod created in the restricted namespace", lambda: cluster.kubectl(
        "get", "pods", "-n", release_ns, "-l", f"app.kubernetes.io/instance={release}", "-o", "name").stdout.strip(),
        timeout=60, interval=0.5)

    assert f"It watches only {watched}, with a Role in each" in installed["notes"], installed["notes"]

    # A Job in the watched namespace yes, in another no.
    assert can_i(cluster, account, "create", "jobs.batch", "-n", watched)
    assert not can_i(cluster, account, "create", "jobs.batch", "-n", unwatched)
    assert can_i(cluster, account, "patch", "finetunejobs.kubetune.io", "--subresource=status", "-n", watched)
    assert not can_i(cluster, account, "patch", "finetunejobs.kubetune.io", "--subresource=status", "-n", unwatched)
    # No namespaced kind cluster-wide; Secrets nowhere.
    assert not can_i(cluster, account, "list", "finetunejobs.kubetune.io", "--all-namespaces")
    assert not can_i(cluster, account, "get", "secrets", "-n", watched)
    # The cluster-scoped reads stay, and only reads.
    assert can_i(cluster, account, "list", "tenantpolicies.kubetune.io")
    assert can_i(cluster, account, "watch", "namespaces")
    assert not can_i(cluster, account, "create", "tenantpolicies.kubetune.io")

    # Every granted verb, rule by rule, from one `--list` per namespace.
    def listed(namespace: str) -> set[tuple[str, str]]:
        return parse_can_i_list(cluster.kubectl("auth", "can-i", "--list", "-n", namespace, f"--as={account}").stdout)

    in_watched, in_unwatched = listed(watched), listed(unwatched)
    namespaced = {(kube_name(g, r), v) for g, r, v in grants(rbac.namespaced_rules())}
    cluster_scoped = {(kube_name(g, r), v) for g, r, v in grants(rbac.cluster_scoped_rules())}
    assert namespaced <= in_watched, sorted(namespaced - in_watched)
    assert not namespaced & in_unwatched, sorted(namespaced & in_unwatched)
    assert cluster_scoped <= in_watched and cluster_scoped <= in_unwatched
    # Nothing else of ours in the other namespace: what is left is what every authenticated user has.
    assert {r for r, _ in in_unwatched} & {r for r, _ in namespaced} == set()


def test_the_cluster_scoped_rules_are_the_cluster_scoped_resources_by_discovery(cluster, installed, gateway_api):
    """rbac.CLUSTER_SCOPED against the API server (Kueue's, the Gateway API's and kubetune's CRDs installed:
    every kind a rule names is served)."""
    def served(namespaced: bool) -> set[tuple[str, str]]:
        names = cluster.kubectl("api-resources", f"--namespaced={str(namespaced).lower()}", "-o", "name").stdout.split()
        return {(n.partition(".")[2], n.partition(".")[0]) for n in names}

    namespaced, cluster_wide = served(True), served(False)
    for group, resource, _ in grants(rbac.RULES):
        kind = (group, resource.partition("/")[0])
        assert kind in namespaced | cluster_wide, f"{kind} is not served"
        assert (kind in rbac.CLUSTER_SCOPED) == (kind in cluster_wide), kind


def test_the_operator_runs_a_job_under_the_charts_namespaced_rbac(cluster, installed, gpu_nodes, start_operator, tmp_path):
    from kubernetes import client

    watched, unwatched, release_ns = installed["watched"], installed["unwatched"], installed["release_ns"]
    account = installed["account"].rsplit(":", 1)[1]
    token = client.CoreV1Api(cluster.api_client()).create_namespaced_service_account_token(
        account, release_ns, {"spec": {"expirationSeconds": 3600}}).status.token
    kubeconfig = tmp_path / "chart-operator.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": cluster.server, "certificate-authority": str(cluster.ca_cert)}}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "chart", "context": {"cluster": "test", "user": account}}],
        "current-context": "chart",
    }))
    fleet(gpu_nodes)
    op = start_operator(watched, kubeconfig=kubeconfig)
    Api(cluster, unwatched).create(body("elsewhere"))
    api = Api(cluster, watched)
    api.create(body("charted"))
    # The whole life to serving: validate, train, merge, evaluate, serve (every child kind applied).
    api.wait_phase("charted", "Serving", timeout=180)
    assert not Api(cluster, unwatched).status("elsewhere"), "the operator acted outside its namespace"
    assert Api(cluster, unwatched).jobs("elsewhere") == []
    log = op.log()
    # Each line's leading timestamp goes first: its milliseconds can read 403.
    messages = "\n".join(re.sub(r"^\[[^\]]*\]", "", line) for line in log.splitlines())
    assert not re.search(r"\b403\b|[Ff]orbidden", messages), log[-4000:]
