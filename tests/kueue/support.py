"""Helpers shared by the Kueue tests (fixtures are in conftest.py)."""

from __future__ import annotations

from kubetune.devcluster.queues import condition

# Pod annotations read by kwok's Stages (kubetune/devcluster/kwok.yaml).
LONG = {"kwok.kubetune.io/run-duration": "1h"}  # holds its quota until the test deletes or preempts it
SHORT = {"kwok.kubetune.io/run-duration": "1s"}


def pending(workload) -> bool:
    """Kueue has looked at the Workload and said why it cannot reserve quota."""
    reserved = condition(workload, "QuotaReserved")
    return bool(reserved) and reserved["status"] == "False" and bool(reserved.get("message"))


def delete_job(batch, namespace: str, name: str) -> None:
    # Background: the Job goes at once, its pods and Workload follow through the garbage collector.
    batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
