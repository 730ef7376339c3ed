"""The harness's pure parts and its build cache, without starting a control plane."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from kubetune.devcluster import build, commandlines, fakenodes, gomodules, paths, versions
from kubetune.devcluster.layout import Layout, Ports

# An excerpt in the shape of k8s.io/kubernetes' own go.mod.
KUBERNETES_GOMOD = """module k8s.io/kubernetes

go 1.26.0

require (
\tk8s.io/api v0.0.0
\tk8s.io/client-go v0.0.0
\tgithub.com/spf13/cobra v1.10.2
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go // a comment
\tk8s.io/sample-cli-plugin => ./staging/src/k8s.io/sample-cli-plugin
)
"""

ETCD_GOMOD = """module go.etcd.io/etcd/server/v3

go 1.26.0

replace (
\tgo.etcd.io/etcd/api/v3 => ../api
\tgo.etcd.io/etcd/client/v3 => ../client/v3
)

replace go.etcd.io/etcd => ./FORBIDDEN_DEPENDENCY
"""


def _replace_block(gomod: str) -> dict[str, str]:
    block = gomod.split("replace (", 1)[1].split(")", 1)[0]
    pairs = (line.strip().split(" => ") for line in block.strip().splitlines())
    return {left: right for left, right in pairs}


def test_staging_version_maps_v1_to_v0():
    assert versions.staging_version("v1.36.3") == "v0.36.3"
    with pytest.raises(ValueError, match="v1.X.Y"):
        versions.staging_version("1.36.3")


def test_kubernetes_wrapper_replaces_every_staging_module_with_its_published_twin():
    gomod = gomodules.kubernetes_wrapper("v1.36.3", KUBERNETES_GOMOD, ("kube-apiserver",), frozenset({"k8s.io/sample-cli-plugin"}))
    assert "\tk8s.io/kubernetes v1.36.3\n" in gomod
    assert "go 1.26.0" in gomod
    assert _replace_block(gomod) == {
        "k8s.io/api": "k8s.io/api v0.36.3",
        "k8s.io/client-go": "k8s.io/client-go v0.36.3",
        "k8s.io/sample-cli-plugin": "./stub/k8s.io_sample-cli-plugin",
    }
    assert "\tk8s.io/kubernetes/cmd/kube-apiserver\n" in gomod.split("tool (", 1)[1]


def test_kubernetes_wrapper_refuses_a_gomod_without_staging_replaces():
    with pytest.raises(ValueError, match="no staging replaces"):
        gomodules.kubernetes_wrapper("v1.36.3", "module k8s.io/kubernetes\n\ngo 1.26.0\n", ("kubectl",))


def test_etcd_wrapper_pins_siblings_and_skips_forbidden_markers():
    gomod = gomodules.etcd_wrapper("v3.6.16", ETCD_GOMOD)
    assert _replace_block(gomod) == {
        "go.etcd.io/etcd/api/v3": "go.etcd.io/etcd/api/v3 v3.6.16",
        "go.etcd.io/etcd/client/v3": "go.etcd.io/etcd/client/v3 v3.6.16",
    }
    assert "FORBIDDEN" not in gomod


def test_cache_root_prefers_kubetune_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("KUBETUNE_CACHE", raising=False)
    assert paths.bin_dir() == tmp_path / "xdg" / "kubetune" / "bin"
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "explicit"))
    assert paths.bin_dir() == tmp_path / "explicit" / "bin"


def test_cached_binaries_are_reused_without_go(monkeypatch, tmp_path):
    """A second run finds binary + stamp and never calls Go (here Go is not even on PATH)."""
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("KUBETUNE_GO", raising=False)
    for target in build.targets():
        binary = build.binary_path(target)
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_text("#!/bin/sh\n")
        binary.with_name(binary.name + ".stamp").write_text(json.dumps(build._stamp(target)))
    found = build.ensure_built(log=lambda m: pytest.fail(f"unexpected build: {m}"))
    assert found["kube-apiserver"] == tmp_path / "bin" / f"kube-apiserver-{versions.KUBERNETES}"
    assert set(found) == {"etcd", "kwok", *versions.KUBERNETES_COMMANDS}


def test_a_stamp_for_another_version_means_rebuild(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path))
    target = build.targets()[0]
    binary = build.binary_path(target)
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.with_name(binary.name + ".stamp").write_text(json.dumps({**build._stamp(target), "version": "v0.0.1"}))
    assert not build.is_built(target)


def test_missing_go_is_an_error_that_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("KUBETUNE_GO", raising=False)
    with pytest.raises(build.GoMissingError, match=r"Install Go >= 1\.26") as error:
        build.ensure_built(log=lambda m: None)
    assert str(tmp_path / "bin") in str(error.value)


def test_cluster_fixture_fails_not_skips_without_go(tmp_path):
    """Run a tiny suite with the real conftest, no Go and an empty cache: the test must error."""
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(Path(__file__).parents[1] / "conftest.py", suite / "conftest.py")
    (suite / "test_needs_cluster.py").write_text("def test_uses_cluster(cluster):\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "KUBETUNE_GO"}
    env.update(PATH="", KUBETUNE_CACHE=str(tmp_path / "empty-cache"))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(suite)],
        cwd=suite, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout and "skipped" not in result.stdout, result.stdout
    assert "no `go` command was found" in result.stdout and "Install Go" in result.stdout, result.stdout


def test_kwok_config_has_exclusive_complete_and_fail_stages():
    documents = list(yaml.safe_load_all(resources.files("kubetune.devcluster").joinpath("kwok.yaml").read_text()))
    assert documents[0]["kind"] == "KwokConfiguration"
    stages = {d["metadata"]["name"]: d["spec"] for d in documents[1:]}
    assert {"node-initialize", "node-heartbeat", "pod-ready", "pod-complete", "pod-fail", "pod-delete"} <= set(stages)

    def fail_label_rule(stage):
        (rule,) = [r for r in stage["selector"]["matchExpressions"] if "kwok.kubetune.io/fail" in r["key"]]
        return rule["operator"], rule["values"]

    # One expression, two exclusive answers: "fail" (label true, or rank-N on completion index N) or "pass".
    complete_key = [r["key"] for r in stages["pod-complete"]["selector"]["matchExpressions"] if "kwok.kubetune.io/fail" in r["key"]]
    fail_key = [r["key"] for r in stages["pod-fail"]["selector"]["matchExpressions"] if "kwok.kubetune.io/fail" in r["key"]]
    assert complete_key == fail_key and "job-completion-index" in fail_key[0]
    assert fail_label_rule(stages["pod-complete"]) == ("In", ["pass"])
    assert fail_label_rule(stages["pod-fail"]) == ("In", ["fail"])
    for name in ("pod-complete", "pod-fail"):
        assert "kwok.kubetune.io/run-duration" in stages[name]["delay"]["durationFrom"]["expressionFrom"]
        assert "kwok.kubetune.io/termination-message" in stages[name]["next"]["statusTemplate"]
    assert "kwok.kubetune.io/fail-after" in stages["pod-fail"]["delay"]["durationFrom"]["expressionFrom"]


def test_component_command_lines_enable_real_auth_and_controllers(tmp_path):
    lay = Layout(tmp_path, Ports(1, 2, 3, 4, 5, 6))
    apiserver = commandlines.kube_apiserver(tmp_path / "kube-apiserver", lay)
    assert "--authorization-mode=Node,RBAC" in apiserver
    assert f"--client-ca-file={lay.pki.ca_cert}" in apiserver
    assert not any(flag.startswith("--disable-admission-plugins") for flag in apiserver)
    assert "--bind-address=127.0.0.1" in apiserver and "--secure-port=3" in apiserver
    kcm = commandlines.kube_controller_manager(tmp_path / "kcm", lay)
    assert {"--controllers=*", "--use-service-account-credentials=true", f"--root-ca-file={lay.pki.ca_cert}"} <= set(kcm)
    kwok = commandlines.kwok(tmp_path / "kwok", lay)
    assert "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake" in kwok
    assert "--manage-all-nodes=false" in kwok


def test_fake_gpu_node_manifest():
    node = fakenodes.gpu_node("n1", gpus=4)
    assert node["metadata"]["annotations"] == {"kwok.x-k8s.io/node": "fake"}
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert node["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    with pytest.raises(ValueError, match="gpus must be >= 0"):
        fakenodes.gpu_node("n2", gpus=-1)


def test_fake_cpu_node_is_untainted_and_has_no_gpus():
    node = fakenodes.cpu_node("c1")
    assert node["metadata"]["annotations"] == {"kwok.x-k8s.io/node": "fake"}
    assert node["spec"]["taints"] == []
    assert fakenodes.GPU_RESOURCE not in node["status"]["allocatable"]
    assert node["metadata"]["labels"]["kubetune.io/node-pool"] == "cpu"
    assert fakenodes.gpu_node("g1")["metadata"]["labels"]["kubetune.io/node-pool"] == "gpu"


# ----- Kueue ---------------------------------------------------------------------------------

KUEUE_GOMOD = "module sigs.k8s.io/kueue\n\ngo 1.25.0\n\nrequire (\n\tk8s.io/api v0.35.3\n)\n"


def test_kueue_wrapper_is_a_plain_requirement_of_the_pinned_release():
    gomod = gomodules.kueue_wrapper(versions.KUEUE, KUEUE_GOMOD)
    assert f"\tsigs.k8s.io/kueue {versions.KUEUE}\n" in gomod
    assert "go 1.25.0" in gomod and "replace" not in gomod
    assert "\tsigs.k8s.io/kueue/cmd/kueue\n" in gomod.split("tool (", 1)[1]
    with pytest.raises(ValueError, match="local replaces"):
        gomodules.plain_wrapper("x", "example.com/x", "v1.0.0", KUEUE_GOMOD + "replace example.com/y => ./y\n", "example.com/x")


def test_kueue_is_built_on_demand_with_its_version_stamped():
    assert build.KUEUE not in build.targets()  # a plain control plane never builds it
    assert build.KUEUE.version == versions.KUEUE
    assert build.version_ldflags(build.KUEUE) == [f"-X 'sigs.k8s.io/kueue/pkg/version.GitVersion={versions.KUEUE}'"]


def test_helm_is_built_on_demand_with_its_version_and_the_harness_kubernetes_stamped():
    assert build.HELM not in build.targets()  # only the chart's tests ask for it
    assert (build.HELM.version, build.HELM.package) == (versions.HELM, "helm.sh/helm/v3/cmd/helm")
    flags = build.version_ldflags(build.HELM)
    assert f"-X 'helm.sh/helm/v3/internal/version.version={versions.HELM}'" in flags
    major, minor = versions.KUBERNETES.lstrip("v").split(".")[:2]
    for package in ("chartutil", "lint/rules"):
        assert f"-X 'helm.sh/helm/v3/pkg/{package}.k8sVersionMajor={major}'" in flags
        assert f"-X 'helm.sh/helm/v3/pkg/{package}.k8sVersionMinor={minor}'" in flags


def _fake_build(target, with_assets=True):
    binary = build.binary_path(target)
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_text("#!/bin/sh\n")
    binary.with_name(binary.name + ".stamp").write_text(json.dumps(build._stamp(target)))
    if with_assets:
        for relative in target.assets:
            (build.assets_path(target) / relative).mkdir(parents=True, exist_ok=True)


def test_a_cached_kueue_with_its_manifests_is_reused_without_go(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("KUBETUNE_GO", raising=False)
    _fake_build(build.KUEUE)
    found = build.ensure_built(log=lambda m: pytest.fail(f"unexpected build: {m}"), wanted=[build.KUEUE])
    assert found == {"kueue": tmp_path / "bin" / f"kueue-{versions.KUEUE}"}


def test_a_cached_kueue_without_its_manifests_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path))
    _fake_build(build.KUEUE, with_assets=False)
    assert not build.is_built(build.KUEUE)


def test_kueue_configuration_runs_the_job_integration_on_loopback_with_fair_sharing(tmp_path):
    from kubetune.devcluster import kueue

    config = kueue.configuration(kueue.Ports(webhook=9443, health=8081), tmp_path / "certs")
    assert config["apiVersion"] == "config.kueue.x-k8s.io/v1beta2"
    assert config["integrations"] == {"frameworks": ["batch/job"]}
    assert config["fairSharing"] == {"preemptionStrategies": ["LessThanOrEqualToFinalShare", "LessThanInitialShare"]}
    assert config["webhook"] == {"host": "127.0.0.1", "port": 9443, "certDir": str(tmp_path / "certs")}
    assert config["health"] == {"healthProbeBindAddress": "127.0.0.1:8081"}
    assert config["metrics"] == {"bindAddress": "0"}
    assert config["internalCertManagement"] == {
        "enable": True, "webhookServiceName": "kueue-webhook-service", "webhookSecretName": "kueue-webhook-server-cert",
    }
    assert config["featureGates"] == {"VisibilityOnDemand": False}
    assert config["leaderElection"] == {"leaderElect": False}


def _crd(plural: str) -> dict:
    return {"kind": "CustomResourceDefinition", "metadata": {"name": f"{plural}.kueue.x-k8s.io"},
            "spec": {"names": {"plural": plural}}}


def test_kueue_crds_get_conversion_webhooks_on_loopback():
    from kubetune.devcluster import kueue

    documents = [_crd(p) for p in (*kueue.CONVERSION_CRDS, "resourceflavors")]
    rendered = {c["spec"]["names"]["plural"]: c for c in kueue.crds(documents, "https://127.0.0.1:9443", b"CA")}
    conversion = rendered["workloads"]["spec"]["conversion"]
    assert conversion["strategy"] == "Webhook"
    assert conversion["webhook"]["clientConfig"] == {"url": "https://127.0.0.1:9443/convert", "caBundle": "Q0E="}
    assert "conversion" not in rendered["resourceflavors"]["spec"]
    assert "conversion" not in documents[0]["spec"]  # the inputs are not modified
    with pytest.raises(ValueError, match="lack"):
        kueue.crds([_crd("workloads")], "https://127.0.0.1:9443", b"CA")


def _webhook(name: str, group: str, resource: str, path: str) -> dict:
    return {
        "name": name,
        "clientConfig": {"service": {"name": "webhook-service", "namespace": "system", "path": path}},
        "failurePolicy": "Fail",
        "rules": [{"apiGroups": [group], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": [resource]}],
    }


def test_kueue_webhooks_kept_are_its_own_api_and_the_job_integration_called_on_loopback():
    from kubetune.devcluster import kueue

    documents = [
        {"kind": "MutatingWebhookConfiguration", "metadata": {"name": "mutating-webhook-configuration"}, "webhooks": [
            _webhook("mjob.kb.io", "batch", "jobs", "/mutate-batch-v1-job"),
            _webhook("mpod.kb.io", "", "pods", "/mutate--v1-pod"),
            _webhook("mclusterqueue.kb.io", "kueue.x-k8s.io", "clusterqueues", "/mutate-kueue-x-k8s-io-v1beta2-clusterqueue"),
        ]},
        {"kind": "ValidatingWebhookConfiguration", "metadata": {"name": "validating-webhook-configuration"}, "webhooks": [
            _webhook("vjob.kb.io", "batch", "jobs", "/validate-batch-v1-job"),
            _webhook("vrayjob.kb.io", "ray.io", "rayjobs", "/validate-ray-io-v1-rayjob"),
        ]},
    ]
    mutating, validating = kueue.webhook_configurations(documents, "https://127.0.0.1:9443", b"CA")
    # The names Kueue's certificate rotator injects its CA into.
    assert mutating["metadata"]["name"] == "kueue-mutating-webhook-configuration"
    assert validating["metadata"]["name"] == "kueue-validating-webhook-configuration"
    assert [w["name"] for w in mutating["webhooks"]] == ["mjob.kb.io", "mclusterqueue.kb.io"]
    assert [w["name"] for w in validating["webhooks"]] == ["vjob.kb.io"]
    assert mutating["webhooks"][0]["clientConfig"] == {"url": "https://127.0.0.1:9443/mutate-batch-v1-job", "caBundle": "Q0E="}
    assert mutating["webhooks"][0]["failurePolicy"] == "Fail"


def test_kueue_rbac_is_rendered_as_its_kustomization_does():
    from kubetune.devcluster import kueue

    sa = {"kind": "ServiceAccount", "metadata": {"name": "controller-manager", "namespace": "system"}}
    binding = {"kind": "ClusterRoleBinding", "metadata": {"name": "manager-rolebinding"},
               "roleRef": {"kind": "ClusterRole", "name": "manager-role"},
               "subjects": [{"kind": "ServiceAccount", "name": "controller-manager", "namespace": "system"}]}
    role = {"kind": "Role", "metadata": {"name": "manager-secrets-role", "namespace": "system"}}
    rendered_sa, rendered_binding, rendered_role = kueue.rbac([sa, binding, role])
    assert rendered_sa["metadata"] == {"name": "kueue-controller-manager", "namespace": "kueue-system"}
    assert rendered_binding["roleRef"]["name"] == "kueue-manager-role"
    assert rendered_binding["subjects"] == [{"kind": "ServiceAccount", "name": "kueue-controller-manager", "namespace": "kueue-system"}]
    assert "namespace" not in rendered_binding["metadata"]
    assert rendered_role["metadata"] == {"name": "kueue-manager-secrets-role", "namespace": "kueue-system"}
    # The identity Kueue's client certificate carries is the one the binding names.
    from kubetune.devcluster import pki

    assert pki.KUEUE.user == "system:serviceaccount:kueue-system:kueue-controller-manager"


def test_kueue_webhook_certificates_pass_the_checks_of_kueues_rotator_and_the_api_server():
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store

    from kubetune.devcluster import kueue, pki

    made = pki.webhook_pki(kueue.CA_NAME, ["kueue-webhook-service.kueue-system.svc"], ["127.0.0.1"])
    # cert-controller parses the CA key as PKCS#1 RSA and checks the CA against its own name.
    assert made.ca_key.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    ca = x509.load_pem_x509_certificate(made.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["kueue-ca"]
    # Valid past the rotator's 90-day look-ahead, else it replaces them with certificates lacking 127.0.0.1.
    assert ca.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) > datetime.timedelta(days=300)
    cert = x509.load_pem_x509_certificate(made.cert)
    at = datetime.datetime.now(datetime.timezone.utc)
    store = Store([ca])
    for name in (x509.DNSName("kueue-webhook-service.kueue-system.svc"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        PolicyBuilder().store(store).time(at).build_server_verifier(name).verify(cert, [])
    secret = kueue.webhook_secret(made)
    assert sorted(secret["data"]) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    assert secret["metadata"] == {"name": "kueue-webhook-server-cert", "namespace": "kueue-system"}
