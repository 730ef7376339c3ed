"""Fixtures shared by the Kueue tests (the `kueue` and `kueue_queues` fixtures
themselves live in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def apis(cluster):
    from kubernetes import client

    api = cluster.api_client()
    return client.CoreV1Api(api), client.BatchV1Api(api)


@pytest.fixture
def gpu_queue(kueue_queues, namespace):
    """A ResourceFlavor, a ClusterQueue with 8 GPUs and the LocalQueue `queue` in the test namespace."""
    flavor = kueue_queues.resource_flavor("gpu")
    cluster_queue = kueue_queues.cluster_queue(flavor, gpus=8)
    kueue_queues.local_queue(namespace, cluster_queue)
    return {"flavor": flavor, "cluster_queue": cluster_queue, "queue": "queue"}
