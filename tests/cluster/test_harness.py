"""Starting and stopping a control plane leaves nothing behind."""

from __future__ import annotations

import socket

import pytest

from kubetune.devcluster import controlplane, processes
from kubetune.devcluster.cluster import Cluster

pytestmark = pytest.mark.cluster


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_second_control_plane_starts_beside_the_first_survives_an_apiserver_restart_and_stops_cleanly(cluster, tmp_path):
    # Uses the session cluster's binaries (already built) and its own free ports.
    plane = controlplane.start(run_dir=tmp_path / "run", binaries=cluster.plane.binaries, log=lambda m: None)
    try:
        ports = plane.layout.ports
        assert set(plane.pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}
        assert plane.server != cluster.server
        assert _listening(ports.apiserver) and _listening(ports.etcd_client)

        second = Cluster(plane)
        second.kubectl("create", "configmap", "survivor", "--from-literal=k=v")
        old_pid = plane.pids["kube-apiserver"]
        plane.kill("kube-apiserver")
        assert not _listening(ports.apiserver)
        assert second.kubectl("get", "configmap", "survivor", check=False, timeout=20).returncode != 0
        plane.restart("kube-apiserver")
        assert plane.pids["kube-apiserver"] != old_pid
        assert second.kubectl("get", "configmap", "survivor", "-o", "jsonpath={.data.k}").stdout == "v"
        pids = dict(plane.pids)
    finally:
        plane.stop()
    assert not any(processes.is_alive(pid) for pid in pids.values())
    assert not _listening(ports.apiserver) and not _listening(ports.etcd_client)
    assert not (tmp_path / "run" / "state.json").exists()


def test_a_component_that_cannot_start_fails_start_with_its_log(cluster, tmp_path):
    binaries = {**cluster.plane.binaries, "kube-apiserver": cluster.plane.binaries["etcd"]}
    with pytest.raises(controlplane.StartError) as failed:
        controlplane.start(run_dir=tmp_path / "run", binaries=binaries, log=lambda m: None)
    # etcd does not know the API server's flags: it exits, and its output is in the error.
    message = str(failed.value)
    assert "kube-apiserver exited" in message
    assert "----- kube-apiserver" in message
