"""kube-controller-manager is really running: garbage collection, namespace
deletion, service-account tokens; RBAC is really enforced."""

from __future__ import annotations

import json

import pytest

from kubetune.devcluster.cluster import wait_for
from kubetune.devcluster.jobs import gpu_job, job_pods

pytestmark = pytest.mark.cluster


def _gone(read) -> bool:
    from kubernetes.client.rest import ApiException

    try:
        read()
    except ApiException as error:
        if error.status == 404:
            return True
        raise
    return False


def test_deleting_an_owner_garbage_collects_its_children(cluster, namespace):
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    for index in range(3):
        core.create_namespaced_config_map(
            namespace, {"metadata": {"name": f"child-{index}", "ownerReferences": [reference]}}
        )
    bystander = core.create_namespaced_config_map(namespace, {"metadata": {"name": "bystander"}})

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    for index in range(3):
        wait_for(f"child-{index} collected", lambda i=index: _gone(lambda: core.read_namespaced_config_map(f"child-{i}", namespace)), timeout=30)
    assert core.read_namespaced_config_map("bystander", namespace).metadata.uid == bystander.metadata.uid


def test_namespace_with_a_running_pod_finishes_deleting(cluster, gpu_nodes):
    from kubernetes import client

    api = cluster.api_client()
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    gpu_nodes()
    name = cluster.create_namespace("doomed")
    core.create_namespaced_config_map(name, {"metadata": {"name": "data"}})
    batch.create_namespaced_job(name, gpu_job("long", annotations={"kwok.kubetune.io/run-duration": "1h"}))
    wait_for(
        "pod Running",
        lambda: any(p.status.phase == "Running" for p in job_pods(core, name, "long")),
        timeout=30,
    )

    cluster.delete_namespace(name)
    assert core.read_namespace(name).status.phase == "Terminating"
    wait_for(f"namespace {name} deleted", lambda: _gone(lambda: core.read_namespace(name)), timeout=60)


def test_unprivileged_service_account_is_forbidden(cluster, namespace):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "nobody"}})
    token = core.create_namespaced_service_account_token(
        "nobody", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    as_nobody = cluster.token_client(token)

    # The token authenticates (so a 403 below is RBAC's answer, not a login failure).
    review = client.AuthenticationV1Api(as_nobody).create_self_subject_review({})
    assert review.status.user_info.username == f"system:serviceaccount:{namespace}:nobody"

    with pytest.raises(ApiException) as denied:
        client.CoreV1Api(as_nobody).list_namespaced_secret(namespace)
    assert denied.value.status == 403
    message = json.loads(denied.value.body)["message"]
    assert f'User "system:serviceaccount:{namespace}:nobody" cannot list resource "secrets"' in message

    # Granting exactly that permission flips the answer: RBAC, not something else, said no.
    rbac = client.RbacAuthorizationV1Api(cluster.api_client())
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "read-secrets"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}],
    })
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "nobody-reads-secrets"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-secrets"},
        "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": namespace}],
    })
    wait_for("RoleBinding in effect", lambda: _can_list_secrets(client.CoreV1Api(as_nobody), namespace), timeout=20)
    with pytest.raises(ApiException) as still_denied:
        client.CoreV1Api(as_nobody).list_namespaced_config_map(namespace)
    assert still_denied.value.status == 403


def _can_list_secrets(core, namespace) -> bool:
    from kubernetes.client.rest import ApiException

    try:
        core.list_namespaced_secret(namespace)
    except ApiException as error:
        if error.status == 403:
            return False
        raise
    return True


def test_controller_manager_publishes_root_ca_and_default_service_account(cluster, namespace):
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    root_ca = wait_for(
        "kube-root-ca.crt", lambda: core.list_namespaced_config_map(namespace, field_selector="metadata.name=kube-root-ca.crt").items, timeout=20
    )
    assert root_ca[0].data["ca.crt"] == cluster.ca_cert.read_text()
    assert core.read_namespaced_service_account("default", namespace).metadata.name == "default"
