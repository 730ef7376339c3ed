"""The API server is real: CRDs, structural schemas and CEL validation, authentication."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
import uuid

import pytest
import yaml

from kubetune.devcluster import versions
from kubetune.devcluster.cluster import wait_for

pytestmark = pytest.mark.cluster

GROUP = "test.kubetune.io"
CEL_MESSAGE = "minReplicas must not exceed maxReplicas"


def widget_crd(plural: str) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1], "kind": plural[:-1].capitalize()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["minReplicas", "maxReplicas"],
                                    "properties": {
                                        "minReplicas": {"type": "integer", "minimum": 0},
                                        "maxReplicas": {"type": "integer"},
                                    },
                                    "x-kubernetes-validations": [
                                        {"rule": "self.minReplicas <= self.maxReplicas", "message": CEL_MESSAGE}
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture
def widgets(cluster):
    """A freshly applied (via kubectl) and Established CRD; returns (plural, kind)."""
    from kubernetes import client

    plural = f"widget{uuid.uuid4().hex[:6]}s"
    crd = widget_crd(plural)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(crd))
    ext = client.ApiextensionsV1Api(cluster.api_client())

    def established():
        conditions = ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_for(f"CRD {plural} Established", established, timeout=30)
    yield plural, crd["spec"]["names"]["kind"]
    ext.delete_custom_resource_definition(crd["metadata"]["name"])


def test_custom_resource_round_trip_and_cel_rejection(cluster, namespace, widgets):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    plural, kind = widgets
    custom = client.CustomObjectsApi(cluster.api_client())

    def widget(name, low, high):
        return {"apiVersion": f"{GROUP}/v1", "kind": kind, "metadata": {"name": name},
                "spec": {"minReplicas": low, "maxReplicas": high}}

    # The CRD may be Established a moment before its REST endpoint serves.
    created = wait_for(
        "custom resource endpoint",
        lambda: _try_create(custom, namespace, plural, widget("good", 1, 3)),
        timeout=20,
    )
    assert created["spec"] == {"minReplicas": 1, "maxReplicas": 3}
    listed = cluster.kubectl("get", plural, "-n", namespace, "-o", "name").stdout.split()
    assert listed == [f"{plural[:-1]}.{GROUP}/good"]

    with pytest.raises(ApiException) as rejected:
        custom.create_namespaced_custom_object(GROUP, "v1", namespace, plural, widget("bad", 5, 2))
    assert rejected.value.status == 422
    assert CEL_MESSAGE in rejected.value.body

    # The OpenAPI part of the schema is enforced too.
    with pytest.raises(ApiException) as negative:
        custom.create_namespaced_custom_object(GROUP, "v1", namespace, plural, widget("neg", -1, 2))
    assert negative.value.status == 422
    assert "spec.minReplicas" in negative.value.body


def _try_create(custom, namespace, plural, body):
    from kubernetes.client.rest import ApiException

    try:
        return custom.create_namespaced_custom_object(GROUP, "v1", namespace, plural, body)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def test_server_version_and_authentication(cluster):
    version = yaml.safe_load(cluster.kubectl("version", "-o", "yaml").stdout)
    assert version["serverVersion"]["gitVersion"] == versions.KUBERNETES
    # No client certificate, no token: the API server refuses to say who we are.
    context = ssl.create_default_context(cafile=str(cluster.ca_cert))
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{cluster.server}/api/v1/namespaces", context=context, timeout=5)
    assert anonymous.value.code == 401


def test_every_component_logs_to_its_own_file(cluster):
    logs = {p.name: p.read_text(errors="replace").splitlines() for p in (cluster.plane.run_dir / "logs").iterdir()}
    for component in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"):
        lines = logs[f"{component}.log"]
        # The harness writes the command line first; the component's own output follows.
        assert lines[0].startswith("$ ") and component in lines[0]
        assert len(lines) > 1, f"{component} wrote nothing to its log"


def test_pod_security_restricted_is_enforced_in_test_namespaces(cluster, namespace):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(cluster.api_client())
    root_pod = {
        "metadata": {"name": "root"},
        "spec": {"containers": [{"name": "main", "image": "busybox", "securityContext": {"privileged": True}}]},
    }
    with pytest.raises(ApiException) as rejected:
        core.create_namespaced_pod(namespace, root_pod)
    assert rejected.value.status == 403
    message = json.loads(rejected.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest"' in message and "privileged" in message
