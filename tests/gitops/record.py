"""Records the FineTuneJob objects the Argo CD health check is tested on.

    .venv/bin/python tests/gitops/record.py          # rewrite tests/gitops/recorded/*.json
    .venv/bin/python tests/gitops/record.py --check  # exit 1 when they differ from what the code produces

Every object here is produced by the operator's own code: the job is the
GitOps example's base (manifests/gitops/base), each reconcile pass is
`lifecycle.decide` over stage outcomes (built with the observers' pure
functions where they exist: `deployment_outcome`, `queue_state`), then the
blue/green step `reconcile.rollout` (the one API read it makes, whether the
serving revision's Deployment has a Ready replica, answered by a stub), then
`lifecycle.status_update`, merged into the status the way the API server
merges the operator's patch. The first pass (phase Pending) and a refused spec
come from `reconcile._reconcile` itself, with the API reads it makes there
(namespace labels, TenantPolicies) answered by a stub.

The rollout states that the code does not produce yet (a failed canary) are
hand-written, following the status contract of issue #17, in
tests/gitops/recorded/contract/ (never written by this script). The Argo CD
ConfigMap patch of the GitOps example carries the chart's script; it is
written here too, so that it cannot drift from charts/kubetune/files.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, Optional
from unittest import mock

import yaml

ROOT = Path(__file__).resolve().parents[2]
RECORDED = Path(__file__).resolve().parent / "recorded"
HEALTH_LUA = ROOT / "charts/kubetune/files/argocd-health.lua"
EXAMPLE_BASE = ROOT / "manifests/gitops/base/finetunejob.yaml"
ARGOCD_CM_PATCH = ROOT / "manifests/gitops/argocd/health-check/argocd-cm-health.yaml"
HEALTH_KEY = "resource.customizations.health.kubetune.io_FineTuneJob"

TIMESTAMP = "2026-01-01T00:00:00Z"
NAMESPACE = "ml-production"
LEARNING_RATE_EDIT = 0.0003  # the staging overlay's pull request
GATE_NUMBERS = "held-out loss improved by 0.0100, below evaluation.minImprovement 0.05"
KUEUE_MESSAGE = ("couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu "
                 "in flavor h100, 1 more needed")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what the API server does with the operator's status patch)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def example_body() -> dict[str, Any]:
    body = yaml.safe_load(EXAMPLE_BASE.read_text())
    body["metadata"].update({"namespace": NAMESPACE, "generation": 1, "uid": "0f6e1c9a-7d2b-4c1e-9a51-5be1d2c3f4a5"})
    return body


class Job:
    """A FineTuneJob and its status, advanced one reconcile pass at a time."""

    def __init__(self, **spec: Any) -> None:
        self.body = example_body()
        self.body["spec"] = merge_patch(self.body["spec"], spec)
        self.status: dict[str, Any] = {}

    @property
    def generation(self) -> int:
        return self.body["metadata"]["generation"]

    def model(self):
        from kubetune.operator.api import FineTuneJob

        return FineTuneJob.from_body(self.body)

    @property
    def revision(self) -> str:
        from kubetune.operator import revisions

        return revisions.of(self.model())

    def edit(self, **spec: Any) -> "Job":
        """A merged pull request: the spec changes and the API server bumps metadata.generation."""
        self.body["spec"] = merge_patch(self.body["spec"], spec)
        self.body["metadata"]["generation"] += 1
        return self

    def first_pass(self) -> "Job":
        """The operator's first look at the job (or at a spec it refuses): reconcile itself."""
        from kubetune.operator import reconcile
        from kubetune.operator.settings import OperatorSettings

        body = {**copy.deepcopy(self.body), "status": copy.deepcopy(self.status)}
        with mock.patch.object(reconcile.tenancy, "read", return_value=({}, [])), \
                mock.patch.object(reconcile, "now", return_value=TIMESTAMP):
            reconcile._recorded.clear()
            patch = reconcile._reconcile(body, kube=None, settings=OperatorSettings(), emit=lambda *a: None)
        self.status = merge_patch(self.status, patch)
        return self

    def observe(self, live: dict[str, Any]) -> dict[str, Any]:
        """Outcomes as reconcile.observe reads them: a stage recorded as finished for this
        revision is not read again; `live` holds the children's outcomes of the others."""
        from kubetune.operator import revisions, stages
        from kubetune.operator.outcomes import StageOutcome

        finished = revisions.finished_stages(self.status, self.revision)
        observed = {}
        for stage in stages.pipeline(self.model().spec):
            if stage.recorded and stage.name in finished:
                record = finished[stage.name]
                observed[stage.name] = StageOutcome("succeeded", "Recorded", f"finished at {record.get('completedAt')}",
                                                    record.get("result"))
                continue
            observed[stage.name] = live.get(stage.name) or StageOutcome("absent")
            if observed[stage.name].state != "succeeded":
                break
        return observed

    def reconcile(self, stall: Optional[tuple[str, str]] = None, still_serving: bool = True, **live: Any) -> "Job":
        """One pass, in reconcile's order: decide over the observed stages, a missing prerequisite
        (`stall`), the blue/green step (`still_serving`: the serving revision's Deployment has a Ready
        replica), then the status patch, merged."""
        from kubetune.operator import lifecycle, reconcile, revisions

        job, rev = self.model(), self.revision
        decision = lifecycle.decide(job, self.observe(live), restarts=revisions.restarts(self.status, rev))
        if stall is not None:
            # What reconcile does when preflight finds a prerequisite missing.
            decision = lifecycle.stall(decision, *stall)
        serving_rev = self.status.get("servingRevision")
        serving_now = bool(serving_rev and serving_rev != rev and reconcile.still_serving(
            ServingDeployment(1 if still_serving else 0), job, self.status))
        decision = reconcile.rollout(job, self.status, rev, decision, emit=lambda *a: None, serving_now=serving_now)
        patch = lifecycle.status_update(self.status, decision, self.generation, TIMESTAMP, rev)
        self.status = merge_patch(self.status, patch)
        return self

    def rank0_reports(self, step: int, total: int) -> "Job":
        """The train Job's rank 0 patches status.progress (docs/contracts.md)."""
        self.status = merge_patch(self.status, {"progress": {"step": step, "totalSteps": total, "updatedAt": TIMESTAMP}})
        return self

    def object(self) -> dict[str, Any]:
        return {**copy.deepcopy(self.body), "status": copy.deepcopy(self.status)}


class ServingDeployment:
    """The one read `reconcile.still_serving` makes: the job's serving Deployment, with `ready` Ready replicas."""

    def __init__(self, ready: int) -> None:
        self.ready = ready

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Optional[dict[str, Any]]:
        assert (api_version, kind) == ("apps/v1", "Deployment"), (api_version, kind)
        return {"metadata": {"name": name, "namespace": namespace}, "status": {"readyReplicas": self.ready}}


# ---------------------------------------------------------------- stage outcomes


def ok(**result: Any):
    from kubetune.operator.outcomes import StageOutcome

    return StageOutcome("succeeded", "Completed", "done", {"ok": True, **result})


def running(reason: str = "Running", message: str = ""):
    from kubetune.operator.outcomes import StageOutcome

    return StageOutcome("running", reason, message)


def failed(reason: str, message: str):
    from kubetune.operator.outcomes import StageOutcome

    return StageOutcome("failed", reason, message)


def evaluation_passed():
    return ok(improvement=0.31, baseLoss=2.41, tunedLoss=1.66)


def evaluation_below_gate():
    return ok(improvement=0.01, baseLoss=2.41, tunedLoss=2.39)


def deployment(replicas: int = 1, available: bool = True, pods: Optional[list] = None, rolled_out: bool = True):
    """The serve stage's outcome through the observer's own function."""
    from kubetune.operator.outcomes import deployment_outcome

    ready = replicas if available else 0
    dep = {
        "metadata": {"generation": 2},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": 2 if rolled_out else 1,
            "updatedReplicas": replicas if rolled_out else 0,
            "readyReplicas": ready,
            "conditions": [{"type": "Available", "status": "True" if available else "False",
                            "reason": "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                            "message": "Deployment has minimum availability." if available else ""}],
        },
    }
    return deployment_outcome(dep, pods or [])


def secret_missing_pod():
    return {"metadata": {"name": "support-bot-serve-7d9f8-x2x4q"}, "status": {"containerStatuses": [{
        "name": "vllm", "state": {"waiting": {"reason": "CreateContainerConfigError",
                                              "message": 'secret "support-bot-api-key" not found'}}}]}}


def kueue_waiting():
    """A Job waiting in Kueue, through the observer's own reading of its Workload."""
    from kubetune.operator.outcomes import StageOutcome, queue_state

    workload = {"status": {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending",
                                           "message": KUEUE_MESSAGE}]}}
    reason, message = queue_state(workload)
    return StageOutcome("suspended", reason, message)


def serving(job: Job) -> Job:
    """The whole pipeline of the job's current revision, up to Serving."""
    return (job.reconcile(validate=ok()).reconcile(train=ok()).reconcile(merge=ok())
            .reconcile(evaluate=evaluation_passed()).reconcile(serve=deployment()))


def served_then_edited(**spec: Any) -> tuple[Job, str]:
    """Revision A serves; a pull request edits the learning rate (revision B), and `spec`."""
    job = serving(Job().first_pass())
    before = job.revision
    job.edit(training={"learningRate": LEARNING_RATE_EDIT}, **spec)
    return job, before


# ---------------------------------------------------------------- the recorded states


def scenarios() -> dict[str, tuple[str, dict[str, Any], dict[str, Any]]]:
    """name -> (description, object, expectation: health, substrings the message must hold, and must not)."""
    out: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {}

    def add(name: str, description: str, job: Job, health: str, *message: str, absent: tuple[str, ...] = ()) -> None:
        expect = {"health": health, "message": list(message), **({"absent": list(absent)} if absent else {})}
        out[name] = (description, job.object(), expect)

    add("applied", "just applied: the operator has not written a status yet", Job(), "Progressing",
        "waiting for the kubetune operator")
    add("pending", "accepted, before the first stage", Job().first_pass(), "Progressing", "Pending", "accepted")
    add("validating", "the validate Job runs", Job().first_pass().reconcile().reconcile(validate=running()),
        "Progressing", "Validating")
    queued = Job(resources={"queueName": "team-a"}).first_pass().reconcile(validate=ok()).reconcile(train=kueue_waiting())
    add("queued", "the train Job waits in Kueue for GPU quota", queued, "Progressing", "Queued", KUEUE_MESSAGE)
    training = Job().first_pass().reconcile(validate=ok()).reconcile(train=running())
    training.rank0_reports(420, 1000).reconcile(train=running())
    add("training", "training, rank 0 reports step 420 of 1000", training, "Progressing", "Training", "42% trained")
    restarting = Job().first_pass().reconcile(validate=ok()).reconcile(
        train=failed("Error", "pod support-bot-train-0: exit 1"))
    add("training-restarting", "a rank crashed: the gang restarts from the newest checkpoint", restarting,
        "Progressing", "Training", "restarting every rank")
    add("merging", "the merge Job runs", Job().first_pass().reconcile(validate=ok()).reconcile(train=ok())
        .reconcile(merge=running()), "Progressing", "Merging")
    add("evaluating", "the evaluate Job runs",
        Job().first_pass().reconcile(validate=ok()).reconcile(train=ok()).reconcile(merge=ok())
        .reconcile(evaluate=running()), "Progressing", "Evaluating")
    deploying = (Job().first_pass().reconcile(validate=ok()).reconcile(train=ok()).reconcile(merge=ok())
                 .reconcile(evaluate=evaluation_passed()).reconcile(serve=deployment(available=False)))
    add("deploying", "vLLM replicas are starting", deploying, "Progressing", "Deploying")
    stuck = (Job().first_pass().reconcile(validate=ok()).reconcile(train=ok()).reconcile(merge=ok())
             .reconcile(evaluate=evaluation_passed())
             .reconcile(serve=deployment(available=False, pods=[secret_missing_pod()])))
    add("deploying-secret-missing", "the API key's Secret is missing: a person must act", stuck, "Degraded",
        "Stalled (CreateContainerConfigError)", 'secret "support-bot-api-key" not found')
    no_queue = Job(resources={"queueName": "team-a"}).first_pass().reconcile(validate=ok()).reconcile(
        stall=("LocalQueueNotFound", f"LocalQueue {NAMESPACE}/team-a (spec.resources.queueName) does not exist; create it"))
    add("stalled-local-queue-missing", "preflight: the LocalQueue does not exist", no_queue, "Degraded",
        "Stalled (LocalQueueNotFound)", "does not exist; create it")
    served = serving(Job().first_pass())
    add("serving", "the revision serves", served, "Healthy", f"serving revision {served.revision} at http://")
    zero = serving(Job().first_pass()).edit(serving={"replicas": 0})
    zero.reconcile(serve=deployment(replicas=0, available=False))
    add("scaled-to-zero", "serving.replicas: 0", zero, "Suspended", "ScaledToZero", "serving.replicas is 0")
    done = Job(serving={"enabled": False}).first_pass().reconcile(validate=ok()).reconcile(train=ok()) \
        .reconcile(merge=ok()).reconcile(evaluate=evaluation_passed())
    add("succeeded", "serving disabled: every stage done", done, "Healthy", "Succeeded", "all stages succeeded")
    oom = Job().first_pass().reconcile(validate=ok()).reconcile(train=failed("OOMKilled", "pod support-bot-train-0: OOMKilled"))
    add("failed-training", "the trainer was OOM-killed (not restarted: the same memory, the same death)", oom,
        "Degraded", "Failed", "OOMKilled")
    gate = (Job().first_pass().reconcile(validate=ok()).reconcile(train=ok()).reconcile(merge=ok())
            .reconcile(evaluate=evaluation_below_gate()))
    add("failed-gate", "the first revision fails its evaluation gate: nothing serves", gate, "Degraded",
        "Failed", GATE_NUMBERS)
    refused = Job(serving={"mode": "adapter"}, method={"useDora": True}).first_pass()
    add("refused-spec", "a spec no stage can do (an older CRD let it in)", refused, "Degraded", "Failed",
        "does not serve DoRA adapters")
    unseen = serving(Job().first_pass()).edit(training={"learningRate": LEARNING_RATE_EDIT})
    add("generation-not-observed", "a pull request merged, the operator has not reconciled it yet", unseen,
        "Progressing", "waiting for the operator to observe generation 2")

    # Blue/green: an edit while serving. The earlier revision keeps its endpoint (Ready, Promoted=False
    # RolloutInProgress) while the new one is built; a revision that fails is held back.
    job, before = served_then_edited()
    job.reconcile(validate=ok()).reconcile(train=running()).rank0_reports(300, 1000).reconcile(train=running())
    add("edit-while-serving-training", "revision A serves while revision B trains", job, "Healthy",
        f"serving revision {before} while revision {job.revision} is training", "30% trained")
    job, before = served_then_edited(resources={"queueName": "team-a"})
    job.reconcile(validate=ok()).reconcile(train=kueue_waiting())
    add("edit-while-serving-queued", "revision A serves while revision B waits in Kueue", job, "Healthy",
        f"serving revision {before} while revision {job.revision} is queued", KUEUE_MESSAGE)
    job, before = served_then_edited()
    job.reconcile(validate=ok()).reconcile(train=ok()).reconcile(merge=ok()).reconcile(evaluate=running())
    add("edit-while-serving-evaluating", "revision A serves while revision B is evaluated", job, "Healthy",
        f"serving revision {before} while revision {job.revision} is evaluating")
    job, before = served_then_edited()
    job.reconcile(validate=ok()).reconcile(train=ok()).reconcile(merge=ok()).reconcile(evaluate=evaluation_passed())
    job.reconcile(serve=deployment(rolled_out=False))
    add("edit-while-serving-rolling-out", "revision B passed its gate; its pods start while revision A's serve",
        job, "Healthy", f"serving revision {before} while revision {job.revision} is deploying")
    promoted_job = job.reconcile(serve=deployment())
    add("edit-promoted", "revision B took the endpoint (Promoted=True)", promoted_job, "Healthy",
        f"serving revision {promoted_job.revision} at http://")
    job, before = served_then_edited()
    job.reconcile(validate=ok()).reconcile(train=failed("OOMKilled", "pod support-bot-train-0: OOMKilled"))
    add("edit-while-serving-training-failed", "revision B failed to train: held back, revision A keeps serving",
        job, "Degraded", "RevisionFailed", "OOMKilled", f"revision {before} keeps serving")
    job, before = served_then_edited()
    job.reconcile(validate=ok()).reconcile(train=ok()).reconcile(merge=ok()).reconcile(evaluate=evaluation_below_gate())
    add("edit-while-serving-gate-failed", "revision B fails its evaluation gate: held back, revision A keeps serving",
        job, "Degraded", "EvaluationGateFailed", GATE_NUMBERS, f"revision {before} keeps serving")
    job, before = served_then_edited()
    job.reconcile(validate=ok()).reconcile(train=ok()).reconcile(merge=ok()).reconcile(evaluate=evaluation_passed())
    # What operator/canary.py makes of a canary that crash-loops: the serve stage failed with CanaryFailed.
    job.reconcile(serve=failed("CanaryFailed", f"canary of revision {job.revision} failed (CrashLoopBackOff): "
                               "container vllm restarted 5 times"))
    add("edit-while-serving-canary-failed", "revision B's canary failed and was rolled back; revision A keeps serving",
        job, "Degraded", "CanaryFailed", f"revision {before} keeps serving")
    job, before = served_then_edited(resources={"queueName": "team-a"})
    job.reconcile(validate=ok()).reconcile(
        stall=("LocalQueueNotFound", f"LocalQueue {NAMESPACE}/team-a (spec.resources.queueName) does not exist; create it"))
    add("edit-while-serving-stalled", "revision B cannot start (no LocalQueue); revision A still serves", job,
        "Degraded", "Stalled (LocalQueueNotFound)", f"revision {before} keeps serving")
    job, before = served_then_edited()
    job.reconcile(validate=ok()).reconcile(train=running())
    add("edit-while-serving-training-starts", "revision B's training starts; its rank 0 has not reported yet",
        job, "Healthy", f"serving revision {before} while revision {job.revision} is training",
        absent=("100% trained",))
    job, before = served_then_edited()
    job.reconcile(validate=ok()).reconcile(train=running(), still_serving=False)
    add("edit-after-serving-stopped", "revision A no longer answers (no Ready replica) while revision B trains",
        job, "Degraded", "NotServing")
    job, before = served_then_edited()
    job.reconcile(validate=ok()).reconcile(train=ok()).reconcile(merge=ok()).reconcile(evaluate=evaluation_passed())
    job.reconcile(serve=deployment(rolled_out=False)).reconcile(serve=deployment())
    edited = job.revision
    job.edit(training={"learningRate": 0.0002})  # git revert
    job.reconcile(serve=deployment(rolled_out=False))
    assert job.revision == before
    add("revert-rolling-out", "a revert: revision A's recorded artifact starts again (no stage reruns) while "
        "revision B serves", job, "Healthy", f"serving revision {edited} while revision {before} is deploying")
    return out


def fixture(description: str, obj: dict[str, Any], expect: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "source": "code (tests/gitops/record.py)", "expect": expect, "object": obj}


def rendered() -> dict[Path, str]:
    """Every file this script writes, with its content."""
    files = {RECORDED / f"{name}.json": json.dumps(fixture(*spec), indent=2, sort_keys=True) + "\n"
             for name, spec in scenarios().items()}
    files[ARGOCD_CM_PATCH] = argocd_cm_patch()
    return files


def argocd_cm_patch() -> str:
    script = HEALTH_LUA.read_text()
    patch = {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "argocd-cm"},
             "data": {HEALTH_KEY: script}}

    class Literal(str):
        pass

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(Literal, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|"))
    patch["data"][HEALTH_KEY] = Literal(script)
    header = ("# Generated by tests/gitops/record.py from charts/kubetune/files/argocd-health.lua; do not edit.\n"
              "# Argo CD's health check for FineTuneJobs, as a patch of Argo CD's own argocd-cm\n"
              "# (kustomization.yaml here is a Component: add it to the kustomization that installs Argo CD).\n")
    return header + yaml.dump(patch, Dumper=Dumper, sort_keys=False, width=1000)


def main(argv: list[str]) -> int:
    files = rendered()
    stale = {p for p in RECORDED.glob("*.json")} - set(files)
    if "--check" in argv:
        differ = [p for p, text in files.items() if not p.exists() or p.read_text() != text] + sorted(stale)
        for p in differ:
            print(f"differs from what the code produces: {p.relative_to(ROOT)}", file=sys.stderr)
        return 1 if differ else 0
    RECORDED.mkdir(parents=True, exist_ok=True)
    for p in stale:
        p.unlink()
    for p, text in files.items():
        p.write_text(text)
    print(f"wrote {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
