"""A handle on a running control plane for tests and tools: API clients, kubectl,
namespaces, fake GPU and CPU nodes, waiting for conditions."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kubetune.devcluster import fakenodes
from kubetune.devcluster.controlplane import ControlPlane

T = TypeVar("T")

RESTRICTED_LABELS = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


@dataclass
class Cluster:
    plane: ControlPlane

    @property
    def kubeconfig(self) -> Path:
        return self.plane.kubeconfig

    @property
    def server(self) -> str:
        return self.plane.server

    @property
    def ca_cert(self) -> Path:
        return self.plane.layout.pki.ca_cert

    @property
    def kubectl_binary(self) -> Path:
        return self.plane.binaries["kubectl"]

    def api_client(self):
        """A kubernetes-client ApiClient authenticated as cluster admin."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def token_client(self, token: str):
        """An ApiClient that authenticates with a bearer token (e.g. a ServiceAccount's)."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(self.ca_cert)
        configuration.api_key = {"authorization": token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(configuration)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run kubectl against this cluster; raises with its stderr when `check` and it fails."""
        argv = [str(self.kubectl_binary), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed (exit {result.returncode}):\n{result.stderr}")
        return result

    def create_namespace(self, prefix: str = "test", labels: dict[str, str] | None = None, wait_for_default_sa: bool = True) -> str:
        """Create a uniquely named namespace; by default wait until its `default`
        ServiceAccount exists, since pods are rejected before that."""
        from kubernetes import client

        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        core = client.CoreV1Api(self.api_client())
        core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
        if wait_for_default_sa:
            wait_for(
                f"ServiceAccount {name}/default",
                lambda: _exists(lambda: core.read_namespaced_service_account("default", name)),
                timeout=30,
            )
        return name

    def delete_namespace(self, name: str) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            client.CoreV1Api(self.api_client()).delete_namespace(name)
        except ApiException as error:
            if error.status != 404:
                raise

    def create_gpu_node(self, name: str | None = None, **kwargs) -> str:
        """Create a fake GPU node (see fakenodes.gpu_node) and wait until kwok marks it Ready."""
        name = name or f"gpu-{uuid.uuid4().hex[:8]}"
        return self.create_node(fakenodes.gpu_node(name, **kwargs))

    def create_cpu_node(self, name: str | None = None, **kwargs) -> str:
        """Create a fake CPU-only, untainted node (see fakenodes.cpu_node) and wait until it is Ready."""
        name = name or f"cpu-{uuid.uuid4().hex[:8]}"
        return self.create_node(fakenodes.cpu_node(name, **kwargs))

    def create_node(self, manifest: dict) -> str:
        from kubernetes import client

        name = manifest["metadata"]["name"]
        core = client.CoreV1Api(self.api_client())
        core.create_node(manifest)
        wait_for(f"node {name} Ready", lambda: _node_ready(core.read_node(name)), timeout=30)
        return name

    def delete_node(self, name: str) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            client.CoreV1Api(self.api_client()).delete_node(name)
        except ApiException as error:
            if error.status != 404:
                raise


def _node_ready(node) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))


def _exists(read: Callable[[], object]) -> bool:
    from kubernetes.client.rest import ApiException

    try:
        read()
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def wait_for(what: str, check: Callable[[], T], timeout: float = 60, interval: float = 0.2) -> T:
    """Poll `check` until it returns something truthy, and return that; TimeoutError names `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
