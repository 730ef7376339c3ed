"""Pure builders of fake nodes that kwok manages (no kubelet behind them): GPU
machines (tainted, as GPU node pools are) and CPU-only machines (untainted),
where pods that ask for no GPU and carry no GPU toleration schedule."""

from __future__ import annotations

from kubetune.devcluster.commandlines import FAKE_NODE_ANNOTATION, FAKE_NODE_VALUE

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
DEFAULT_GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
# The taint GPU node pools carry so that only pods asking for GPUs land there.
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
# Which pool a fake node belongs to (like a cloud's node-pool label).
POOL_LABEL = "kubetune.io/node-pool"


def _node(name: str, resources: dict[str, str], labels: dict[str, str], taints: list[dict]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION: FAKE_NODE_VALUE},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                **labels,
            },
        },
        "spec": {"taints": taints},
        "status": {"capacity": resources, "allocatable": resources},
    }


def gpu_node(
    name: str,
    gpus: int = 8,
    product: str = DEFAULT_GPU_PRODUCT,
    cpu: str = "96",
    memory: str = "1Ti",
    labels: dict[str, str] | None = None,
    tainted: bool = True,
) -> dict:
    """A Node manifest for a fake GPU machine; kwok marks it Ready within a second."""
    if gpus < 0:
        raise ValueError(f"gpus must be >= 0, got {gpus}")
    resources = {"cpu": cpu, "memory": memory, "pods": "110", GPU_RESOURCE: str(gpus)}
    node_labels = {POOL_LABEL: "gpu", GPU_PRODUCT_LABEL: product, **(labels or {})}
    return _node(name, resources, node_labels, [GPU_TAINT] if tainted else [])


def cpu_node(name: str, cpu: str = "32", memory: str = "128Gi", labels: dict[str, str] | None = None) -> dict:
    """A Node manifest for a fake CPU-only machine: no GPUs and no taint, so the
    pods of CPU stages (validate, merge) schedule there without a toleration."""
    resources = {"cpu": cpu, "memory": memory, "pods": "110"}
    return _node(name, resources, {POOL_LABEL: "cpu", **(labels or {})}, [])


def gpu_toleration() -> dict:
    """The toleration a pod needs to run on `gpu_node`s."""
    return {"key": GPU_TAINT["key"], "operator": "Exists", "effect": GPU_TAINT["effect"]}
