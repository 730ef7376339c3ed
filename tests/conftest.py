"""Session fixtures shared by every test suite.

`cluster` starts a real control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kwok) on loopback, once per test
run and only when a test asks for it: unit and trainer tests never start it.
`kueue` adds Kueue's controller manager to it, once per run and only for
runs that ask (its first build takes minutes). `s3` starts a moto S3 server
on loopback. Everything started here is stopped
at the end of the session, on Ctrl-C, and (through atexit and the
components' parent-death signal) when the run dies. `helm` is Helm, built
the same way as the control plane (cached), for the chart's tests.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_PLANE = pytest.StashKey()


def pytest_collection_modifyitems(config, items):
    # Tests that use the control plane are `cluster` tests wherever they live,
    # so `-m "not cluster"` deselects them without anyone marking them by hand.
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    plane = item.config.stash.get(_PLANE, None)
    if report.failed and plane is not None and "cluster" in getattr(item, "fixturenames", ()):
        report.sections.append((f"control plane logs ({plane.run_dir}/logs)", plane.log_tails(25)))
    return report


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def cluster(request):
    """A running control plane; a `kubetune.devcluster.cluster.Cluster`."""
    from kubetune.devcluster import build, controlplane
    from kubetune.devcluster.cluster import Cluster

    try:
        plane = controlplane.start()
    except (build.GoMissingError, build.BuildError, controlplane.StartError) as error:
        # Never skip: a suite that silently skips its cluster tests proves nothing.
        pytest.fail(str(error), pytrace=False)

    keep = os.environ.get("KUBETUNE_KEEP_RUN") == "1"
    atexit.register(plane.stop)
    # A plain SIGTERM would end the run without teardown; make it behave like Ctrl-C.
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    if previous_sigterm is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    request.config.stash[_PLANE] = plane
    try:
        yield Cluster(plane)
    finally:
        request.config.stash[_PLANE] = None
        plane.stop(remove_run_dir=not keep)
        atexit.unregister(plane.stop)
        signal.signal(signal.SIGTERM, previous_sigterm)


@pytest.fixture
def namespace(cluster):
    """A fresh namespace enforcing Pod Security `restricted`, deleted after the test."""
    from kubetune.devcluster.cluster import RESTRICTED_LABELS

    name = cluster.create_namespace("t", labels=RESTRICTED_LABELS)
    yield name
    cluster.delete_namespace(name)


@pytest.fixture
def gpu_nodes(cluster):
    """Factory of fake GPU nodes (kwok-managed, Ready); they are deleted after the test.

    `gpu_nodes()` -> node name; keyword arguments go to
    `kubetune.devcluster.fakenodes.gpu_node` (gpus=8, product=..., labels=...).
    """
    created: list[str] = []

    def make(name: str | None = None, **kwargs) -> str:
        node = cluster.create_gpu_node(name, **kwargs)
        created.append(node)
        return node

    yield make
    for node in created:
        cluster.delete_node(node)


@pytest.fixture
def cpu_nodes(cluster):
    """Factory of fake CPU-only, untainted nodes (kwok-managed, Ready), deleted after the test.

    `cpu_nodes()` -> node name; keyword arguments go to
    `kubetune.devcluster.fakenodes.cpu_node` (cpu="32", memory="128Gi", labels=...).
    """
    created: list[str] = []

    def make(name: str | None = None, **kwargs) -> str:
        node = cluster.create_cpu_node(name, **kwargs)
        created.append(node)
        return node

    yield make
    for node in created:
        cluster.delete_node(node)


@pytest.fixture(scope="session")
def gateway_api(cluster):
    """The Gateway API's standard CRDs (HTTPRoute and its parents) installed and Established, from the
    Go module pinned in kubetune.devcluster.versions (no Gateway controller)."""
    from kubetune.devcluster import build, gatewayapi
    from kubetune.devcluster.cluster import wait_for

    try:
        files = gatewayapi.crd_files()
    except (build.GoMissingError, build.BuildError) as error:
        pytest.fail(str(error), pytrace=False)  # never skip: the canary tests would prove nothing
    for path in files:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    wait_for("HTTPRoute CRD Established", lambda: cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=30s", "crd/httproutes.gateway.networking.k8s.io",
        check=False).returncode == 0, timeout=60, interval=0.5)
    return files


@pytest.fixture(scope="session")
def kueue(cluster):
    """Kueue's controller manager running against the session's control plane;
    a `kubetune.devcluster.kueue.Install` (`.ports`, `.files`, `.log`).

    Started once per session (built first if the cache lacks it) and stopped at
    the end, its webhooks unregistered first. Fault injection goes through the
    plane like any component: `cluster.plane.kill("kueue")`,
    `cluster.plane.restart("kueue")`. Create queues with `kueue_queues`.
    """
    from kubetune.devcluster import build, controlplane
    from kubetune.devcluster import kueue as kueue_addon

    try:
        install = kueue_addon.start(cluster.plane)
    except (build.GoMissingError, build.BuildError, controlplane.StartError, RuntimeError, TimeoutError) as error:
        # Never skip, as for `cluster`: a silently skipped Kueue suite proves nothing.
        pytest.fail(f"Kueue did not start: {error}", pytrace=False)
    try:
        yield install
    finally:
        if "kueue" in cluster.plane.pids or "kueue" in cluster.plane.addons:
            kueue_addon.stop(install)


@pytest.fixture
def kueue_queues(cluster, kueue):
    """A `kubetune.devcluster.queues.Queues`: creates ResourceFlavors, ClusterQueues,
    LocalQueues and WorkloadPriorityClasses, reads a Job's Workload, and deletes
    what it created after the test."""
    from kubetune.devcluster.queues import Queues

    queues = Queues(cluster.api_client())
    yield queues
    queues.cleanup()


@dataclass
class Helm:
    """Helm (kubetune.devcluster.versions.HELM) with the session's own config,
    cache and data directories, so no user setting or repository leaks in."""

    binary: Path
    home: Path

    def __call__(self, *args: str, kubeconfig: Path | None = None, check: bool = True,
                 timeout: float = 120) -> subprocess.CompletedProcess:
        env = {**os.environ, **{f"HELM_{kind}_HOME": str(self.home / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")}}
        env.pop("KUBECONFIG", None)
        argv = [str(self.binary), *args, *([f"--kubeconfig={kubeconfig}"] if kubeconfig else [])]
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
        return result


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Helm:
    """Helm, built from Go modules on first use (about a minute cold) and then
    cached under the harness's bin directory like the control plane and Kueue."""
    from kubetune.devcluster import build

    try:
        binary = build.ensure_built(wanted=[build.HELM])["helm"]
    except (build.GoMissingError, build.BuildError) as error:
        pytest.fail(f"helm could not be built: {error}", pytrace=False)  # never skip, as for `cluster`
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on loopback: `.endpoint_url`, `.client` (boto3, path-style, dummy credentials)."""
    from kubetune.devcluster.s3server import start_s3_server

    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()
