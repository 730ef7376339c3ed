"""Versions of the control-plane components: the one place to change them.

Kubernetes is built from the `k8s.io/kubernetes` Go module; its staging
modules are published as `v0.<minor>.<patch>` twins of `v1.<minor>.<patch>`.
"""

KUBERNETES = "v1.36.3"
ETCD = "v3.6.16"
KWOK = "v0.8.0"
# Kueue's controller manager (sigs.k8s.io/kueue/cmd/kueue), started on demand by
# the `kueue` test fixture. v0.17 serves kueue.x-k8s.io/v1beta2 (v1beta1 still
# served, through Kueue's conversion webhook) and was built against k8s 1.35
# client libraries: one minor behind the API server, inside client-go's skew.
KUEUE = "v0.17.0"
# Helm (helm.sh/helm/v3/cmd/helm), built on demand by the `helm` test fixture for
# the chart's tests (lint, template, install into the test control plane).
HELM = "v3.22.0"

# Binaries built from k8s.io/kubernetes/cmd/<name>.
KUBERNETES_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")


def staging_version(kubernetes_version: str) -> str:
    """`v1.36.3` -> `v0.36.3`, the version the staging modules are published under."""
    major, sep, rest = kubernetes_version.partition(".")
    if major != "v1" or not sep or not rest:
        raise ValueError(f"kubernetes version must look like v1.X.Y, got {kubernetes_version!r}")
    return "v0." + rest
# The Gateway API's CRDs (sigs.k8s.io/gateway-api, standard channel), installed by the `gateway_api`
# test fixture: serving.canary's HTTPRoute.
GATEWAY_API = "v1.5.0"
