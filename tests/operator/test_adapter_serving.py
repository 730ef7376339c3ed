"""Adapter mode on the real control plane: jobs on one base model share one vLLM server (an AdapterServer
fed by each job), which follows them as they come and go.

kwok runs the server's pods; nothing runs their containers. The loader sidecar is run here for real
(`adapter_loader.run_sidecar`, what `kubetune adapter-loader` runs in the pod), with a token of the
server's own ServiceAccount (so its Role is what is exercised), against a real HTTP stand-in of vLLM's
adapter routes and adapters published to a real S3 endpoint (moto).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kubetune.devcluster.cluster import wait_for
from kubetune.devcluster.processes import free_ports
from kubetune.operator import adapter_servers
from kubetune.operator.api import FineTuneJob
from kubetune.trainer import adapter_loader as loader
from kubetune.trainer import artifacts
from kubetune.trainer.storage import open_store, split_s3

from ..vllm_standin import FakeVllm
from .ftj import GROUP, VERSION, Api, body, condition, fleet

SERVERS = "adapterservers"


def adapter_job(name: str, s3, rank: int = 16, **spec) -> dict:
    return body(name, method={"type": "lora", "r": rank}, output={"merge": False},
                serving={"mode": "adapter", "cpu": "2", "memory": "8Gi"},
                storage={"endpointUrl": s3.endpoint_url, "region": "us-east-1"}, **spec)


def servers(api: Api) -> list[dict]:
    return api.custom.list_namespaced_custom_object(GROUP, VERSION, api.ns, SERVERS)["items"]


def server(api: Api, name: str) -> dict | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return api.custom.get_namespaced_custom_object(GROUP, VERSION, api.ns, SERVERS, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def vllm_flag(api: Api, name: str, flag: str) -> str | None:
    dep = api.raw(api.apps.read_namespaced_deployment, name, api.ns)
    command = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm")["command"]
    return command[command.index(flag) + 1] if flag in command else None


def publish_adapter(api: Api, name: str, s3, tmp: Path, weights: bytes = b"lora weights") -> str:
    """What the train stage publishes: the revision's adapter/ with its manifest."""
    uri = adapter_servers.adapter_uri(FineTuneJob.from_body(api.get(name)))
    src = tmp / name
    src.mkdir(parents=True, exist_ok=True)
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16}))
    (src / "adapter_model.safetensors").write_bytes(weights)
    bucket, prefix = split_s3(uri)
    artifacts.publish_dir(open_store(f"s3://{bucket}", endpoint_url=s3.endpoint_url), src, prefix.rstrip("/"))
    return uri


@pytest.fixture
def adapter_api(cluster, namespace, gpu_nodes, start_operator, s3, monkeypatch) -> Api:
    """An operator watching `namespace`, GPU nodes, and the artifacts bucket the adapters are published to
    (credentials in the environment, as a pod gets them from its Secret)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s3.client.create_bucket(Bucket="artifacts")
    fleet(gpu_nodes)
    start_operator(namespace)
    return Api(cluster, namespace)


def wait_server(api: Api, adapters: int) -> str:
    """The namespace's one server, once it carries `adapters` entries and has its Deployment."""
    wait_for(f"one server with {adapters} adapters", lambda: len(servers(api)) == 1
             and len(servers(api)[0]["spec"]["adapters"]) == adapters, timeout=180, interval=0.5)
    name = servers(api)[0]["metadata"]["name"]
    wait_for("server Deployment", lambda: api.apps.list_namespaced_deployment(
        api.ns, label_selector=f"{adapter_servers.LABEL_SERVER}={name}").items, timeout=60, interval=0.3)
    return name


class Sidecar:
    """The loader sidecar of the server's pod, as its ServiceAccount."""

    def __init__(self, cluster, api: Api, name: str, vllm: FakeVllm, s3, root: Path):
        from kubernetes import client

        account = adapter_servers.loader_account(name)
        token = api.core.create_namespaced_service_account_token(
            account, api.ns, {"spec": {"expirationSeconds": 3600}}).status.token
        self.server = loader.ServerObject(name, api.ns, api=client.CustomObjectsApi(cluster.token_client(token)))
        self.client = loader.VllmClient(vllm.url, attempts=2, backoff=0.0)
        self.root, self.s3 = root, s3
        self.probe = loader.Probe()
        (self.port,) = free_ports(1)
        self.probes = loader.serve_probes(self.probe, self.port, host="127.0.0.1")

    def run(self, passes: int = 1) -> None:
        loader.run_sidecar(self.server, self.client, self.root, self.probe, pod="srv-0",
                           endpoint_url=self.s3.endpoint_url, region="us-east-1", interval=0.0, passes=passes)

    def ready(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code

    def stop(self) -> None:
        self.probes.shutdown()


def test_jobs_on_one_base_model_share_one_server_that_follows_them(cluster, adapter_api, s3, tmp_path):
    api = adapter_api
    jobs = {"alpha": 8, "beta": 16, "gamma": 64}
    for name, rank in jobs.items():
        api.create(adapter_job(name, s3, rank=rank))

    # One server for the three (same base model and serving settings), owned by all three.
    name = wait_server(api, adapters=3)
    (srv,) = servers(api)
    assert sorted(r["name"] for r in srv["metadata"]["ownerReferences"]) == sorted(jobs)
    assert all(not r.get("controller") for r in srv["metadata"]["ownerReferences"])
    assert {a["name"]: a["rank"] for a in srv["spec"]["adapters"]} == jobs
    # Each entry is its own job's (server-side apply keeps the three managers' parts apart).
    managers = {m["manager"] for m in srv["metadata"]["managedFields"] if m["operation"] == "Apply"}
    assert managers == {f"kubetune-job-{api.get(j)['metadata']['uid']}" for j in jobs}

    # vLLM sized for them: 3 adapters -> 4 GPU slots, rank 64.
    # (eventually: the server pass that built the first Deployment may have seen fewer entries)
    wait_for("vLLM sized for three", lambda: vllm_flag(api, name, "--max-loras") == "4"
             and vllm_flag(api, name, "--max-lora-rank") == "64", timeout=60, interval=0.3)
    dep = api.raw(api.apps.read_namespaced_deployment, name, api.ns)
    pod = dep["spec"]["template"]["spec"]
    assert "--enable-lora" in next(c for c in pod["containers"] if c["name"] == "vllm")["command"]
    side = next(c for c in pod["containers"] if c["name"] == adapter_servers.LOADER_CONTAINER)
    assert {k: side["readinessProbe"]["httpGet"][k] for k in ("path", "port")} == {"path": "/ready", "port": "loader"}
    assert pod["automountServiceAccountToken"] is False  # only the sidecar mounts a token
    assert any(m["mountPath"] == adapter_servers.TOKEN_DIR for m in side["volumeMounts"])

    # Until the sidecar has loaded a job's adapter the job is not Serving.
    wait_for("jobs waiting for their adapters", lambda: all(
        condition(api.status(j), "Deployed")["reason"] == "LoadingAdapter" for j in jobs), timeout=120, interval=0.5)
    uris = {j: publish_adapter(api, j, s3, tmp_path / "src") for j in jobs}
    vllm = FakeVllm()
    sidecar = Sidecar(cluster, api, name, vllm, s3, tmp_path / "adapters")
    try:
        assert sidecar.ready() == 503
        sidecar.run()
        assert set(vllm.adapters) == set(jobs) and sidecar.ready() == 200
        for j in jobs:
            status = api.wait_phase(j, "Serving", timeout=60)
            assert status["endpoint"] == {"service": name, "model": j, "server": name,
                                          "url": f"http://{name}.{api.ns}.svc:8000/v1"}
            assert status["adapterServer"] == name
        reported = server(api, name)["status"]["adapters"]
        assert {j: (r["state"], r["uri"]) for j, r in reported.items()} == {j: ("Loaded", uris[j]) for j in jobs}

        # A restarted vLLM container comes back without adapters: not Ready until they are loaded again.
        vllm.adapters.clear()
        vllm.fail_next = 2  # and its engine is still starting during the first pass (both attempts)
        sidecar.run()
        assert sidecar.ready() == 503 and vllm.adapters == {}
        sidecar.run()
        assert set(vllm.adapters) == set(jobs) and sidecar.ready() == 200

        # Two jobs go: their owner references (garbage collector) and entries (operator) go, and the
        # server shrinks to one slot; the sidecar unloads their adapters.
        api.delete("alpha")
        api.delete("beta")
        wait_for("server down to one adapter", lambda: [a["name"] for a in server(api, name)["spec"]["adapters"]]
                 == ["gamma"] and vllm_flag(api, name, "--max-loras") == "1", timeout=120, interval=0.5)
        sidecar.run()
        assert set(vllm.adapters) == {"gamma"}
        wait_for("departed adapters leave the status", lambda: set(server(api, name)["status"]["adapters"])
                 == {"gamma"}, timeout=60, interval=0.5)
        assert api.status("gamma")["phase"] == "Serving"

        # The last job goes: so do the server and everything it owns.
        api.delete("gamma")
        wait_for("server deleted", lambda: server(api, name) is None, timeout=120, interval=0.5)
        wait_for("its Deployment deleted", lambda: not api.apps.list_namespaced_deployment(
            api.ns, label_selector=f"{adapter_servers.LABEL_SERVER}={name}").items, timeout=120, interval=0.5)
    finally:
        sidecar.stop()
        vllm.stop()


def test_a_tampered_adapter_fails_its_job_only_and_a_job_can_leave(cluster, adapter_api, s3, tmp_path):
    api = adapter_api
    for name in ("good", "bad"):
        api.create(adapter_job(name, s3))
    name = wait_server(api, adapters=2)
    publish_adapter(api, "good", s3, tmp_path / "src")
    uri = publish_adapter(api, "bad", s3, tmp_path / "src")
    bucket, prefix = split_s3(uri)
    s3.client.put_object(Bucket=bucket, Key=f"{prefix}adapter_model.safetensors", Body=b"poisoned")  # after its manifest
    vllm = FakeVllm()
    sidecar = Sidecar(cluster, api, name, vllm, s3, tmp_path / "adapters")
    try:
        sidecar.run()
        assert set(vllm.adapters) == {"good"} and sidecar.ready() == 200  # the other tenant is served
        status = api.wait_phase("bad", "Failed", timeout=60)
        deployed = condition(status, "Deployed")
        assert deployed["reason"] == "AdapterRefused" and "sha256 mismatch" in deployed["message"]
        assert status.get("endpoint") is None
        assert api.wait_phase("good", "Serving", timeout=60)["endpoint"]["model"] == "good"

        # "bad" stops serving (serving off): its entry and owner reference leave the server at once.
        api.patch("bad", {"spec": {"serving": {"enabled": False}}})
        wait_for("bad left the server", lambda: [a["name"] for a in server(api, name)["spec"]["adapters"]] == ["good"]
                 and "bad" not in [r["name"] for r in server(api, name)["metadata"]["ownerReferences"]],
                 timeout=60, interval=0.5)
        wait_for("bad's status forgets the server", lambda: api.status("bad").get("adapterServer") is None,
                 timeout=60, interval=0.5)
        assert api.status("good")["phase"] == "Serving"
    finally:
        sidecar.stop()
        vllm.stop()


def test_an_edit_swaps_the_adapter_in_place_and_a_revert_is_one_load(cluster, adapter_api, s3, tmp_path):
    api = adapter_api
    api.create(adapter_job("bot", s3))
    name = wait_server(api, adapters=1)
    first = api.rev("bot")
    first_uri = publish_adapter(api, "bot", s3, tmp_path / "src" / "first")
    vllm = FakeVllm()
    sidecar = Sidecar(cluster, api, name, vllm, s3, tmp_path / "adapters")
    try:
        sidecar.run()
        api.wait_phase("bot", "Serving", timeout=60)

        # An edit: the new revision trains while the first one's adapter serves under the job's name.
        api.patch("bot", {"spec": {"training": {"learningRate": 0.0001}}})
        second = api.rev("bot")
        wait_for("the new revision's entry on the server", lambda: server(api, name)["spec"]["adapters"][0]["uri"]
                 != first_uri, timeout=120, interval=0.3)
        status = api.status("bot")
        assert condition(status, "Ready")["status"] == "True" and status["servingRevision"] == first
        assert condition(status, "Promoted")["reason"] == "RolloutInProgress" and status["endpoint"]["model"] == "bot"
        second_uri = publish_adapter(api, "bot", s3, tmp_path / "src" / "second", weights=b"retrained")
        vllm.calls.clear()
        sidecar.run()
        # Loaded beside, checked, swapped in place, the staging name gone: "bot" never went missing.
        assert vllm.swaps() == [("load_lora_adapter", "bot--staging"), ("completion", "bot--staging"),
                                ("load_lora_adapter_inplace", "bot"), ("unload_lora_adapter", "bot--staging")]
        wait_for("second revision serving", lambda: api.status("bot").get("servingRevision") == second
                 and api.status("bot").get("phase") == "Serving", timeout=60, interval=0.3)
        line = server(api, name)["status"]["adapters"]["bot"]
        assert line["state"] == "Loaded" and line["uri"] == line["servedUri"] == second_uri

        # A revert: the first revision's adapter is loaded again (one swap), no Job is created.
        jobs_before = {j["metadata"]["name"] for j in api.jobs("bot")}
        api.patch("bot", {"spec": {"training": {"learningRate": None}}})
        assert api.rev("bot") == first
        wait_for("the first revision's entry again", lambda: server(api, name)["spec"]["adapters"][0]["uri"]
                 == first_uri, timeout=60, interval=0.3)
        vllm.calls.clear()
        sidecar.run()
        assert [c for c in vllm.swaps() if c[0].startswith("load")] == [("load_lora_adapter", "bot--staging"),
                                                                        ("load_lora_adapter_inplace", "bot")]
        wait_for("first revision serving again", lambda: api.status("bot").get("servingRevision") == first
                 and api.status("bot").get("phase") == "Serving", timeout=60, interval=0.3)
        assert not {j["metadata"]["name"] for j in api.jobs("bot")} - jobs_before
    finally:
        sidecar.stop()
        vllm.stop()
