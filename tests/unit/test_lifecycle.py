"""The pipeline decision (pure): observed children -> phase, conditions, next action."""

import pytest

from kubetune.operator import revisions, stages
from kubetune.operator.api import FineTuneJob
from kubetune.operator.lifecycle import decide, progress_percent, status_update
from kubetune.operator.outcomes import StageOutcome

from .jobs import job

OK = StageOutcome("succeeded", "Completed", "done", {"ok": True})  # every stage pod leaves a verdict


def ftj(**overrides):
    return FineTuneJob.from_body(job(**overrides))


def conds(decision):
    return {t: (s, r) for t, s, r, _ in decision.conditions}


def test_nothing_observed_creates_validation():
    d = decide(ftj(), {})
    assert d.phase == "Validating" and d.create == "validate"
    assert conds(d)["Validated"] == ("Unknown", "Pending")


def test_each_stage_in_order_with_merge_and_evaluation():
    observed = {}
    seen = []
    for stage in ("validate", "train", "merge", "evaluate"):
        d = decide(ftj(), observed)
        seen.append((d.phase, d.create))
        observed[stage] = OK
    d = decide(ftj(), observed)
    seen.append((d.phase, d.create))
    assert seen == [
        ("Validating", "validate"), ("Training", "train"), ("Merging", "merge"),
        ("Evaluating", "evaluate"), ("Deploying", "serve"),
    ]
    observed["serve"] = StageOutcome("succeeded", "MinimumReplicasAvailable", "", details={"replicas": 1})
    d = decide(ftj(), observed)
    assert d.phase == "Serving" and d.create is None
    assert conds(d) == {
        "Validated": ("True", "DatasetValid"), "Trained": ("True", "TrainingSucceeded"),
        "Merged": ("True", "MergeSucceeded"), "Evaluated": ("True", "EvaluationPassed"),
        "Deployed": ("True", "DeploymentAvailable"),
    }
    assert d.status["endpoint"]["url"] == "http://support-bot-serve.tenant-a.svc:8000/v1"
    rev = revisions.of(ftj())
    assert d.status["artifacts"]["merged"] == f"s3://artifacts/tenant-a/support-bot/revisions/{rev}/merged/"
    assert d.status["artifacts"]["adapter"] == f"s3://artifacts/tenant-a/support-bot/revisions/{rev}/adapter/"


def test_without_merge_evaluation_and_serving_the_job_succeeds():
    job_ = ftj(output={"merge": False}, evaluation={"enabled": False}, serving={"enabled": False})
    d = decide(job_, {"validate": OK, "train": OK})
    assert d.phase == "Succeeded" and d.create is None
    assert "Merged" not in conds(d)


def test_queued_stages_are_created_in_phase_queued_but_validation_is_not():
    job_ = ftj(resources={"queueName": "team-a"})
    assert decide(job_, {}).phase == "Validating"
    d = decide(job_, {"validate": OK})
    assert (d.phase, d.create) == ("Queued", "train")
    assert conds(d)["Trained"] == ("Unknown", "Queued")
    # Merge is a CPU stage: it never waits behind GPU quota; evaluate (one GPU) does.
    assert decide(job_, {"validate": OK, "train": OK}).phase == "Merging"
    assert decide(job_, {"validate": OK, "train": OK, "merge": OK}).phase == "Queued"
    assert decide(job_, {"validate": OK, "train": StageOutcome("running", "Running", "")}).phase == "Training"


def test_suspended_train_job_is_queued():
    d = decide(ftj(resources={"queueName": "team-a"}), {"validate": OK, "train": StageOutcome("suspended", "Queued", "waiting")})
    assert d.phase == "Queued" and d.create is None
    assert conds(d)["Trained"] == ("Unknown", "Queued")
    assert "team-a" in d.message


def test_validation_failure_names_rows_and_copies_the_verdict():
    result = {"stage": "validate", "ok": False, "reason": "InvalidRows", "message": "2 bad rows: row 3 text: empty",
              "errors": [{"row": 3, "field": "text", "message": "empty"}]}
    d = decide(ftj(), {"validate": StageOutcome("failed", "InvalidRows", "pod x: 2 bad rows: row 3 text: empty", result)})
    assert d.phase == "Failed"
    assert conds(d)["Validated"] == ("False", "InvalidRows")
    assert "row 3" in d.message
    assert d.status["validation"]["errors"][0]["row"] == 3 and "stage" not in d.status["validation"]


def test_train_failure_keeps_the_pod_reason():
    d = decide(ftj(), {"validate": OK, "train": StageOutcome("failed", "OOMKilled", "pod t-0: OOMKilled")})
    assert d.phase == "Failed" and conds(d)["Trained"] == ("False", "OOMKilled")
    assert conds(d)["Validated"][0] == "True"


def test_evaluation_gate_stops_serving():
    worse = StageOutcome("succeeded", "Completed", "", {"ok": True, "improvement": 0.01})
    observed = {"validate": OK, "train": OK, "merge": OK, "evaluate": worse}
    d = decide(ftj(evaluation={"minImprovement": 0.05}), observed)
    assert d.phase == "Failed" and d.create is None
    assert conds(d)["Evaluated"] == ("False", "EvaluationGateFailed")
    # The same numbers pass a lower gate.
    assert decide(ftj(evaluation={"minImprovement": 0.0}), observed).create == "serve"
    # The evaluator's own verdict counts too.
    # No verdict at all (the pod died after exit 0 without its message): the gate fails closed.
    silent = decide(ftj(), {**observed, "evaluate": StageOutcome("succeeded", "Completed", "", None)})
    assert silent.phase == "Failed" and conds(silent)["Evaluated"][1] == "EvaluationGateFailed"
    assert "fails closed" in silent.message
    refused = StageOutcome("succeeded", "Completed", "", {"ok": False, "message": "tuned loss 2.1 > base 2.0"})
    d = decide(ftj(), {**observed, "evaluate": refused})
    assert conds(d)["Evaluated"][1] == "EvaluationGateFailed" and "2.1" in d.message


def test_the_pipeline_is_the_registry_filtered_by_the_spec():
    assert [s.name for s in stages.pipeline(ftj().spec)] == ["validate", "train", "merge", "evaluate", "serve"]
    lean = ftj(output={"merge": False}, evaluation={"enabled": False}, serving={"enabled": False})
    assert [s.name for s in stages.pipeline(lean.spec)] == ["validate", "train"]
    # Every stage of the registry has its own condition, and the CRD's phases come from it.
    assert len({s.condition for s in stages.STAGES}) == len(stages.STAGES)
    assert {s.phase for s in stages.STAGES} <= set(stages.phases())


def test_a_job_without_serving_ends_succeeded_with_every_condition_true():
    lean = ftj(output={"merge": False}, serving={"enabled": False})
    d = decide(lean, {"validate": OK, "train": OK, "evaluate": OK})
    assert d.phase == "Succeeded" and d.create is None
    assert [c for c, (status, _) in conds(d).items() if status == "True"] == ["Validated", "Trained", "Evaluated"]


def test_serving_is_the_current_stage_once_evaluated_so_its_children_are_reapplied():
    observed = {s: OK for s in ("validate", "train", "merge", "evaluate")}
    observed["serve"] = StageOutcome("succeeded", "", "", details={"replicas": 1})
    d = decide(ftj(serving={"replicas": 3}), observed)
    assert d.current == "serve" and stages.SERVE.reapplied and d.create is None
    # Every Job stage found done is handed over for recording, with its verdict where it has one.
    assert set(d.finished) == {"validate", "train", "merge", "evaluate"}


def test_status_update_keeps_transition_time_when_status_is_unchanged():
    d1 = decide(ftj(), {"validate": StageOutcome("running", "Running", "")})
    s1 = status_update({}, d1, 1, "2026-01-01T00:00:00Z")
    assert s1["phase"] == "Validating" and s1["observedGeneration"] == 1 and s1["startTime"] == "2026-01-01T00:00:00Z"
    c1 = next(c for c in s1["conditions"] if c["type"] == "Validated")
    d2 = decide(ftj(), {"validate": StageOutcome("running", "Running", "still")})
    s2 = status_update(s1, d2, 2, "2026-01-01T00:05:00Z")
    c2 = next(c for c in s2["conditions"] if c["type"] == "Validated")
    assert c2["lastTransitionTime"] == c1["lastTransitionTime"] and c2["observedGeneration"] == 2
    assert "startTime" not in s2
    d3 = decide(ftj(), {"validate": OK})
    s3 = status_update(s2, d3, 2, "2026-01-01T00:06:00Z")
    validated = next(c for c in s3["conditions"] if c["type"] == "Validated")
    assert validated["status"] == "True" and validated["lastTransitionTime"] == "2026-01-01T00:06:00Z"


def test_progress_percent():
    assert progress_percent({"step": 25, "totalSteps": 100}, trained=False) == 25
    assert progress_percent({"step": 5}, trained=False) is None
    assert progress_percent(None, trained=True) == 100
    assert progress_percent({"step": 150, "totalSteps": 100}, trained=False) == 100
    s = status_update({"progress": {"step": 10, "totalSteps": 40}}, decide(ftj(), {"validate": OK}), 1, "t")
    assert s["progress"] == {"percent": 25}


def kstatus(obj: dict) -> str:
    """kstatus's documented rules for a custom resource (sigs.k8s.io/cli-utils/pkg/kstatus, "Conditions"):
    observedGeneration behind generation -> InProgress; Stalled=True -> Failed; Reconciling=True ->
    InProgress; otherwise Current. Flux's health check adds Ready=True for Current."""
    status = obj.get("status") or {}
    if status.get("observedGeneration") is not None and status["observedGeneration"] != obj["metadata"]["generation"]:
        return "InProgress"
    conds = {c["type"]: c["status"] for c in status.get("conditions") or []}
    if conds.get("Stalled") == "True":
        return "Failed"
    if conds.get("Reconciling") == "True":
        return "InProgress"
    return "Current" if conds.get("Ready") == "True" else "InProgress"


DONE = {s: OK for s in ("validate", "train", "merge", "evaluate")}


@pytest.mark.parametrize("observed, expected_phase, expected", [
    ({}, "Validating", "InProgress"),
    ({"validate": StageOutcome("running", "Running", "")}, "Validating", "InProgress"),
    ({"validate": OK, "train": StageOutcome("suspended", "Queued", "waiting")}, "Queued", "InProgress"),
    ({"validate": OK, "train": StageOutcome("running", "Running", "")}, "Training", "InProgress"),
    ({"validate": OK, "train": OK, "merge": StageOutcome("running", "Running", "")}, "Merging", "InProgress"),
    ({"validate": OK, "train": OK, "merge": OK, "evaluate": StageOutcome("running", "Running", "")}, "Evaluating",
     "InProgress"),
    ({**DONE, "serve": StageOutcome("running", "Deploying", "")}, "Deploying", "InProgress"),
    ({**DONE, "serve": StageOutcome("succeeded", "MinimumReplicasAvailable", "", details={"replicas": 1})}, "Serving",
     "Current"),
    ({"validate": OK, "train": StageOutcome("failed", "TrainingRejected", "bad config",
                                            {"ok": False, "reason": "TrainingRejected"})}, "Failed", "Failed"),
    ({"validate": OK, "train": StageOutcome("failed", "Error", "rank 1 crashed")}, "Training", "InProgress"),
    ({**DONE, "serve": StageOutcome("failed", "ProgressDeadlineExceeded", "too slow")}, "Failed", "Failed"),
])
def test_kstatus_reads_every_phase_correctly(observed, expected_phase, expected):
    job_ = ftj()
    status = status_update({}, decide(job_, observed), 1, "2026-01-01T00:00:00Z")
    assert status["phase"] == expected_phase
    assert kstatus({"metadata": {"generation": 1}, "status": status}) == expected
    # After an edit the API server bumps the generation: in progress until the operator catches up.
    assert kstatus({"metadata": {"generation": 2}, "status": status}) == "InProgress"


def test_a_job_without_serving_is_current_once_every_stage_is_done():
    lean = ftj(serving={"enabled": False})
    status = status_update({}, decide(lean, DONE), 1, "t")
    assert status["phase"] == "Succeeded"
    assert kstatus({"metadata": {"generation": 1}, "status": status}) == "Current"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Succeeded")


CRASH = StageOutcome("failed", "Error", "pod x-1: container terminated with Error (exit code 1)")  # no verdict
PREEMPTED = StageOutcome("failed", "Preempted", "pod x-0: preempted", {"ok": False, "reason": "Preempted"})
REFUSED = StageOutcome("failed", "TrainingRejected", "pod x-0: bad input", {"ok": False, "reason": "TrainingRejected"})
OOM = StageOutcome("failed", "OOMKilled", "pod x-0: container terminated with OOMKilled (exit code 137)")


@pytest.mark.parametrize("outcome, restarts, phase, restart, counted", [
    (CRASH, 0, "Training", "train", True),  # a rank died without a verdict: the whole gang again
    (CRASH, 2, "Training", "train", True),
    (CRASH, 3, "Failed", None, True),  # spec.resources.maxRestarts (3 by default) used up
    (PREEMPTED, 3, "Training", "train", False),  # preemption: again, and not counted
    (REFUSED, 0, "Failed", None, True),  # the trainer refused its input: at once
    (OOM, 0, "Failed", None, True),  # the same memory would kill it again
])
def test_a_failed_rank_restarts_the_whole_gang_within_bounds(outcome, restarts, phase, restart, counted):
    d = decide(ftj(), {"validate": OK, "train": outcome}, restarts=restarts)
    assert d.phase == phase and d.restart == restart
    if restart:
        assert d.restart_counts is counted and conds(d)["Trained"] == ("Unknown", "Restarting")
        status = status_update({"revisions": [{"id": "r1", "restarts": restarts}]}, d, 1, "t", "r1")
        assert status["revisions"][-1]["restarts"] == restarts + (1 if counted else 0)
    elif restarts:
        assert "maxRestarts" in d.message
