"""Fixtures of the operator's cluster tests: the CRD installed, an operator
identity bound to the chart's ClusterRole (generated from rbac.RULES), and
operators started as in production: `kubetune operator` subprocesses with a
ServiceAccount kubeconfig, so every API call they make is checked by RBAC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from kubetune.devcluster.cluster import wait_for
from kubetune.devcluster.processes import free_ports
from kubetune.operator import rbac
from kubetune.operator.crdgen import ADAPTER_SERVER_CRD_PATH, CRD_PATH

OPERATOR_NAMESPACE = "kubetune-system"
OPERATOR_ACCOUNT = "kubetune-operator"
KUBETUNE = Path(sys.executable).with_name("kubetune")


@pytest.fixture(scope="session")
def crd(cluster):
    """The generated CRD, applied and Established."""
    # The FineTuneJob and adapter mode's internal AdapterServer (the operator watches both).
    for path, name in ((CRD_PATH, "finetunejobs.kubetune.io"), (ADAPTER_SERVER_CRD_PATH, "adapterservers.kubetune.io")):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
        # `kubectl wait` errors out (instead of waiting) while the new CRD has no status.conditions yet.
        wait_for(f"CRD {name} Established", lambda: cluster.kubectl(
            "wait", "--for=condition=Established", "--timeout=30s", f"crd/{name}", check=False
        ).returncode == 0, timeout=60, interval=0.5)
    return CRD_PATH


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster, crd, tmp_path_factory) -> Path:
    """A kubeconfig for the operator's ServiceAccount, bound to the ClusterRole
    built from `kubetune.operator.rbac.RULES` (the chart's ClusterRole)."""
    from kubernetes import client

    api = cluster.api_client()
    core = client.CoreV1Api(api)
    rbac_api = client.RbacAuthorizationV1Api(api)
    if not any(ns.metadata.name == OPERATOR_NAMESPACE for ns in core.list_namespace().items):
        core.create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}})
    wait_for("default ServiceAccount", lambda: _exists(lambda: core.read_namespaced_service_account("default", OPERATOR_NAMESPACE)))
    _apply(lambda: core.create_namespaced_service_account(OPERATOR_NAMESPACE, {"metadata": {"name": OPERATOR_ACCOUNT}}))
    _apply(lambda: rbac_api.create_cluster_role(rbac.cluster_role()))
    _apply(lambda: rbac_api.create_cluster_role_binding({
        "metadata": {"name": rbac.CLUSTER_ROLE_NAME},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": rbac.CLUSTER_ROLE_NAME},
        "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_ACCOUNT, "namespace": OPERATOR_NAMESPACE}],
    }))
    token = core.create_namespaced_service_account_token(
        OPERATOR_ACCOUNT, OPERATOR_NAMESPACE, {"spec": {"expirationSeconds": 7200}}
    ).status.token
    path = tmp_path_factory.mktemp("operator") / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": cluster.server, "certificate-authority": str(cluster.ca_cert)}}],
        "users": [{"name": OPERATOR_ACCOUNT, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "test", "user": OPERATOR_ACCOUNT}}],
        "current-context": "operator",
    }))
    return path


def _exists(read) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        read()
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


def _apply(create) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        create()
    except ApiException as e:
        if e.status != 409:
            raise


@dataclass
class OperatorProcess:
    proc: subprocess.Popen
    log_path: Path
    metrics_port: int
    health_port: int
    env: dict = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@pytest.fixture
def start_operator(operator_kubeconfig, tmp_path, request):
    """Factory: `start_operator(namespace, **env)` -> a running OperatorProcess
    watching `namespace` (or each namespace of a list). Short intervals keep the
    suite fast; production defaults come from OperatorSettings. `kubeconfig=`
    runs it under another identity than the chart's ClusterRole."""
    started: list[OperatorProcess] = []

    def start(namespace: str | list[str], kubeconfig: Path | None = None, **extra_env: str) -> OperatorProcess:
        metrics_port, health_port = free_ports(2)
        namespaces = [namespace] if isinstance(namespace, str) else list(namespace)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")},
            "KUBECONFIG": str(kubeconfig or operator_kubeconfig),
            "KUBETUNE_RECONCILE_INTERVAL": "0.5",
            "KUBETUNE_METRICS_PORT": str(metrics_port),
            "KUBETUNE_TRAINER_IMAGE": "registry.test/kubetune:test",
            "KUBETUNE_VLLM_IMAGE": "registry.test/vllm:test",
            "KUBETUNE_WATCH_SERVER_TIMEOUT": "60",
            "KUBETUNE_WATCH_CLIENT_TIMEOUT": "90",
            **extra_env,
        }
        log_path = tmp_path / f"operator-{len(started)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(KUBETUNE), "operator", *(a for ns in namespaces for a in ("--namespace", ns)),
                 "--liveness", f"http://127.0.0.1:{health_port}/healthz"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        op = OperatorProcess(proc, log_path, metrics_port, health_port, env)
        started.append(op)
        wait_for("operator liveness endpoint", lambda: _healthy(op), timeout=60, interval=0.3)
        return op

    yield start
    for op in started:
        op.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is None or rep.failed:
        for i, op in enumerate(started):
            print(f"----- operator {i} log -----\n" + op.log()[-20000:])


def _healthy(op: OperatorProcess) -> bool:
    import urllib.request

    if not op.alive():
        raise RuntimeError(f"operator exited with {op.proc.returncode}:\n{op.log()[-4000:]}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{op.health_port}/healthz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.rep_call = report
    return report
