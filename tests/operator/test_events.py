"""Event-driven reconciles and deletion without a finalizer.

The queue's rules (one pass at a time per FineTuneJob, no trigger lost, a pass
that wrote the status followed at once by another, resync, backoff) are
tested first without a cluster; then, on the real control plane, a whole
pipeline with a resync of an hour, so that every step can only come from a
watch event, and deletions with the operator stopped."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from kubernetes.client.exceptions import ApiException

from kubetune.devcluster.cluster import RESTRICTED_LABELS, wait_for
from kubetune.operator import triggers

from .ftj import GROUP, KWOK_DURATION, PLURAL, VERSION, Api, body, condition, fleet

FINALIZER = f"{GROUP}/finalizer"
HOUR = "3600"


# ---------------------------------------------------------------- the queue


class Recorder:
    """A `work` function that records its calls and proves they never overlap per key."""

    def __init__(self, seconds: float = 0.05, writes: int = 0, transitions: bool = True):
        self.transitions = transitions  # whether each write moves the phase
        self.calls: list[triggers.Key] = []
        self.seconds = seconds
        self.writes = writes  # passes that report a status write
        self.active: set[triggers.Key] = set()
        self.overlaps = 0
        self.lock = threading.Lock()

    def __call__(self, key: triggers.Key) -> triggers.Pass:
        with self.lock:
            if key in self.active:
                self.overlaps += 1
            self.active.add(key)
            self.calls.append(key)
            wrote = str(len(self.calls)) if self.writes > 0 else None
            self.writes -= 1
        time.sleep(self.seconds)
        with self.lock:
            self.active.discard(key)
        return triggers.Pass(wrote=wrote, transition=self.transitions)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


A, B = ("ns", "a"), ("ns", "b")


def test_a_burst_of_triggers_is_one_or_two_passes_never_two_at_once():
    work = Recorder(seconds=0.1)

    async def main():
        q = triggers.ReconcileQueue(work, resync=3600)
        q.trigger(A)
        await asyncio.sleep(0.02)  # its pass runs
        for _ in range(19):
            q.trigger(A)
            await asyncio.sleep(0.001)
        q.trigger(B)
        await asyncio.sleep(0.5)
        await q.close()

    run(main())
    assert work.overlaps == 0
    # The first trigger starts a pass; the 19 during it make exactly one more.
    assert work.calls.count(A) == 2 and work.calls.count(B) == 1


def test_a_trigger_during_a_pass_is_never_lost():
    work = Recorder(seconds=0.2)

    async def main():
        q = triggers.ReconcileQueue(work, resync=3600)
        q.trigger(A)
        await asyncio.sleep(0.1)  # mid-pass
        q.trigger(A)
        await asyncio.sleep(0.6)
        await q.close()

    run(main())
    assert work.calls == [A, A]


def test_a_pass_that_wrote_is_followed_at_once_and_its_own_event_is_skipped():
    work = Recorder(seconds=0.01, writes=2)

    async def main():
        q = triggers.ReconcileQueue(work, resync=3600)
        q.trigger(A)
        await asyncio.sleep(0.3)
        own = q.own_write(A, "2"), q.own_write(A, "1"), q.own_write(A, "3"), q.own_write(A, None)
        await q.close()
        return own

    # pass 1 wrote "1" -> pass 2 wrote "2" -> pass 3 wrote nothing: converged. The
    # watch events of both writes are ours; a version nobody here wrote is not.
    assert run(main()) == (True, True, False, False)
    assert work.calls == [A, A, A]


def test_the_event_of_our_own_write_during_the_pass_is_dropped_anothers_is_not():
    calls: list[triggers.Key] = []

    def work(key):
        calls.append(key)
        time.sleep(0.1)
        return triggers.Pass(wrote="7" if len(calls) == 1 else None, announced=True)

    async def main(other: str):
        q = triggers.ReconcileQueue(work, resync=3600)
        q.trigger(A)
        await asyncio.sleep(0.05)
        # The watch can deliver the written version before the pass has returned.
        q.trigger(A, "finetunejob", resource_version="7")
        q.trigger(A, "finetunejob", resource_version=other)
        await asyncio.sleep(0.4)
        q.trigger(A, "finetunejob", resource_version="7")  # late: still ours
        await asyncio.sleep(0.2)
        await q.close()

    run(main(other="7"))
    assert calls == [A]
    calls.clear()
    run(main(other="6"))  # a trainer's progress patch, say
    assert calls == [A, A]


def test_a_write_that_changed_a_watched_child_waits_for_that_childs_event():
    calls: list[triggers.Key] = []

    def work(key):
        calls.append(key)
        return triggers.Pass(wrote=str(len(calls)), announced=True)

    async def main():
        q = triggers.ReconcileQueue(work, resync=3600)
        q.trigger(A)
        await asyncio.sleep(0.2)
        await q.close()

    run(main())
    assert calls == [A]


def test_a_write_that_left_the_phase_alone_is_not_followed():
    work = Recorder(seconds=0.0, writes=5, transitions=False)

    async def main():
        q = triggers.ReconcileQueue(work, resync=3600)
        q.trigger(A)
        await asyncio.sleep(0.2)
        await q.close()

    run(main())
    assert work.calls == [A]


def test_a_reconciler_writing_on_every_pass_does_not_spin():
    work = Recorder(seconds=0.0, writes=1000)

    async def main():
        q = triggers.ReconcileQueue(work, resync=3600, max_requeues=3)
        q.trigger(A)
        await asyncio.sleep(0.3)
        await q.close()

    run(main())
    assert len(work.calls) == 4  # the first pass and three requeues


def test_timer_only_mode_runs_once_per_resync():
    work = Recorder(seconds=0.0, writes=1000)

    async def main():
        q = triggers.ReconcileQueue(work, resync=0.2, requeue_on_write=False)
        q.trigger(A)
        await asyncio.sleep(0.5)
        await q.close()

    run(main())
    assert 2 <= len(work.calls) <= 4  # t = 0, 0.2, 0.4 (give or take a scheduling delay)


def test_failures_back_off_and_a_gone_job_is_not_scheduled_again():
    calls: list[float] = []

    def work(key):
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise RuntimeError("apiserver hiccup")
        return triggers.Pass(exists=False)

    async def main():
        q = triggers.ReconcileQueue(work, resync=0.1, max_backoff=5)
        q.trigger(A)
        await asyncio.sleep(4)
        known = q.known(A)
        await q.close()
        return known

    assert run(main()) is False
    assert len(calls) == 3  # failed, failed, found gone: nothing after
    assert calls[1] - calls[0] >= 0.9 and calls[2] - calls[1] >= 1.9  # 0.5 * 2**n


def test_retry_later_is_honoured():
    calls: list[float] = []

    def work(key):
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise triggers.RetryLater("conflict", delay=0.3)
        return triggers.Pass()

    async def main():
        q = triggers.ReconcileQueue(work, resync=3600)
        q.trigger(A)
        await asyncio.sleep(0.6)
        await q.close()

    run(main())
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.3


def test_routine_pod_and_job_changes_trigger_nothing_news_does():
    signals = triggers.ChildSignals()

    def pod(phase=None, waiting=None, conditions=(), deleting=False):
        status = {"phase": phase, "conditions": list(conditions)} if phase else {}
        if waiting:
            status["containerStatuses"] = [{"name": "kubetune", "state": {"waiting": {"reason": waiting}}}]
        meta = {"uid": "p1", **({"deletionTimestamp": "now"} if deleting else {})}
        return {"metadata": meta, "status": status}

    changed = lambda body, plural="pods", deleted=False: signals.changed(plural, body, deleted)  # noqa: E731
    assert not changed(pod())  # created: its Job's status says so
    assert not changed(pod("Pending", conditions=[{"type": "PodScheduled", "status": "True"}]))
    assert not changed(pod("Pending", waiting="ContainerCreating"))
    assert not changed(pod("Running"))
    assert changed(pod("Running", waiting="CreateContainerConfigError"))  # a missing Secret
    assert not changed(pod("Running", waiting="CreateContainerConfigError"))  # the same news again
    assert changed(pod("Running"))  # and its end
    assert changed(pod("Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                               "message": "0/3 nodes are available"}]))
    assert changed(pod("Failed", conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "Preempted"}]))
    assert changed(pod("Failed", deleting=True))
    assert not changed(pod("Failed"), deleted=True)

    def job(**status):
        return {"metadata": {"uid": "j1", "labels": {"kubetune.io/job": "x"}}, "spec": {}, "status": status}

    assert changed(job(), "jobs")  # created
    assert changed(job(active=1), "jobs")
    assert not changed(job(active=1, ready=1), "jobs")
    assert changed(job(active=0, succeeded=1, conditions=[{"type": "SuccessCriteriaMet", "status": "True"}]), "jobs")
    assert changed(job(active=0, succeeded=1, conditions=[{"type": "SuccessCriteriaMet", "status": "True"},
                                                          {"type": "Complete", "status": "True"}]), "jobs") is False
    assert changed(job(), "jobs", deleted=True)  # a deleted Job may need re-creating

    def deployment(**status):
        return {"metadata": {"uid": "d1", "generation": 1}, "spec": {"replicas": 1}, "status": status}

    rolled_out = {"observedGeneration": 1, "updatedReplicas": 1}
    assert changed(deployment(), "deployments")
    assert changed(deployment(**rolled_out), "deployments")
    assert not changed(deployment(**rolled_out, unavailableReplicas=1), "deployments")
    assert changed(deployment(**rolled_out, readyReplicas=1,
                              conditions=[{"type": "Available", "status": "True"}]), "deployments")
    assert signals.changed("services", {"metadata": {"uid": "s"}}, False)  # no signal function: always
    assert signals.changed("services", {"metadata": {"uid": "s"}}, False)


def test_owner_key_reads_the_job_label():
    pod = {"metadata": {"namespace": "ns", "name": "x-train-0", "labels": {"kubetune.io/job": "x"}}}
    assert triggers.owner_key(pod) == ("ns", "x")
    assert triggers.owner_key({"metadata": {"namespace": "ns", "labels": {}}}) is None


def test_lean_storages_give_kopf_the_same_essence():
    import kopf

    from kubetune.operator.essence import LeanDiffBaseStorage, LeanProgressStorage

    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "n", "uid": "u", "resourceVersion": "5", "generation": 1,
                     "labels": {"kubetune.io/job": "x"},
                     "annotations": {"kwok.kubetune.io/run-duration": "1s", f"{GROUP}/last-handled-configuration": "{}",
                                     "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                     "managedFields": [{"manager": "kube-controller-manager", "fieldsV1": {"f:spec": {}}}],
                     "ownerReferences": [{"kind": "Job", "name": "j", "uid": "1"}], "finalizers": ["f"]},
        "spec": {"containers": [{"name": "c", "image": "i", "env": [{"name": "A", "value": "1"}]}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    ftj = {**pod, "kind": "FineTuneJob", "metadata": {**pod["metadata"], "annotations": {
        f"{GROUP}/delete_artifacts": '{"retries": 1}', f"{GROUP}/last-handled-configuration": "{}", "user": "note"}}}
    kopf_diffbase = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    lean_diffbase = LeanDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    kopf_progress, lean_progress = kopf.AnnotationsProgressStorage(prefix=GROUP), LeanProgressStorage(prefix=GROUP)
    for obj in (pod, ftj):
        for extra in (None, [("status", "phase")]):
            theirs = kopf_diffbase.build(body=kopf.Body(obj), extra_fields=extra)
            ours = lean_diffbase.build(body=kopf.Body(obj), extra_fields=extra)
            assert ours == theirs
            assert lean_progress.clear(essence=ours) == kopf_progress.clear(essence=theirs)
    assert "managedFields" not in str(lean_diffbase.build(body=kopf.Body(pod)))


# ---------------------------------------------------------------- on the control plane


def test_events_alone_drive_a_job_from_apply_to_serving(cluster, namespace, gpu_nodes, start_operator):
    """With the resync at an hour, every step below can only come from a watch
    event: the FineTuneJob's own (create, spec edit, progress patch) or its
    children's (Jobs finishing, the Deployment)."""
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    op = start_operator(namespace, KUBETUNE_RECONCILE_INTERVAL=HOUR)
    api.create(body("evented", podMetadata={"train": {"annotations": {KWOK_DURATION: "4s"}}}))

    # Create: the first Job within seconds (the timer of old took two 10 s ticks).
    started = time.monotonic()
    wait_for("validate Job", lambda: api.jobs("evented"), timeout=10, interval=0.1)
    assert time.monotonic() - started < 10

    # The trainer's progress patch is an event of the FineTuneJob itself.
    api.wait_phase("evented", "Training", timeout=30)
    api.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "evented", {"status": {"progress": {"step": 30, "totalSteps": 120}}})
    wait_for("progress percent", lambda: (api.status("evented").get("progress") or {}).get("percent") == 25,
             timeout=5, interval=0.1)

    # Jobs finishing (validate, train, merge, evaluate) and the Deployment becoming Available.
    status = api.wait_phase("evented", "Serving", timeout=60)
    assert condition(status, "Ready")["status"] == "True"

    # A spec edit reaches the Deployment and observedGeneration follows, with no resync.
    api.patch("evented", {"spec": {"serving": {"servedModelName": "evented-v2"}}})
    wait_for("edit served", lambda: (s := api.status("evented")).get("observedGeneration") == 2
             and s.get("phase") == "Serving", timeout=20, interval=0.2)
    dep = api.raw(api.apps.read_namespaced_deployment, "evented-serve", namespace)
    args = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert args[args.index("--served-model-name") + 1] == "evented-v2"

    # A child deleted by hand: its DELETED event brings it back.
    api.apps.delete_namespaced_deployment("evented-serve", namespace)
    wait_for("Deployment re-created", lambda: _maybe(lambda: api.raw(
        api.apps.read_namespaced_deployment, "evented-serve", namespace)), timeout=10, interval=0.2)

    # No finalizer on a job whose deletion needs nothing from the operator.
    assert FINALIZER not in (api.get("evented")["metadata"].get("finalizers") or [])
    assert "Forbidden" not in op.log(), op.log()[-3000:]


def test_delete_with_the_operator_stopped_completes(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    op = start_operator(namespace)
    # A second namespace, deleted whole while the operator is down.
    other = cluster.create_namespace("t", labels=RESTRICTED_LABELS)
    other_api = Api(cluster, other)
    op_other = start_operator(other)
    slow = {"podMetadata": {"train": {"annotations": {KWOK_DURATION: "600s"}}}}
    api.create(body("orphan", **slow))
    other_api.create(body("orphan", **slow))
    api.create(body("purging", output={"deleteOnJobDeletion": True}, **slow))
    for a in (api, other_api):
        a.wait_phase("orphan", "Training", timeout=60)
    api.wait_phase("purging", "Training", timeout=60)

    # kopf's finalizer only where a deletion must run the artifact cleanup.
    assert FINALIZER not in (api.get("orphan")["metadata"].get("finalizers") or [])
    assert FINALIZER not in (other_api.get("orphan")["metadata"].get("finalizers") or [])
    assert FINALIZER in api.get("purging")["metadata"]["finalizers"]

    op.stop()
    op_other.stop()
    api.delete("orphan")
    wait_for("FineTuneJob gone with no operator", lambda: _maybe(lambda: api.get("orphan")) is None,
             timeout=15, interval=0.2)
    cluster.delete_namespace(other)
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    wait_for("namespace gone with no operator", lambda: _maybe(lambda: core.read_namespace(other)) is None,
             timeout=120, interval=1)
    # The one that must clean up waits for the operator, as it should, and goes
    # once the operator is back and its cleanup Job has run.
    api.delete("purging")
    time.sleep(2)
    assert api.get("purging")["metadata"].get("deletionTimestamp")
    start_operator(namespace)
    wait_for("held FineTuneJob gone after its cleanup", lambda: _maybe(lambda: api.get("purging")) is None,
             timeout=60, interval=0.5)


def _maybe(read):
    try:
        return read()
    except ApiException as e:
        if e.status == 404:
            return None
        raise
