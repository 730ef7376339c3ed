"""Pure builders of each component's command line.

Flags follow what controller-runtime's envtest uses, plus what envtest leaves
out because it runs no controller-manager: ServiceAccount admission stays on,
service-account tokens are signed and verified, and the controller-manager
runs every controller (garbage collector, namespace, Job, service-account
token) with per-controller credentials.
"""

from __future__ import annotations

from pathlib import Path

from kubetune.devcluster import layout as L
from kubetune.devcluster.layout import Layout
from kubetune.devcluster.pki import FRONT_PROXY

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Annotation selecting the nodes kwok manages (fake nodes carry it).
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
FAKE_NODE_VALUE = "fake"


def etcd(binary: Path, lay: Layout) -> list[str]:
    peer = f"http://127.0.0.1:{lay.ports.etcd_peer}"
    return [
        str(binary),
        "--name=kubetune",
        f"--data-dir={lay.etcd_data}",
        f"--listen-client-urls={lay.etcd_url}",
        f"--advertise-client-urls={lay.etcd_url}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=kubetune={peer}",
        # Test data is thrown away: skip fsync, it dominates etcd latency on slow disks.
        "--unsafe-no-fsync=true",
        "--log-level=info",
    ]


def kube_apiserver(binary: Path, lay: Layout) -> list[str]:
    pki = lay.pki
    return [
        str(binary),
        f"--etcd-servers={lay.etcd_url}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={lay.ports.apiserver}",
        f"--cert-dir={lay.cert_dir(L.APISERVER)}",
        f"--tls-cert-file={pki.serving_cert}",
        f"--tls-private-key-file={pki.serving_key}",
        f"--client-ca-file={pki.ca_cert}",
        # Request-header (front proxy) authentication: aggregated API servers need it,
        # and the controller-manager and scheduler read it at start-up.
        f"--requestheader-client-ca-file={pki.ca_cert}",
        f"--requestheader-allowed-names={FRONT_PROXY.user}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.client_cert(FRONT_PROXY)}",
        f"--proxy-client-key-file={pki.client_key(FRONT_PROXY)}",
        "--authorization-mode=Node,RBAC",
        "--anonymous-auth=false",
        # The default plugin set includes ServiceAccount, NamespaceLifecycle and
        # PodSecurity; NodeRestriction is the one left to name.
        "--enable-admission-plugins=NodeRestriction",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki.service_account_pub}",
        f"--service-account-signing-key-file={pki.service_account_key}",
        f"--service-cluster-ip-range={L.SERVICE_CIDR}",
        "--allow-privileged=true",
        # The `kubernetes` Endpoints would name 127.0.0.1, which validation rejects.
        "--endpoint-reconciler-type=none",
        "--profiling=false",
        "--v=1",
    ]


def kube_controller_manager(binary: Path, lay: Layout) -> list[str]:
    pki = lay.pki
    kubeconfig = lay.kubeconfig(L.CONTROLLER_MANAGER)
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={lay.ports.controller_manager}",
        f"--cert-dir={lay.cert_dir(L.CONTROLLER_MANAGER)}",
        f"--root-ca-file={pki.ca_cert}",
        f"--service-account-private-key-file={pki.service_account_key}",
        "--use-service-account-credentials=true",
        "--controllers=*",
        f"--cluster-signing-cert-file={pki.ca_cert}",
        f"--cluster-signing-key-file={pki.ca_key}",
        f"--service-cluster-ip-range={L.SERVICE_CIDR}",
        # One instance: taking the lease first would only delay start-up.
        "--leader-elect=false",
        "--profiling=false",
        "--v=1",
    ]


def kube_scheduler(binary: Path, lay: Layout) -> list[str]:
    kubeconfig = lay.kubeconfig(L.SCHEDULER)
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={lay.ports.scheduler}",
        f"--cert-dir={lay.cert_dir(L.SCHEDULER)}",
        "--leader-elect=false",
        "--profiling=false",
        "--v=1",
    ]


def kwok(binary: Path, lay: Layout) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={lay.kubeconfig(L.KWOK)}",
        f"--config={lay.kwok_config}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}={FAKE_NODE_VALUE}",
        f"--cidr={L.POD_CIDR}",
        "--node-ip=127.0.0.1",
        f"--server-address=127.0.0.1:{lay.ports.kwok}",
    ]
