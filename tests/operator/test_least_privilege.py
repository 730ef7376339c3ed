"""Least privilege, proven on the wire: the operator runs a whole job under the
chart's ClusterRole (kubetune.operator.rbac.RULES) through a recording proxy
that sees every API request it makes, and

- every verb the ClusterRole grants is one the operator used, or one the API
  server checks without a request of that verb (each such case named below,
  with the code that makes it necessary);
- no Secret value it was given by reference appears in any object of the
  job's namespace, nor in the operator's log.

The run covers what the operator does to a job: a queued job (Kueue running:
the LocalQueue pre-flight; no quota at first, so it reads the Workload to say why it waits) with S3 credentials and a serving API key from
Secrets, from validation to serving; a recipe edit, whose new revision
replaces the old one's children (the operator deletes those); and deletion
with `output.deleteOnJobDeletion` (the cleanup Job, kopf's finalizer). It runs
as `kubetune operator --namespace ...`, as the tests and a namespaced chart
install do; the cluster-wide mode only drops the namespace list/watch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs

import pytest
import yaml

from kubetune.devcluster.cluster import RESTRICTED_LABELS, wait_for
from kubetune.devcluster.processes import free_ports
from kubetune.devcluster.queues import Queues
from kubetune.operator import adapter_servers, children, job_rbac, pods, rbac
from kubetune.operator.api import FineTuneJob
from kubetune.operator.api.adapterserver import AdapterServerSpec
from kubetune.operator.settings import OperatorSettings

from .ftj import GROUP, PLURAL, Api, body, condition

KUBETUNE = Path(sys.executable).with_name("kubetune")

Grant = tuple[str, str, str]  # (API group, resource[/subresource], verb)


# ---------------------------------------------------------------- a proxy that records every request


def request_info(method: str, path: str, query: str) -> Optional[Grant]:
    """What RBAC checks for a request (the API server's RequestInfo); None for
    discovery and other non-resource paths, which every authenticated user may read."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if not rest:
        return None
    if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
        rest = rest[2:]  # a namespaced resource: <resource>[/<name>[/<subresource>]]
    resource = rest[0] if len(rest) < 3 else f"{rest[0]}/{rest[2]}"
    named = len(rest) >= 2
    if method == "GET":
        verb = "watch" if parse_qs(query).get("watch", [""])[0] in ("true", "1") else "get" if named else "list"
    elif method == "DELETE":
        verb = "delete" if named else "deletecollection"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}[method]
    return group, resource, verb


_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te", "trailer"}


@dataclass
class RecordingProxy:
    """Plain HTTP on loopback in front of the API server's TLS; streams responses (watches)."""

    upstream: str
    ca_cert: Path
    seen: list[tuple[str, str, str, int]] = field(default_factory=list)  # method, path, query, status

    def start(self) -> int:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        return asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> int:
        import aiohttp
        from aiohttp import web

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(self.ca_cert))),
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a watch the operator closes ends its upstream request too.
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return self.runner.addresses[0][1]

    async def _handle(self, request):
        import aiohttp
        from aiohttp import web

        data = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self.session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                        data=data or None) as up:
            self.seen.append((request.method, request.path, request.query_string, up.status))
            resp = web.StreamResponse(status=up.status,
                                      headers={k: v for k, v in up.headers.items() if k.lower() not in _HOP})
            await resp.prepare(request)
            try:
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
            except (ConnectionResetError, aiohttp.ClientError):
                pass  # the operator closed a watch, or the proxy is stopping
            return resp

    def stop(self) -> None:
        async def close():
            await self.session.close()  # ends the watches still open upstream
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


# ---------------------------------------------------------------- one recorded run


@dataclass
class Run:
    namespace: str
    secret_values: list[str]
    objects: dict[str, list[dict]]  # every object of the namespace, by resource, while the job served
    log: str
    seen: list[tuple[str, str, str, int]]


def _operator(kubeconfig: Path, namespace: str, log_path: Path) -> tuple[subprocess.Popen, int]:
    """`kubetune operator`, as tests/operator/conftest.py starts it, with another kubeconfig."""
    metrics_port, health_port = free_ports(2)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")},
        "KUBECONFIG": str(kubeconfig),
        "KUBETUNE_RECONCILE_INTERVAL": "0.5",
        "KUBETUNE_METRICS_PORT": str(metrics_port),
        "KUBETUNE_TRAINER_IMAGE": "registry.test/kubetune:test",
        "KUBETUNE_VLLM_IMAGE": "registry.test/vllm:test",
        "KUBETUNE_WATCH_SERVER_TIMEOUT": "60",
        "KUBETUNE_WATCH_CLIENT_TIMEOUT": "90",
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(KUBETUNE), "operator", "--namespace", namespace, "--liveness", f"http://127.0.0.1:{health_port}/healthz"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, health_port


def _healthy(proc: subprocess.Popen, port: int, log_path: Path) -> bool:
    import urllib.request

    if proc.poll() is not None:
        raise RuntimeError(f"operator exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _everything(api: Api, namespace: str) -> dict[str, list[dict]]:
    """Every object of every listable namespaced resource (discovery), as JSON."""
    from kubernetes import client

    out: dict[str, list[dict]] = {}
    groups = [("", "v1")] + [(g.name, g.preferred_version.version)
                             for g in client.ApisApi(api.api).get_api_versions().groups]
    for group, version in groups:
        base = "/api/v1" if not group else f"/apis/{group}/{version}"
        listing = json.loads(_get(api, base))
        for res in listing.get("resources", []):
            if "/" in res["name"] or not res.get("namespaced") or "list" not in res.get("verbs", []):
                continue
            items = json.loads(_get(api, f"{base}/namespaces/{namespace}/{res['name']}")).get("items", [])
            out[f"{group or 'core'}/{res['name']}"] = items
    return out


def _get(api: Api, path: str) -> str:
    method, url, headers, payload, post = api.api.param_serialize(
        method="GET", resource_path=path, header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
    resp = api.api.call_api(method, url, header_params=headers)
    resp.read()
    assert resp.status == 200, (path, resp.status, resp.data[:500])
    return resp.data.decode()


@pytest.fixture(scope="module")
def recorded(cluster, crd, kueue, gateway_api, operator_kubeconfig, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("least-privilege")
    proxy = RecordingProxy(cluster.server, cluster.ca_cert)
    port = proxy.start()
    # The operator's own identity (a token of the ServiceAccount bound to the chart's
    # ClusterRole), talking to the proxy instead of the API server.
    config = yaml.safe_load(operator_kubeconfig.read_text())
    config["clusters"][0]["cluster"] = {"server": f"http://127.0.0.1:{port}"}
    kubeconfig = tmp / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))

    namespace = cluster.create_namespace("lp", labels=RESTRICTED_LABELS)
    nodes = [cluster.create_gpu_node(gpus=0, tainted=False, product="none"), cluster.create_gpu_node(gpus=8)]
    queues = Queues(cluster.api_client())
    proc = None
    try:
        # No GPU quota at first: the job waits in Kueue, and the operator reads its Workload to say why
        # (the Workload list); the quota is raised once the job says so.
        cq = queues.cluster_queue(queues.resource_flavor("lp"), gpus=0)
        queues.local_queue(namespace, cq)
        api = Api(cluster, namespace)
        # Distinctive values, and the operator only ever gets the Secrets' names.
        canary = [f"kubetune-canary-{uuid.uuid4().hex}" for _ in range(3)]
        api.core.create_namespaced_secret(namespace, {"metadata": {"name": "s3-creds"}, "stringData": {
            "AWS_ACCESS_KEY_ID": canary[0], "AWS_SECRET_ACCESS_KEY": canary[1]}})
        api.core.create_namespaced_secret(namespace, {"metadata": {"name": "vllm-key"}, "stringData": {"api-key": canary[2]}})

        log_path = tmp / "operator.log"
        proc, health = _operator(kubeconfig, namespace, log_path)
        wait_for("operator liveness endpoint", lambda: _healthy(proc, health, log_path), timeout=60, interval=0.3)

        api.create(body(
            "lp", resources={"queueName": "queue"},
            storage={"endpointUrl": "http://s3.test:9000", "region": "us-east-1", "credentialsSecretRef": {"name": "s3-creds"}},
            # With an autoscaler, later switched off: the HPA is applied (patch), then deleted.
            serving={"apiKeySecretRef": {"name": "vllm-key"}, "autoscaling": {"maxReplicas": 2},
                     # The recipe edit below rolls out through a canary (HTTPRoute, canary Deployment and Service).
                     "canary": {"gateway": {"name": "public"}, "weight": 10, "durationSeconds": 0}},
            output={"uri": "s3://artifacts/lp/", "deleteOnJobDeletion": True},
        ))
        queued = api.wait_queued("lp", "Kueue: ")
        assert condition(queued, "Trained")["message"].startswith("Kueue: ")
        queues.set_gpu_quota(cq, 8)
        api.wait_phase("lp", "Serving", timeout=180)
        first = api.rev("lp")
        # A recipe edit: a new revision, whose children replace the first one's once it serves.
        api.patch("lp", {"spec": {"training": {"learningRate": 0.0001}, "serving": {"autoscaling": None}}})
        second = api.rev("lp")
        assert second != first
        wait_for("second revision serving", lambda: api.status("lp").get("servingRevision") == second
                 and api.status("lp").get("phase") == "Serving", timeout=180, interval=0.5)
        wait_for("first revision's Jobs deleted", lambda: not [
            j for j in api.jobs("lp") if j["metadata"]["labels"].get("kubetune.io/revision") == first], timeout=60)
        # Adapter mode: the job joins a shared server (its entry applied under its own field manager; the
        # server's children applied and its status written by the server pass). Then serving off: the job
        # leaves, the server left without adapters is deleted, and so is the merged-mode server.
        assert (api.status("lp").get("canary") or {}).get("state") == "Promoted"
        api.patch("lp", {"spec": {"serving": {"mode": "adapter", "canary": None}}})  # the route goes
        wait_for("adapter server up", lambda: [s for s in api.custom.list_namespaced_custom_object(
            GROUP, "v1alpha1", namespace, "adapterservers")["items"] if (s.get("status") or {}).get("adapterCount") == 1
            and s["status"].get("conditions")], timeout=120, interval=0.5)
        objects = _everything(api, namespace)
        api.patch("lp", {"spec": {"serving": {"enabled": False}}})
        wait_for("servers retired", lambda: not api.custom.list_namespaced_custom_object(
            GROUP, "v1alpha1", namespace, "adapterservers")["items"] and not api.apps.list_namespaced_deployment(
            namespace).items, timeout=120, interval=0.5)
        # Deletion: the cleanup Job empties the output, then kopf's finalizer goes.
        api.delete("lp")
        wait_for("lp deleted", lambda: not api.custom.list_namespaced_custom_object(GROUP, "v1alpha1", namespace, PLURAL)["items"],
                 timeout=120, interval=0.5)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        proxy.stop()
        queues.cleanup()
        for node in nodes:
            cluster.delete_node(node)
        cluster.delete_namespace(namespace)
    yield Run(namespace, canary, objects, log_path.read_text(errors="replace"), list(proxy.seen))


# ---------------------------------------------------------------- the ClusterRole, verb by verb


def granted() -> set[Grant]:
    return {(g, r, v) for rule in rbac.RULES for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def checked_without_a_request() -> dict[Grant, str]:
    """Verbs the API server checks on the operator's behalf, with no request of that verb:
    each derived from the code that makes it necessary."""
    needs: dict[Grant, str] = {}
    # RBAC escalation prevention: creating the per-job Role needs every permission it grants.
    for rule in job_rbac.trainer_role_rules("x"):
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    needs[(g, r, v)] = "the per-job Role grants it (operator/job_rbac.py: trainer_role_rules)"
    # Server-side apply of an object that does not exist yet creates it, and the API
    # server authorizes that as create (besides the request's own patch).
    for k in children.KINDS:
        if k.applied:
            needs[(k.group, k.plural, "create")] = "server-side apply creates it (children.KINDS: applied)"
    # OwnerReferencesPermissionEnforcement (OpenShift and hardened clusters enable it): an
    # ownerReference with blockOwnerDeletion needs update on the owner's finalizers.
    job = FineTuneJob.from_body(body("x") | {"metadata": {"name": "x", "namespace": "n", "uid": "u"}})
    if pods.owner_reference(job).get("blockOwnerDeletion"):
        needs[(GROUP, f"{PLURAL}/finalizers", "update")] = "children set blockOwnerDeletion (operator/pods.py: owner_reference)"
    # The shared adapter server's loader Role: the operator creates it, so it must hold what it grants.
    server = {"metadata": {"name": "x", "namespace": "n", "uid": "u"}, "spec": {"baseModel": "s3://models/x/"}}
    spec = AdapterServerSpec.model_validate(server["spec"])
    for obj in adapter_servers.loader_rbac(server, spec):
        for rule in obj.get("rules") or []:
            for g in rule["apiGroups"]:
                for r in rule["resources"]:
                    for v in rule["verbs"]:
                        needs[(g, r, v)] = "the adapter loader's Role grants it (operator/adapter_servers.py: loader_rbac)"
    # The server's children block its deletion like a job's do.
    if any(r.get("blockOwnerDeletion") for r in adapter_servers.server_objects(
            {**server, "spec": {**server["spec"], "adapters": []}}, OperatorSettings())[0]["metadata"]["ownerReferences"]):
        needs[(GROUP, "adapterservers/finalizers", "update")] = "server children set blockOwnerDeletion (adapter_servers._metadata)"
    return needs


def used(run: Run) -> dict[Grant, int]:
    out: dict[Grant, int] = {}
    for method, path, query, _ in run.seen:
        info = request_info(method, path, query)
        if info is not None:
            out[info] = out.get(info, 0) + 1
    return out


def test_the_operator_was_refused_nothing(recorded):
    refused = [(m, p, q) for m, p, q, status in recorded.seen if status in (401, 403)]
    assert not refused, refused
    outside = set(used(recorded)) - granted()
    assert not outside, f"requests outside the ClusterRole: {sorted(outside)}"


def test_every_verb_the_cluster_role_grants_is_used(recorded):
    observed = used(recorded)
    implicit = checked_without_a_request()
    unused = sorted(granted() - set(observed) - set(implicit))
    assert not unused, (
        "the operator's ClusterRole (operator/rbac.py RULES, children rules from operator/children.py) grants "
        f"verbs the operator never used in a whole job's life: {unused}\nused: {sorted(observed)}"
    )


def test_a_namespaced_install_grants_exactly_what_the_operator_did_in_and_outside_its_namespace(recorded):
    """The chart with watchNamespaces splits RULES by scope (rbac.CLUSTER_SCOPED): a Role in
    each watched namespace, the rest in a small ClusterRole. The run above is such an
    operator (`--namespace`): what it did inside its namespace is all in the Role's rules,
    what it did outside (cluster-scoped requests) is all in the ClusterRole's, and it used
    every cluster-wide grant."""
    def grants_of(rules) -> set[Grant]:
        return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}

    inside, outside = set(), set()
    for method, path, query, _ in recorded.seen:
        info = request_info(method, path, query)
        if info is not None:
            (inside if f"/namespaces/{recorded.namespace}/" in path + "/" and info[1] != "namespaces" else outside).add(info)
    assert inside and outside
    assert inside <= grants_of(rbac.namespaced_rules()), sorted(inside - grants_of(rbac.namespaced_rules()))
    assert outside <= grants_of(rbac.cluster_scoped_rules()), sorted(outside - grants_of(rbac.cluster_scoped_rules()))
    assert outside == grants_of(rbac.cluster_scoped_rules()), sorted(grants_of(rbac.cluster_scoped_rules()) - outside)


def test_the_request_mapping_follows_the_api_servers_rules():
    assert request_info("GET", "/api/v1/namespaces/ns/pods", "labelSelector=a") == ("", "pods", "list")
    assert request_info("GET", "/api/v1/namespaces/ns/pods", "watch=true") == ("", "pods", "watch")
    assert request_info("GET", "/api/v1/namespaces/ns", "") == ("", "namespaces", "get")
    assert request_info("GET", "/api/v1/namespaces", "watch=1") == ("", "namespaces", "watch")
    assert request_info("PATCH", "/apis/kubetune.io/v1alpha1/namespaces/ns/finetunejobs/x/status", "") == \
        ("kubetune.io", "finetunejobs/status", "patch")
    assert request_info("DELETE", "/apis/batch/v1/namespaces/ns/jobs/x", "") == ("batch", "jobs", "delete")
    assert request_info("POST", "/api/v1/namespaces/ns/events", "") == ("", "events", "create")
    assert request_info("GET", "/apis/kueue.x-k8s.io", "") is None  # discovery
    assert request_info("GET", "/apis/kubetune.io/v1alpha1/tenantpolicies", "") == ("kubetune.io", "tenantpolicies", "list")


# ---------------------------------------------------------------- Secrets stay in Secrets


def test_no_secret_value_appears_in_any_object_or_the_operator_log(recorded):
    needles = {v: [v, base64.b64encode(v.encode()).decode()] for v in recorded.secret_values}
    ours = {"s3-creds", "vllm-key"}
    scanned = 0
    for resource, items in recorded.objects.items():
        for obj in items:
            if resource == "core/secrets" and obj["metadata"]["name"] in ours:
                continue
            text = json.dumps(obj)
            scanned += 1
            for value, forms in needles.items():
                assert not any(f in text for f in forms), f"{resource} {obj['metadata']['name']} holds a Secret's value"
    # What was scanned is what the operator made: its children of both revisions were there.
    kinds = {r for r, items in recorded.objects.items() if any(
        (o["metadata"].get("labels") or {}).get("kubetune.io/job") == "lp" for o in items)}
    assert {"batch/jobs", "apps/deployments", "core/services", "core/configmaps", "core/serviceaccounts",
            "rbac.authorization.k8s.io/roles", "rbac.authorization.k8s.io/rolebindings", "core/pods"} <= kinds, kinds
    assert recorded.objects["core/events"] and scanned > 20
    # The pods reference the Secrets by name, which is how the values reach the containers.
    deployment = next(o for o in recorded.objects["apps/deployments"] if o["metadata"]["name"].startswith("lp"))
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "vllm-key", "key": "api-key"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert recorded.log and not any(f in recorded.log for forms in needles.values() for f in forms)
