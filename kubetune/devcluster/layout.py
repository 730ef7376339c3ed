"""The files and ports of one control plane run (pure: computing paths does no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kubetune.devcluster.pki import Pki

SERVICE_CIDR = "10.0.0.0/24"
# The first address of the service range belongs to the `kubernetes` Service.
SERVICE_IP = "10.0.0.1"
POD_CIDR = "10.244.0.0/16"

# Component names, also the names of their log files and kubeconfigs.
ETCD = "etcd"
APISERVER = "kube-apiserver"
CONTROLLER_MANAGER = "kube-controller-manager"
SCHEDULER = "kube-scheduler"
KWOK = "kwok"
COMPONENTS = (ETCD, APISERVER, CONTROLLER_MANAGER, SCHEDULER, KWOK)


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int


@dataclass(frozen=True)
class Layout:
    run_dir: Path
    ports: Ports

    @property
    def pki(self) -> Pki:
        return Pki(self.run_dir / "pki")

    @property
    def etcd_data(self) -> Path:
        return self.run_dir / "etcd-data"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.etcd_client}"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.run_dir / "admin.kubeconfig"

    @property
    def kwok_config(self) -> Path:
        return self.run_dir / "kwok.yaml"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "state.json"

    def kubeconfig(self, component: str) -> Path:
        return self.run_dir / f"{component}.kubeconfig"

    def log(self, component: str) -> Path:
        return self.run_dir / "logs" / f"{component}.log"

    def cert_dir(self, component: str) -> Path:
        """Where a component writes its self-signed serving certificate."""
        return self.run_dir / "serving" / component
