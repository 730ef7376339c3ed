"""Pure builder of fake GPU nodes that kwok manages (no kubelet behind them)."""

from __future__ import annotations

from kubetune.devcluster.commandlines import FAKE_NODE_ANNOTATION, FAKE_NODE_VALUE

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
DEFAULT_GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
# The taint GPU node pools carry so that only pods asking for GPUs land there.
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}


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
                GPU_PRODUCT_LABEL: product,
                **(labels or {}),
            },
        },
        "spec": {"taints": [GPU_TAINT] if tainted else []},
        "status": {"capacity": resources, "allocatable": resources},
    }


def gpu_toleration() -> dict:
    """The toleration a pod needs to run on `gpu_node`s."""
    return {"key": GPU_TAINT["key"], "operator": "Exists", "effect": GPU_TAINT["effect"]}
