"""Fair sharing with FineTuneJobs, on the real control plane with Kueue running:
the "Fair sharing" walkthrough of docs/multi-tenancy.md, command by command.

Two tenants' ClusterQueues (4 GPUs each) share a cohort. Tenant C's 8-GPU job
trains on D's idle quota (admitted beyond C's nominal quota, 4 of its 8 GPUs
borrowed); then D submits a job within its own quota, Kueue reclaims what it
lent (C's training preempted, C back to Queued with Kueue's reason in its
condition) and admits D's; once D is done, C is re-admitted. Between the
guide's commands the test checks the Workloads and ClusterQueues behind what
kubectl shows. The operator is the test's (watching both namespaces); it is
stopped while each job is applied so that the test can give the job what kwok
needs to play its pods (verdicts, a training duration) before the operator
sees it: the guide's jobs are what a tenant would write."""

from __future__ import annotations

import pytest

from kubetune.devcluster.cluster import wait_for
from kubetune.devcluster.queues import GPU, Queues, condition as workload_condition, is_true

from .ftj import EVALUATE_OK, KWOK_DURATION, KWOK_MESSAGE, VALIDATE_OK, Api, condition, fleet, message
from .guide import FAIR_SHARING_HEADING, FAIR_SHARING_TEARDOWN_HEADING, GUIDE, Step, guide_steps, run_step, shows

TENANTS = ["team-c", "team-d"]


def play(api: Api, name: str, train_duration: str) -> None:
    api.patch(name, {"spec": {"podMetadata": {
        "validate": {"annotations": {KWOK_MESSAGE: message(VALIDATE_OK)}},
        "train": {"annotations": {KWOK_DURATION: train_duration}},
        "evaluate": {"annotations": {KWOK_MESSAGE: message(EVALUATE_OK)}},
    }}})


def performed(cluster, step: Step) -> Step:
    run_step(cluster, step)
    assert step.returncode == 0, f"$ {step.command}\n{step.output}"
    for line in step.expected:
        assert shows(step.output, line), f"$ {step.command}\nexpected: {line}\ngot:\n{step.output}"
    return step


def gpu_usage(queues: Queues, cluster_queue: str) -> dict:
    status = queues.get("ClusterQueue", cluster_queue).get("status") or {}
    for flavor in status.get("flavorsUsage") or []:
        for resource in flavor["resources"]:
            if resource["name"] == GPU:
                return resource
    return {}


def train_workload(queues: Queues, api: Api, name: str, until, what: str) -> dict:
    return queues.wait_workload(api.ns, api.child(name, "train"), until, what, timeout=60)


@pytest.fixture
def guide_section():
    text = GUIDE.read_text().split(FAIR_SHARING_HEADING, 1)[1]
    setup, teardown = guide_steps(text, FAIR_SHARING_TEARDOWN_HEADING)
    assert setup and teardown, "the guide's fair-sharing walkthrough has no commands"
    return setup, teardown


def test_a_tenant_borrows_idle_gpus_and_the_lender_reclaims_them(
        cluster, crd, kueue, gpu_nodes, start_operator, guide_section):
    setup, teardown = guide_section
    fleet(gpu_nodes, count=1, gpus=8)
    queues = Queues(cluster.api_client())
    team_c, team_d = Api(cluster, "team-c"), Api(cluster, "team-d")
    operator = None
    seen: set[str] = set()
    try:
        for step in setup:
            if "job-team-d.yaml" in step.command:
                operator.stop()  # C keeps training: its Job is Kueue's and the kubelet's now
            performed(cluster, step)
            command = step.command

            if "job-team-c.yaml" in command:
                play(team_c, "big-run", "1h")
                operator = start_operator(TENANTS)
            elif "get clusterqueue team-c" in command:
                # C's training was admitted by C's own ClusterQueue, beyond its nominal 4 GPUs.
                admitted = train_workload(queues, team_c, "big-run", lambda w: is_true(w, "Admitted"), "admitted")
                assert admitted["status"]["admission"]["clusterQueue"] == "team-c"
                (assignment,) = admitted["status"]["admission"]["podSetAssignments"]
                assert assignment["resourceUsage"][GPU] == "8"
                usage = gpu_usage(queues, "team-c")
                assert (usage["total"], usage["borrowed"]) == ("8", "4"), usage
                seen.add("borrowed")
            elif "job-team-d.yaml" in command:
                play(team_d, "nightly", "20s")
                operator = start_operator(TENANTS)
            elif "get finetunejob big-run -o jsonpath" in command:
                # What the operator reported is Kueue's own reason for the eviction.
                status = team_c.status("big-run")
                trained = condition(status, "Trained")
                assert status["phase"] == "Queued" and trained["reason"] == "Preempted", status
                assert trained["message"].startswith("Kueue: ") and "reclamation within the cohort" in trained["message"]
                assert "resumes from its newest checkpoint" in trained["message"]
                evicted = train_workload(queues, team_c, "big-run", lambda w: is_true(w, "Evicted"), "evicted")
                assert workload_condition(evicted, "Evicted")["reason"] == "Preempted"
                assert workload_condition(evicted, "Preempted")["reason"] == "InCohortReclamation"
                assert not is_true(evicted, "QuotaReserved")
                # Its training Job is suspended again, its pod gone: the GPUs are D's.
                wait_for("big-run's training Job suspended", lambda: team_c.job(team_c.child("big-run", "train"))["spec"]["suspend"],
                         timeout=30)
                seen.add("reclaimed")
            elif "nightly --for=jsonpath={.status.phase}=Training" in command:
                # D's own quota: admitted by D's ClusterQueue, nothing borrowed.
                admitted = train_workload(queues, team_d, "nightly", lambda w: is_true(w, "Admitted"), "admitted")
                assert admitted["status"]["admission"]["clusterQueue"] == "team-d"
                usage = wait_for("team-d's usage published", lambda: gpu_usage(queues, "team-d").get("total") == "4"
                                 and gpu_usage(queues, "team-d"), timeout=30)
                assert usage.get("borrowed", "0") == "0", usage
                assert team_c.status("big-run")["phase"] == "Queued"
                seen.add("lender admitted")
            elif "big-run --for=jsonpath={.status.phase}=Training" in command and "reclaimed" in seen:
                # Re-admitted once D's job is done: the same revision, on borrowed quota again.
                train_workload(queues, team_c, "big-run", lambda w: is_true(w, "Admitted"), "admitted again")
                usage = wait_for("team-c borrowing again", lambda: gpu_usage(queues, "team-c").get("borrowed") == "4"
                                 and gpu_usage(queues, "team-c"), timeout=30)
                assert usage["total"] == "8"
                seen.add("re-admitted")
        assert seen == {"borrowed", "reclaimed", "lender admitted", "re-admitted"}, seen
    finally:
        if operator is not None:
            operator.stop()
        failures = [s for s in (run_step(cluster, s) for s in teardown) if s.returncode != 0]
        assert not failures, "\n".join(f"$ {s.command}\n{s.output}" for s in failures)
