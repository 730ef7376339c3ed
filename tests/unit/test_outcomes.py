"""Reading child Jobs, pods and Deployments into stage outcomes."""

import json

from kubetune.operator.conditions import set_condition
from kubetune.operator.outcomes import deployment_outcome, job_outcome, queue_state


def batch_job(conditions=(), suspend=False, active=0):
    return {
        "metadata": {"name": "j-train", "labels": {"kubetune.io/generation": "3"}},
        "spec": {"suspend": suspend},
        "status": {"active": active, "conditions": [dict(c, status="True") for c in conditions]},
    }


def pod(name, phase, terminated=None, waiting=None, index="0", created="2026-01-01T00:00:00Z"):
    state = {}
    if terminated:
        state["terminated"] = terminated
    if waiting:
        state["waiting"] = waiting
    return {
        "metadata": {"name": name, "creationTimestamp": created,
                     "annotations": {"batch.kubernetes.io/job-completion-index": index}},
        "status": {"phase": phase, "containerStatuses": [{"name": "kubetune", "state": state}]},
    }


def test_absent_suspended_running():
    assert job_outcome(None, []).state == "absent"
    assert job_outcome(batch_job(suspend=True), []).state == "suspended"
    running = job_outcome(batch_job(active=1), [pod("p", "Running")])
    assert (running.state, running.reason, running.generation) == ("running", "Running", "3")


def test_failed_job_reports_the_stage_reason_from_the_termination_message():
    msg = json.dumps({"stage": "validate", "ok": False, "reason": "InvalidRows", "message": "2 bad rows: row 7 messages: empty"})
    out = job_outcome(
        batch_job([{"type": "Failed", "reason": "BackoffLimitExceeded"}]),
        [pod("j-validate-x", "Failed", {"exitCode": 1, "reason": "Error", "message": msg})],
    )
    assert out.state == "failed" and out.reason == "InvalidRows"
    assert "row 7" in out.message and "BackoffLimitExceeded" in out.message
    assert out.result["ok"] is False


def test_oom_killed_pod_without_message():
    out = job_outcome(
        batch_job([{"type": "Failed", "reason": "BackoffLimitExceeded"}]),
        [pod("j-train-0-abc", "Failed", {"exitCode": 137, "reason": "OOMKilled"})],
    )
    assert out.reason == "OOMKilled" and "exit code 137" in out.message and "j-train-0-abc" in out.message


def test_log_tail_is_used_when_the_message_is_not_json():
    out = job_outcome(
        batch_job([{"type": "Failed", "reason": "BackoffLimitExceeded"}]),
        [pod("p", "Failed", {"exitCode": 1, "reason": "Error", "message": "Traceback: CUDA error"})],
    )
    assert out.reason == "Error" and "CUDA error" in out.message


def test_failed_job_without_pods_falls_back_to_the_job_reason():
    out = job_outcome(batch_job([{"type": "Failed", "reason": "DeadlineExceeded", "message": "too slow"}]), [])
    assert (out.reason, out.message) == ("DeadlineExceeded", "too slow")


def test_rank_zero_verdict_wins():
    r1 = json.dumps({"ok": False, "reason": "NcclTimeout", "message": "rank 1"})
    r0 = json.dumps({"ok": False, "reason": "CudaOutOfMemory", "message": "rank 0"})
    out = job_outcome(
        batch_job([{"type": "Failed", "reason": "BackoffLimitExceeded"}]),
        [pod("t-1", "Failed", {"exitCode": 1, "message": r1}, index="1"), pod("t-0", "Failed", {"exitCode": 1, "message": r0}, index="0")],
    )
    assert out.reason == "CudaOutOfMemory"


def test_image_pull_backoff_is_surfaced_while_running():
    out = job_outcome(batch_job(active=1), [pod("p", "Pending", waiting={"reason": "ImagePullBackOff", "message": "no such image"})])
    assert out.state == "running" and out.reason == "ImagePullBackOff" and "no such image" in out.message


def test_completed_job_result():
    msg = json.dumps({"stage": "evaluate", "ok": True, "reason": "EvaluationPassed", "message": "loss 2.0 -> 1.5", "improvement": 0.25})
    out = job_outcome(batch_job([{"type": "Complete"}]), [pod("p", "Succeeded", {"exitCode": 0, "message": msg})])
    assert out.state == "succeeded" and out.result["improvement"] == 0.25 and out.message == "loss 2.0 -> 1.5"


def test_deployment_available_progressing_failed():
    def dep(conditions, ready=0, replicas=1, generation=1, observed=1, updated=None):
        return {"metadata": {"labels": {}, "generation": generation}, "spec": {"replicas": replicas},
                "status": {"readyReplicas": ready, "conditions": conditions, "observedGeneration": observed,
                           "updatedReplicas": replicas if updated is None else updated}}

    assert deployment_outcome(None, []).state == "absent"
    assert deployment_outcome(dep([{"type": "Available", "status": "False"}]), []).state == "running"
    ok = deployment_outcome(dep([{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}], ready=1), [])
    assert ok.state == "succeeded" and ok.details["replicas"] == 1
    stuck = deployment_outcome(dep([{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]), [])
    assert stuck.state == "failed" and stuck.reason == "ProgressDeadlineExceeded"
    # An edited template is not served until the controller has rolled it out to every replica.
    available = [{"type": "Available", "status": "True"}]
    assert deployment_outcome(dep(available, ready=1, generation=2, observed=1), []).reason == "RollingOut"
    assert deployment_outcome(dep(available, ready=2, replicas=2, updated=1), []).state == "running"
    assert deployment_outcome(dep(available, ready=2, replicas=2, generation=2, observed=2), []).state == "succeeded"


def test_set_condition_rejects_bad_status():
    try:
        set_condition([], "Ready", "yes", "R", "", 1)
    except ValueError as e:
        assert "Ready" in str(e)
    else:
        raise AssertionError("accepted status 'yes'")


def test_unschedulable_pod_is_surfaced_while_running():
    p = pod("p", "Pending")
    p["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                  "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}]
    out = job_outcome(batch_job(active=1), [p])
    assert out.state == "running" and out.reason == "Unschedulable" and "Insufficient nvidia.com/gpu" in out.message


def test_a_queued_job_says_what_kueue_says():
    def workload(*conditions):
        return {"status": {"conditions": [dict(zip(("type", "status", "reason", "message"), c)) for c in conditions]}}

    assert queue_state(None) is None
    waiting = workload(("QuotaReserved", "False", "Pending",
                        "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu"))
    reason, message = queue_state(waiting)
    assert reason == "Queued" and message.startswith("Kueue: couldn't assign flavors") and "nvidia.com/gpu" in message
    preempted = workload(("QuotaReserved", "False", "Pending", "waiting"),
                         ("Evicted", "True", "Preempted", "Preempted to accommodate a workload (UID: x) due to prioritization"))
    reason, message = queue_state(preempted)
    assert reason == "Preempted" and "prioritization" in message and "checkpoint" in message
    assert queue_state(workload(("QuotaReserved", "True", "QuotaReserved", ""))) is None
    # After the eviction Kueue keeps Requeued/Preempted while the workload waits again.
    requeued = workload(("QuotaReserved", "False", "Pending", "insufficient unused quota for nvidia.com/gpu"),
                        ("Evicted", "False", "QuotaReserved", ""), ("Requeued", "True", "Preempted", ""),
                        ("Preempted", "True", "InClusterQueue", "Preempted to accommodate a higher priority workload"))
    reason, message = queue_state(requeued)
    assert reason == "Preempted" and "higher priority" in message and "insufficient unused quota" in message
