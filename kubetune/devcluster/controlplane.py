"""Start and stop one control plane: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok, all on loopback, in one run directory.

The run directory holds the certificates, a kubeconfig per component, every
component's log (`logs/<component>.log`) and `state.json` (pids and
addresses), which lets `kubetune dev cluster down` stop a control plane that
another process started.

Add-ons (Kueue, see kubetune.devcluster.kueue) join a running control plane
through `ControlPlane.add_addon`; from then on they are components like the
others: logged, in state.json, stopped first, and `kill`/`restart`-able.
"""

from __future__ import annotations

import json
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from kubetune.devcluster import build, commandlines, paths, processes
from kubetune.devcluster import layout as L
from kubetune.devcluster import pki as pki_mod
from kubetune.devcluster.kubeconfig import kubeconfig, write_kubeconfig
from kubetune.devcluster.layout import Layout, Ports

START_TIMEOUT_SECONDS = 90.0

_COMMANDLINES = {
    L.ETCD: commandlines.etcd,
    L.APISERVER: commandlines.kube_apiserver,
    L.CONTROLLER_MANAGER: commandlines.kube_controller_manager,
    L.SCHEDULER: commandlines.kube_scheduler,
    L.KWOK: commandlines.kwok,
}

# Which client identity each component's kubeconfig carries.
_IDENTITY = {
    L.CONTROLLER_MANAGER: pki_mod.CONTROLLER_MANAGER,
    L.SCHEDULER: pki_mod.SCHEDULER,
    L.KWOK: pki_mod.KWOK,
}


class StartError(RuntimeError):
    """The control plane did not come up; the message carries the component logs."""


@dataclass(frozen=True)
class Addon:
    """A component started on demand after the control plane: its command line
    and the plain-HTTP URL that answers 200 once it is ready."""

    argv: tuple[str, ...]
    ready_url: str


@dataclass
class ControlPlane:
    layout: Layout
    binaries: dict[str, Path]
    # False for `kubetune dev cluster up`, whose components outlive the command.
    die_with_parent: bool = True
    pids: dict[str, int] = field(default_factory=dict)
    addons: dict[str, Addon] = field(default_factory=dict)
    _children: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Own copy: callers pass one plane's binaries to start another, and add-ons extend it.
        self.binaries = dict(self.binaries)

    @property
    def run_dir(self) -> Path:
        return self.layout.run_dir

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (group system:masters)."""
        return self.layout.admin_kubeconfig

    @property
    def server(self) -> str:
        return self.layout.server

    def admin_ssl_context(self) -> ssl.SSLContext:
        pki = self.layout.pki
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        context.load_cert_chain(str(pki.client_cert(pki_mod.ADMIN)), str(pki.client_key(pki_mod.ADMIN)))
        return context

    def dead_component(self) -> str | None:
        for name, pid in self.pids.items():
            child = self._children.get(name)
            if (child.poll() is not None) if child is not None else not processes.is_alive(pid):
                return name
        return None

    @property
    def components(self) -> tuple[str, ...]:
        """Every component in start order: the control plane, then the add-ons."""
        return (*L.COMPONENTS, *self.addons)

    def log_tails(self, lines: int = 30) -> str:
        parts = []
        for name in self.components:
            path = self.layout.log(name)
            if path.exists():
                parts.append(f"----- {name} ({path}) -----\n{processes.tail(path, lines)}")
        return "\n".join(parts)

    def stop(self, remove_run_dir: bool = False) -> None:
        """Stop components in reverse start order (add-ons and other clients before the
        API server, etcd last)."""
        for name in reversed(self.components):
            pid = self.pids.get(name)
            if pid is not None:
                processes.stop_group(pid)
        self.pids.clear()
        self._children.clear()
        if remove_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        elif self.layout.state_file.exists():
            self.layout.state_file.unlink()

    def kill(self, name: str, graceful: bool = False) -> None:
        """Stop one component to inject a fault: SIGKILL (a crash) by default,
        or SIGTERM with a grace period. kube-apiserver's graceful shutdown takes
        about 10 s while clients hold watches open."""
        pid = self.pids.pop(name)
        self._children.pop(name, None)
        processes.stop_group(pid, grace_seconds=10.0 if graceful else 0)
        self._write_state()

    def restart(self, name: str, graceful: bool = False) -> None:
        """Stop one component if it runs and start it again with the same flags and
        ports; returns once it is healthy. Its log file is appended to."""
        if name in self.pids:
            self.kill(name, graceful=graceful)
        self._spawn(name)
        _wait_healthy(self, name)

    def add_addon(self, name: str, addon: Addon, binary: Path, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start an add-on and wait until its ready URL answers; on failure it is
        stopped again and StartError carries its log."""
        if name in self.addons or name in L.COMPONENTS:
            raise ValueError(f"{name} is already a component of this control plane")
        self.addons[name] = addon
        self.binaries[name] = binary
        try:
            self._spawn(name)
            _wait_healthy(self, name, timeout)
        except (RuntimeError, TimeoutError) as error:
            tail = processes.tail(self.layout.log(name), 60)
            self.remove_addon(name)
            raise StartError(f"{name} did not start: {error}\n----- {name} ({self.layout.log(name)}) -----\n{tail}") from error

    def remove_addon(self, name: str) -> None:
        """Stop an add-on (SIGTERM, as a Deployment scaled to zero would) and forget it."""
        pid = self.pids.pop(name, None)
        self._children.pop(name, None)
        if pid is not None:
            processes.stop_group(pid)
        self.addons.pop(name, None)
        self.binaries.pop(name, None)
        self._write_state()

    def _spawn(self, name: str) -> None:
        if name in self.addons:
            argv = list(self.addons[name].argv)
        else:
            argv = _COMMANDLINES[name](self.binaries[name], self.layout)
        child = processes.spawn(argv, self.layout.log(name), die_with_parent=self.die_with_parent)
        self._children[name] = child
        self.pids[name] = child.pid
        self._write_state()

    def _write_state(self) -> None:
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "pids": self.pids,
            # Stop order for `stop_from_state`: add-ons first, as in `stop`.
            "components": list(self.components),
            "binaries": {name: str(path) for name, path in self.binaries.items()},
        }
        self.layout.state_file.write_text(json.dumps(state, indent=2))


def _prepare(run_dir: Path) -> Layout:
    ports = Ports(*processes.free_ports(6))
    lay = Layout(run_dir, ports)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    for name in L.COMPONENTS:
        lay.cert_dir(name).mkdir(parents=True, exist_ok=True)
    pki = pki_mod.write_pki(lay.pki.directory, L.SERVICE_IP)
    write_kubeconfig(
        lay.admin_kubeconfig,
        kubeconfig(lay.server, pki.ca_cert, pki.client_cert(pki_mod.ADMIN), pki.client_key(pki_mod.ADMIN)),
    )
    for component, who in _IDENTITY.items():
        write_kubeconfig(
            lay.kubeconfig(component),
            kubeconfig(lay.server, pki.ca_cert, pki.client_cert(who), pki.client_key(who)),
        )
    lay.kwok_config.write_text(resources.files("kubetune.devcluster").joinpath("kwok.yaml").read_text())
    return lay


def start(
    run_dir: Path | None = None,
    binaries: dict[str, Path] | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
    die_with_parent: bool = True,
) -> ControlPlane:
    """Build what is missing, start every component and wait until the cluster is usable.

    Usable means: the API server is ready, the controller-manager, scheduler and
    kwok answer their health checks, and the service-account controller has
    created the `default` ServiceAccount (so pods can be admitted).
    """
    binaries = binaries or build.ensure_built(log)
    if run_dir is None:
        paths.run_root().mkdir(parents=True, exist_ok=True)
        prune_stale_runs()
        run_dir = Path(tempfile.mkdtemp(prefix=_TEST_RUN_PREFIX, dir=paths.run_root()))
    started = time.monotonic()
    for attempt in (1, 2):
        plane = ControlPlane(_prepare(run_dir), binaries, die_with_parent=die_with_parent)
        try:
            _start_components(plane)
            break
        except BaseException as error:
            tails = plane.log_tails(40)
            plane.stop()
            if not isinstance(error, (RuntimeError, TimeoutError)):
                raise
            # Ports are picked free, then bound by the components a moment later;
            # another process can take one in between. Pick new ones once.
            if attempt == 1 and "address already in use" in tails:
                log("a port was taken meanwhile; starting again on new ports")
                # etcd's data names the old peer address; start from nothing.
                shutil.rmtree(plane.layout.etcd_data, ignore_errors=True)
                continue
            raise StartError(f"control plane in {run_dir} did not start: {error}\n{tails}") from error
    log(f"control plane ready in {time.monotonic() - started:.1f}s: {plane.server} (KUBECONFIG={plane.kubeconfig})")
    return plane


def _health_check(plane: ControlPlane, name: str) -> tuple[str, Callable[[], bool]]:
    """What "ready" means for one component, as (description, check)."""
    lay = plane.layout
    if name in plane.addons:
        url = plane.addons[name].ready_url
        return f"{name} {url}", lambda: processes.http_ok(url)
    admin = plane.admin_ssl_context()
    # Self-signed serving certs of the controller-manager and scheduler: only liveness is checked.
    insecure = ssl._create_unverified_context()
    checks = {
        L.ETCD: ("etcd /health", lambda: processes.http_ok(f"{lay.etcd_url}/health")),
        L.APISERVER: ("kube-apiserver /readyz", lambda: processes.http_ok(f"{lay.server}/readyz", admin)),
        L.CONTROLLER_MANAGER: (
            "kube-controller-manager /healthz",
            lambda: processes.http_ok(f"https://127.0.0.1:{lay.ports.controller_manager}/healthz", insecure),
        ),
        L.SCHEDULER: (
            "kube-scheduler /healthz",
            lambda: processes.http_ok(f"https://127.0.0.1:{lay.ports.scheduler}/healthz", insecure),
        ),
        L.KWOK: ("kwok /healthz", lambda: processes.http_ok(f"http://127.0.0.1:{lay.ports.kwok}/healthz")),
    }
    return checks[name]


def _wait_healthy(plane: ControlPlane, name: str, timeout: float = START_TIMEOUT_SECONDS) -> None:
    what, check = _health_check(plane, name)
    processes.wait_until(what, check, timeout, plane.dead_component)


def _start_components(plane: ControlPlane) -> None:
    plane._spawn(L.ETCD)
    plane._spawn(L.APISERVER)  # retries etcd until it listens
    _wait_healthy(plane, L.APISERVER)
    clients = (L.CONTROLLER_MANAGER, L.SCHEDULER, L.KWOK)
    for name in clients:
        plane._spawn(name)
    for name in clients:
        _wait_healthy(plane, name)
    # Pods are only admitted once the service-account controller made `default`.
    admin = plane.admin_ssl_context()
    processes.wait_until(
        "ServiceAccount default/default",
        lambda: processes.http_ok(f"{plane.server}/api/v1/namespaces/default/serviceaccounts/default", admin),
        START_TIMEOUT_SECONDS,
        plane.dead_component,
    )


_TEST_RUN_PREFIX = "cluster-"
# A run directory this old with no live component is left over from a killed run.
_STALE_SECONDS = 600


def prune_stale_runs() -> list[Path]:
    """Delete leftover `cluster-*` run directories of test runs that were killed."""
    pruned = []
    now = time.time()
    for run_dir in paths.run_root().glob(_TEST_RUN_PREFIX + "*"):
        try:
            if now - run_dir.stat().st_mtime < _STALE_SECONDS:
                continue
            pids = load(run_dir)["pids"].values() if (run_dir / "state.json").exists() else []
        except (OSError, ValueError, KeyError):
            pids = []
        if not any(processes.is_alive(pid) for pid in pids):
            shutil.rmtree(run_dir, ignore_errors=True)
            pruned.append(run_dir)
    return pruned


def load(run_dir: Path) -> dict:
    """The state.json of a started control plane."""
    return json.loads(Layout(run_dir, Ports(0, 0, 0, 0, 0, 0)).state_file.read_text())


def stop_from_state(run_dir: Path) -> list[str]:
    """Stop the components listed in a run directory's state.json; returns their names."""
    state = load(run_dir)
    stopped = []
    for name in reversed(state.get("components", L.COMPONENTS)):
        pid = state["pids"].get(name)
        # Only signal a pid that still runs our binary: pids are reused after a reboot.
        if pid is not None and _runs_binary(pid, state["binaries"].get(name, "")):
            processes.stop_group(pid)
            stopped.append(name)
    (run_dir / "state.json").unlink(missing_ok=True)
    return stopped


def _runs_binary(pid: int, binary: str) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    except OSError:
        return False
    return bool(binary) and argv0 == binary
