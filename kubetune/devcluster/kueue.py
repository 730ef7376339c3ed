"""Kueue's controller manager on the test control plane, as an add-on process.

What runs, and where it comes from
- The binary is `sigs.k8s.io/kueue/cmd/kueue` at `versions.KUEUE`, built from
  Go modules by kubetune.devcluster.build (target `build.KUEUE`) and cached in
  `<cache>/bin/kueue-<version>`. Its install manifests come from the same
  module source: the CRDs (`config/components/crd/bases`), the webhook
  configurations (`config/components/webhook/manifests.yaml`) and the RBAC
  (`config/components/rbac`), copied beside the binary at build time
  (`kueue-<version>.assets/`); nothing of Kueue is committed to this repository.
  (The binary cannot install them itself: its only flags are --config,
  --feature-gates, --visibility-server-port, --kubeconfig and logging.)
  The manifests are rendered here the way Kueue's `config/default`
  kustomization renders them (name prefix `kueue-`, namespace `kueue-system`,
  conversion webhooks on the five CRDs it patches), except that every webhook
  client config names a loopback URL instead of a Service: for a Service the
  API server would dial its ClusterIP, which nothing routes here (no
  kube-proxy), and Endpoints may not hold loopback addresses.
- It authenticates with a client certificate for the user and groups its
  in-cluster ServiceAccount `kueue-system/kueue-controller-manager` would
  have, so Kueue's own ClusterRole and Roles (applied from its manifests)
  are what authorize it: a permission Kueue lacks fails here as it would in
  a real cluster.

Webhooks: ON, served on loopback (127.0.0.1), registered in the API server
with URL client configs and a CA of their own. Why not off:
- Kueue's manager cannot run without its webhook server: `webhooks.Setup`
  runs unconditionally, and the server needs a certificate.
- Switching its certificate management off (`internalCertManagement.enable:
  false`) makes Kueue read its metrics certificate from the fixed path
  /etc/kueue/metrics/certs (v0.17 cmd/kueue/main.go) and exit without it.
- With webhooks registered, the API server applies Kueue's defaulting and
  validation as in production (a ClusterQueue's defaults, a Workload's
  validation, v1beta1 <-> v1beta2 conversion); tests see what users see.
Certificates: Kueue's certificate rotator (open-policy-agent/cert-controller)
keeps the certificates in the Secret `kueue-system/kueue-webhook-server-cert`
and injects their CA into the webhook configurations and the CRDs'
conversion webhooks. The harness fills that Secret before Kueue starts, with
a CA of its own and a serving certificate valid both for the Service name the
rotator checks (`kueue-webhook-service.kueue-system.svc`) and for 127.0.0.1,
the address the API server calls; the rotator finds them valid and keeps
them. It writes the same files to Kueue's cert directory, as the kubelet
would from the Secret volume.
Only the webhooks of Kueue's own API and of the enabled integrations are
registered: the manifests also list pods, Deployments, StatefulSets and a
dozen other frameworks, which Kueue answers with a no-op when they are
disabled; registering them would only route every pod creation in the
cluster through a process that fault-injection tests kill. While Kueue is
down, creating a batch/v1 Job or a Kueue object is refused (failurePolicy
Fail), exactly as in a cluster whose Kueue is down.

Start-up measured 10.8 s on the busy 2-core machine (`kubetune dev cluster
up --kueue`): the CRDs applied and established, then about 5 s of Kueue's
certificate bootstrap, which polls with a 1 s, 2 s, ... back-off.

Configuration (see `configuration`): integrations `batch/job` only; fair
sharing on (`fairSharing.preemptionStrategies`, Kueue's defaults), so that
cohorts, borrowing, reclaim and WorkloadPriorityClass preemption behave as
on a fair-sharing cluster; no leader election (one replica); metrics off;
the visibility API server off (it writes its certificates to /visibility).
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from kubetune.devcluster import build, processes
from kubetune.devcluster import pki as pki_mod
from kubetune.devcluster.controlplane import Addon, ControlPlane
from kubetune.devcluster.kubeconfig import kubeconfig, write_kubeconfig

NAME = "kueue"
NAMESPACE = "kueue-system"
NAME_PREFIX = "kueue-"
WEBHOOK_SERVICE = "kueue-webhook-service"
WEBHOOK_SECRET = "kueue-webhook-server-cert"
# The rotator validates its CA against this name (Kueue's pkg/util/cert/cert.go).
CA_NAME = "kueue-ca"
LOOPBACK = "127.0.0.1"
# Kueue's integrations this harness enables, and the (group, resource) each one's webhooks admit.
INTEGRATIONS = {"batch/job": ("batch", "jobs")}
KUEUE_GROUP = "kueue.x-k8s.io"
# The CRDs whose versions Kueue converts (config/components/crd/kustomization.yaml patches).
CONVERSION_CRDS = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
# Fair sharing's preemption strategies: Kueue's documented default pair.
FAIR_SHARING_STRATEGIES = ["LessThanOrEqualToFinalShare", "LessThanInitialShare"]
# Namespaced kinds among Kueue's RBAC manifests (placed in NAMESPACE, as kustomize does).
_NAMESPACED_RBAC = {"ServiceAccount", "Role", "RoleBinding"}


@dataclass(frozen=True)
class Files:
    """Where one Kueue install keeps its files, inside the control plane's run directory."""

    directory: Path

    @property
    def config(self) -> Path:
        return self.directory / "config.yaml"

    @property
    def cert_dir(self) -> Path:
        return self.directory / "webhook-certs"

    @property
    def manifests(self) -> Path:
        """What was applied to the API server, as applied (for reading when a test
        fails), less the certificate Secret: its CA key stays out of files."""
        return self.directory / "manifests.json"


@dataclass(frozen=True)
class Ports:
    webhook: int
    health: int

    @property
    def webhook_url(self) -> str:
        return f"https://{LOOPBACK}:{self.webhook}"

    @property
    def ready_url(self) -> str:
        # Kueue's readyz: certificates ready and the webhook server listening.
        return f"http://{LOOPBACK}:{self.health}/readyz"


# ----- pure builders -----------------------------------------------------------------------


def configuration(ports: Ports, cert_dir: Path) -> dict:
    """Kueue's `Configuration` (config.kueue.x-k8s.io/v1beta2) for the test control plane."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"{LOOPBACK}:{ports.health}"},
        # "0" switches the metrics server off: nothing scrapes it here.
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": LOOPBACK, "port": ports.webhook, "certDir": str(cert_dir)},
        # One replica: taking a lease would only delay start-up (and a restart by up to its duration).
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {
            "enable": True,
            "webhookServiceName": WEBHOOK_SERVICE,
            "webhookSecretName": WEBHOOK_SECRET,
        },
        "integrations": {"frameworks": list(INTEGRATIONS)},
        "fairSharing": {"preemptionStrategies": FAIR_SHARING_STRATEGIES},
        # The visibility API server writes self-signed certificates to /visibility and
        # needs an APIService; the tests read Workloads instead.
        "featureGates": {"VisibilityOnDemand": False},
        # Kueue's shipped values (controller_manager_config.yaml); the library default is lower.
        "clientConnection": {"qps": 50, "burst": 100},
    }


def commandline(binary: Path, config: Path, kubeconfig_path: Path) -> tuple[str, ...]:
    return (str(binary), f"--config={config}", f"--kubeconfig={kubeconfig_path}", "--zap-log-level=2")


def _ca_bundle(ca_pem: bytes) -> str:
    return base64.b64encode(ca_pem).decode()


def crds(documents: list[dict], webhook_url: str, ca_pem: bytes) -> list[dict]:
    """Kueue's CRDs with the conversion webhook its kustomization adds, pointed at loopback."""
    rendered = []
    for crd in documents:
        crd = json.loads(json.dumps(crd))
        plural = crd["spec"]["names"]["plural"]
        if plural in CONVERSION_CRDS:
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {"url": f"{webhook_url}/convert", "caBundle": _ca_bundle(ca_pem)},
                    "conversionReviewVersions": ["v1"],
                },
            }
        rendered.append(crd)
    missing = set(CONVERSION_CRDS) - {c["spec"]["names"]["plural"] for c in rendered}
    if missing:
        raise ValueError(f"Kueue's CRDs lack {sorted(missing)}; the rotator would fail to inject its CA")
    return rendered


def _admits(webhook: dict, allowed: set[tuple[str, str]]) -> bool:
    pairs = {(g, r) for rule in webhook.get("rules", []) for g in rule["apiGroups"] for r in rule["resources"]}
    return bool(pairs) and all(g == KUEUE_GROUP or (g, r) in allowed for g, r in pairs)


def webhook_configurations(documents: list[dict], webhook_url: str, ca_pem: bytes, integrations=INTEGRATIONS) -> list[dict]:
    """Kueue's Mutating/ValidatingWebhookConfigurations, keeping the webhooks of its
    own API and of `integrations`, each calling `webhook_url` + its path."""
    allowed = {integrations[name] for name in integrations}
    rendered = []
    for document in documents:
        if document.get("kind") not in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            continue
        configuration = json.loads(json.dumps(document))
        configuration["metadata"]["name"] = NAME_PREFIX + configuration["metadata"]["name"]
        kept = []
        for webhook in configuration["webhooks"]:
            if not _admits(webhook, allowed):
                continue
            path = webhook["clientConfig"]["service"]["path"]
            webhook["clientConfig"] = {"url": webhook_url + path, "caBundle": _ca_bundle(ca_pem)}
            kept.append(webhook)
        configuration["webhooks"] = kept
        rendered.append(configuration)
    kinds = sorted(c["kind"] for c in rendered)
    if kinds != ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]:
        raise ValueError(f"Kueue's webhook manifests hold {kinds}, expected one mutating and one validating")
    # The rotator injects its CA into configurations of exactly these names.
    base = WEBHOOK_SERVICE.removesuffix("-webhook-service")
    expected = {f"{base}-mutating-webhook-configuration", f"{base}-validating-webhook-configuration"}
    if {c["metadata"]["name"] for c in rendered} != expected:
        raise ValueError(f"webhook configuration names {[c['metadata']['name'] for c in rendered]} != {sorted(expected)}")
    return rendered


def rbac(documents: list[dict]) -> list[dict]:
    """Kueue's RBAC manifests as its kustomization renders them: names prefixed with
    `kueue-`, namespaced objects and ServiceAccount subjects in `kueue-system`."""
    rendered = []
    for document in documents:
        obj = json.loads(json.dumps(document))
        obj["metadata"]["name"] = NAME_PREFIX + obj["metadata"]["name"]
        if obj["kind"] in _NAMESPACED_RBAC:
            obj["metadata"]["namespace"] = NAMESPACE
        if "roleRef" in obj:
            obj["roleRef"]["name"] = NAME_PREFIX + obj["roleRef"]["name"]
        for subject in obj.get("subjects", []):
            if subject["kind"] == "ServiceAccount":
                subject["name"] = NAME_PREFIX + subject["name"]
                subject["namespace"] = NAMESPACE
        rendered.append(obj)
    return rendered


def webhook_secret(webhook: pki_mod.WebhookPki) -> dict:
    """The Secret Kueue's certificate rotator reads (key names are cert-controller's)."""
    data = {"ca.crt": webhook.ca_cert, "ca.key": webhook.ca_key, "tls.crt": webhook.cert, "tls.key": webhook.key}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": WEBHOOK_SECRET, "namespace": NAMESPACE},
        "type": "Opaque",
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def namespace() -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}


# ----- reading the manifests copied beside the binary -------------------------------------


def _load_all(path: Path) -> list[dict]:
    # libyaml: the Workload CRD alone is 1.4 MB of YAML (about 0.7 s parsed in C, 10x that in Python).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path) as handle:
        return [d for d in yaml.load_all(handle, Loader=loader) if d]


def crd_documents(assets: Path) -> list[dict]:
    return [d for f in sorted((assets / "config/components/crd/bases").glob("*.yaml")) for d in _load_all(f)]


def webhook_documents(assets: Path) -> list[dict]:
    return _load_all(assets / "config/components/webhook/manifests.yaml")


def rbac_documents(assets: Path) -> list[dict]:
    """Every RBAC file Kueue's rbac kustomization lists, in its order."""
    directory = assets / "config/components/rbac"
    listed = yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]
    return [d for name in listed for d in _load_all(directory / name)]


# ----- install, start, stop ----------------------------------------------------------------


@dataclass
class Install:
    """A running Kueue on one control plane."""

    plane: ControlPlane
    ports: Ports
    files: Files
    # (kind, name) of the webhook configurations registered for it.
    webhook_configurations: list[tuple[str, str]]

    @property
    def log(self) -> Path:
        return self.plane.layout.log(NAME)


def _kubectl(plane: ControlPlane, *args: str, input: str | None = None, timeout: float = 120) -> str:
    import subprocess

    argv = [str(plane.binaries["kubectl"]), f"--kubeconfig={plane.kubeconfig}", *args]
    result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def _apply(plane: ControlPlane, objects: list[dict]) -> None:
    # Server-side apply: the Workload CRD is too large for client-side apply's
    # last-applied annotation (Kueue's install docs use --server-side too).
    stream = "\n".join(json.dumps(o) for o in objects)
    _kubectl(plane, "apply", "--server-side", "--force-conflicts", "--field-manager=kubetune-devcluster", "-f", "-", input=stream)


def start(plane: ControlPlane, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Install:
    """Build Kueue if needed, install its CRDs, RBAC and certificates, start its
    controller manager on loopback, and register its webhooks once it is ready."""
    binary = build.ensure_built(log, [build.KUEUE])[NAME]
    started = time.monotonic()
    assets = build.assets_path(build.KUEUE)
    files = Files(plane.run_dir / NAME)
    files.cert_dir.mkdir(parents=True, exist_ok=True)
    ports = Ports(*processes.free_ports(2))

    webhook = pki_mod.webhook_pki(CA_NAME, [f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc"], [LOOPBACK])
    for name, data in (("tls.crt", webhook.cert), ("tls.key", webhook.key), ("ca.crt", webhook.ca_cert)):
        (files.cert_dir / name).write_bytes(data)
    (files.cert_dir / "tls.key").chmod(0o600)
    files.config.write_text(yaml.safe_dump(configuration(ports, files.cert_dir), sort_keys=False))
    kueue_kubeconfig = plane.layout.kubeconfig(NAME)
    cluster_pki = plane.layout.pki
    write_kubeconfig(
        kueue_kubeconfig,
        kubeconfig(plane.server, cluster_pki.ca_cert, cluster_pki.client_cert(pki_mod.KUEUE), cluster_pki.client_key(pki_mod.KUEUE)),
    )

    crd_objects = crds(crd_documents(assets), ports.webhook_url, webhook.ca_cert)
    hooks = webhook_configurations(webhook_documents(assets), ports.webhook_url, webhook.ca_cert)
    setup = [namespace(), webhook_secret(webhook), *rbac(rbac_documents(assets)), *crd_objects]
    files.manifests.write_text(json.dumps([o for o in (*setup, *hooks) if o["kind"] != "Secret"], indent=1))
    _apply(plane, setup)
    # Kueue's informers fail to start on a CRD that is not served yet.
    _kubectl(plane, "wait", "--for=condition=Established", "--timeout=60s",
             *(f"crd/{c['metadata']['name']}" for c in crd_objects))

    plane.add_addon(NAME, Addon(commandline(binary, files.config, kueue_kubeconfig), ports.ready_url), binary)
    # Registered only once Kueue serves them: a Kueue that fails to start leaves no
    # webhook behind that would refuse every Job for the rest of the session. (Its
    # certificate rotator logs "Webhook not found" meanwhile; it injects the CA
    # when they appear.)
    _apply(plane, hooks)
    log(f"kueue {build.KUEUE.version} ready in {time.monotonic() - started:.1f}s "
        f"(webhooks on {ports.webhook_url}, log {plane.layout.log(NAME)})")
    return Install(plane, ports, files, [(h["kind"], h["metadata"]["name"]) for h in hooks])


def stop(install: Install) -> None:
    """Unregister Kueue's webhooks, then stop it: the control plane keeps serving
    Jobs afterwards (the CRDs and Kueue's objects stay)."""
    plane = install.plane
    try:
        for kind, name in install.webhook_configurations:
            _kubectl(plane, "delete", kind.lower(), name, "--ignore-not-found")
    finally:
        plane.remove_addon(NAME)
