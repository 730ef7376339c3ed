"""Blue/green between revisions on the real control plane (merged mode): an edit while serving, a
revision held back by its gate, a revert that serves an existing artifact again without training.

The Service's EndpointSlices are sampled from another thread through the whole switch: at every sample
they must hold a ready endpoint of the old or the new revision (kube-controller-manager's EndpointSlice
controller maintains them from the pods' readiness; kwok makes the pods Ready).
"""

from __future__ import annotations

import json
import threading
import time

from kubetune.contract.facts import LABEL_REVISION
from kubetune.devcluster.cluster import wait_for
from kubetune.operator import serving
from kubetune.operator.api import FineTuneJob

from .ftj import EVALUATE_OK, KWOK_MESSAGE, Api, body, condition, fleet, message

GATE_FAILED = {"stage": "evaluate", "ok": False, "reason": "GateFailed", "passed": False,
               "message": "held-out loss 2.0000 -> 2.1000 (-5.0%); gate failed", "baseLoss": 2.0, "tunedLoss": 2.1,
               "improvement": -0.05}


class EndpointSampler(threading.Thread):
    """Samples the Service's EndpointSlices and the serving pods' revisions until stopped."""

    def __init__(self, api: Api, service: str, job: str):
        super().__init__(daemon=True)
        from kubernetes import client

        self.discovery = client.DiscoveryV1Api(api.cluster.api_client())
        self.core = client.CoreV1Api(api.cluster.api_client())
        self.api, self.service, self.job = api, service, job
        self.samples: list[list[tuple[str, bool, str]]] = []  # [(pod, ready, revision)]
        self.revision_of: dict[str, str] = {}
        self.errors: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                for pod in self.core.list_namespaced_pod(
                        self.api.ns, label_selector=f"kubetune.io/job={self.job},kubetune.io/stage=serve").items:
                    self.revision_of.setdefault(pod.metadata.name, (pod.metadata.labels or {}).get(LABEL_REVISION, ""))
                slices = self.discovery.list_namespaced_endpoint_slice(
                    self.api.ns, label_selector=f"kubernetes.io/service-name={self.service}").items
                sample = []
                for s in slices:
                    for e in s.endpoints or []:
                        name = e.target_ref.name if e.target_ref else ""
                        sample.append((name, bool(e.conditions and e.conditions.ready), self.revision_of.get(name, "")))
                self.samples.append(sample)
            except Exception as e:  # noqa: BLE001 - recorded, and the test fails on it
                self.errors.append(repr(e))
            time.sleep(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def merged_uri(api: Api, name: str) -> str:
    dep = api.raw(api.apps.read_namespaced_deployment, f"{name}-serve", api.ns)
    command = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    return command[2]  # vllm serve <model>


def test_an_edit_rolls_out_blue_green_a_failed_gate_is_held_back_and_a_revert_needs_no_training(
        cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace)
    api.create(body("bot"))
    api.wait_phase("bot", "Serving", timeout=120)
    first = api.rev("bot")
    first_uri = merged_uri(api, "bot")
    assert condition(api.status("bot"), "Promoted")["status"] == "True"

    sampler = EndpointSampler(api, "bot-serve", "bot")
    sampler.start()
    try:
        # The EndpointSlice controller adds the ready pod to the Service on its own schedule, after
        # the Deployment is available: the switch is sampled from the first sample that has it.
        wait_for("the first revision behind the Service", lambda: sampler.samples and any(
            ready and rev == first for _, ready, rev in sampler.samples[-1]), timeout=60, interval=0.1)
        start = len(sampler.samples) - 1
        # 1. An edit while serving: the new revision is built while the old one serves.
        api.patch("bot", {"spec": {"training": {"learningRate": 0.0001}}})
        second = api.rev("bot")
        assert second != first
        building = wait_for("second revision building beside the first", lambda: (lambda s: s if (
            s.get("revision") == second and condition(s, "Promoted")["reason"] == "RolloutInProgress") else None)(
            api.status("bot")), timeout=60, interval=0.2)
        assert condition(building, "Ready")["status"] == "True"
        assert building["servingRevision"] == first and building["endpoint"]["url"].startswith("http://bot-serve.")
        serving_now = api.wait_phase("bot", "Serving", timeout=180)
        wait_for("second revision serving", lambda: api.status("bot").get("servingRevision") == second,
                 timeout=120, interval=0.3)
        wait_for("only the second revision's pods behind the Service", lambda: sampler.samples and all(
            rev == second for _, ready, rev in sampler.samples[-1]) and sampler.samples[-1], timeout=60, interval=0.3)
        second_uri = merged_uri(api, "bot")
        assert second_uri != first_uri and second in second_uri
    finally:
        sampler.stop()
    assert not sampler.errors, sampler.errors[:3]
    switch = sampler.samples[start:]
    assert len(switch) > 20
    for i, sample in enumerate(switch):
        assert any(ready and rev in (first, second) for _, ready, rev in sample), (i, sample)
    seen = {rev for sample in switch for _, ready, rev in sample if ready}
    assert seen == {first, second}  # the switch really happened under the sampler
    status = api.status("bot")
    assert condition(status, "Promoted")["status"] == "True" and condition(status, "Ready")["status"] == "True"
    history = {r["id"]: r for r in status["revisions"]}
    assert history[first]["servedUntil"] == history[second]["servedFrom"]
    assert serving_now is not None

    # 2. A revision that fails its gate never takes traffic: the second keeps serving, Ready, with why.
    api.patch("bot", {"spec": {"training": {"learningRate": 0.0003},
                               "podMetadata": {"evaluate": {"annotations": {KWOK_MESSAGE: message(GATE_FAILED)}}}}})
    third = api.rev("bot")
    assert third not in (first, second)
    try:
        held = wait_for("third revision held back", lambda: (lambda s: s if condition(s, "Promoted")["reason"]
                        == "EvaluationGateFailed" else None)(api.status("bot")), timeout=180, interval=0.3)
    except TimeoutError:
        raise AssertionError(json.dumps(api.status("bot"), indent=1)) from None
    assert held["phase"] == "Serving" and held["servingRevision"] == second and held["revision"] == third
    # Ready on the old revision; Stalled (kstatus: this spec will not be reached without a new edit).
    assert condition(held, "Ready")["status"] == "True" and condition(held, "Stalled")["reason"] == "RevisionHeldBack"
    assert condition(held, "Stalled")["status"] == "True"
    assert "2.0000 -> 2.1000" in condition(held, "Promoted")["message"]
    assert condition(held, "Evaluated")["status"] == "False"
    assert held["endpoint"]["url"].startswith("http://bot-serve.")
    assert merged_uri(api, "bot") == second_uri  # never rolled out
    assert {r["id"]: r["phase"] for r in held["revisions"]}[third] == "Failed"
    assert any(e["reason"] == "RevisionHeldBack" for e in api.events("bot"))

    # 3. A revert to the first revision serves its artifact again: no Job of it is created.
    jobs_before = {j["metadata"]["name"] for j in api.jobs("bot")}
    api.patch("bot", {"spec": {"training": {"learningRate": None},
                               "podMetadata": {"evaluate": {"annotations": {KWOK_MESSAGE: message(EVALUATE_OK)}}}}})
    assert api.rev("bot") == first
    wait_for("first revision serving again", lambda: api.status("bot").get("servingRevision") == first
             and api.status("bot").get("phase") == "Serving", timeout=120, interval=0.3)
    assert merged_uri(api, "bot") == first_uri
    created = {j["metadata"]["name"] for j in api.jobs("bot")} - jobs_before
    assert not created, f"a revert created Jobs: {created}"
    history = {r["id"]: r for r in api.status("bot")["revisions"]}
    assert history[first].get("servedFrom") and not history[first].get("servedUntil")
    assert serving.merged_model_uri(FineTuneJob.from_body(api.get("bot"))) == first_uri


def route_backends(api: Api, job: str) -> list[tuple[str, int]]:
    from kubernetes import client

    route = client.CustomObjectsApi(api.api).get_namespaced_custom_object(
        "gateway.networking.k8s.io", "v1", api.ns, "httproutes", f"{job}-serve")
    return [(b["name"], b["weight"]) for rule in route["spec"]["rules"] for b in rule["backendRefs"]]


def canary_deployment(api: Api, job: str) -> dict | None:
    items = api.apps.list_namespaced_deployment(api.ns, field_selector=f"metadata.name={job}-canary").items
    return items[0] if items else None


def test_a_canary_takes_its_share_then_everything_and_a_failing_one_is_rolled_back(
        cluster, namespace, gpu_nodes, start_operator, gateway_api):
    from .test_serving import set_container_status

    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace)
    api.create(body("bot", serving={"canary": {"gateway": {"name": "public", "sectionName": "https"},
                                               "weight": 20, "durationSeconds": 3}}))
    api.wait_phase("bot", "Serving", timeout=120)
    first, first_uri = api.rev("bot"), merged_uri(api, "bot")
    wait_for("the route on the Gateway", lambda: route_backends(api, "bot") == [("bot-serve", 100)], timeout=30)

    # An edit: once evaluated, the new revision runs as a canary taking 20% through the route ...
    api.patch("bot", {"spec": {"training": {"learningRate": 0.0001}}})
    second = api.rev("bot")
    wait_for("canary at 20%", lambda: route_backends(api, "bot") == [("bot-serve", 80), ("bot-canary", 20)]
             and (api.status("bot").get("canary") or {}).get("state") == "Running", timeout=180, interval=0.2)
    status = api.status("bot")
    assert status["canary"]["revision"] == second and status["servingRevision"] == first
    assert condition(status, "Ready")["status"] == "True" and condition(status, "Promoted")["reason"] == "RolloutInProgress"
    assert merged_uri(api, "bot") == first_uri  # the serving Deployment still runs the first revision
    dep = canary_deployment(api, "bot")
    assert dep.spec.replicas == 1 and second in dep.spec.template.spec.containers[0].command[2]
    # ... then, healthy for durationSeconds, everything: the serving Deployment rolls to it, the canary goes.
    wait_for("second revision promoted", lambda: api.status("bot").get("servingRevision") == second
             and api.status("bot").get("phase") == "Serving", timeout=120, interval=0.3)
    wait_for("the route back to the serving Service", lambda: route_backends(api, "bot") == [("bot-serve", 100)]
             and canary_deployment(api, "bot") is None, timeout=60, interval=0.3)
    assert second in merged_uri(api, "bot") and api.status("bot")["canary"]["state"] == "Promoted"
    assert any(e["reason"] == "CanaryPromoted" for e in api.events("bot"))

    # A canary that crash-loops is rolled back: the route to the serving revision only, the revision held.
    # Its durationSeconds is long (a serving field: the same revision either way), so that only the crash
    # loop written below decides, however long a loaded machine takes to write it; and it is written once
    # kwok has made the pod Ready, so that kwok's own status patch cannot land over it.
    api.patch("bot", {"spec": {"training": {"learningRate": 0.0003}, "serving": {"canary": {"durationSeconds": 3600}}}})
    third = api.rev("bot")

    def ready_canary_pods():
        pods = api.pods("kubetune.io/job=bot,kubetune.io/stage=canary")
        return [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                       for c in (p.get("status") or {}).get("conditions") or [])]

    wait_for("third revision's canary pod, Ready", ready_canary_pods, timeout=180, interval=0.3)
    (pod,) = ready_canary_pods()
    set_container_status(api, pod, main={"restartCount": 5, "state": {"waiting": {"reason": "CrashLoopBackOff",
                                                                                  "message": "back-off 5m"}},
                                         "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                                                      "message": "NaN in the adapter weights"}}})
    held = wait_for("canary failed", lambda: (lambda s: s if condition(s, "Promoted")["reason"] == "CanaryFailed"
                    else None)(api.status("bot")), timeout=60, interval=0.3)
    assert held["canary"] == {**held["canary"], "revision": third, "state": "Failed"}
    assert "NaN in the adapter weights" in condition(held, "Promoted")["message"]
    assert held["phase"] == "Serving" and held["servingRevision"] == second
    assert condition(held, "Ready")["status"] == "True" and condition(held, "Stalled")["status"] == "True"
    wait_for("canary removed, route restored", lambda: canary_deployment(api, "bot") is None
             and route_backends(api, "bot") == [("bot-serve", 100)], timeout=60, interval=0.3)
    assert second in merged_uri(api, "bot")
    assert any(e["reason"] == "CanaryFailed" for e in api.events("bot"))
