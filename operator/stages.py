"""The stage registry: what each stage of a FineTuneJob is, in one object per stage.

A `Stage` knows its name, its condition and phases, whether Kueue admits it,
when a job wants it, how to build and observe its children, what its result
means (gate) and which artifacts it leaves. The pipeline (`lifecycle.decide`),
the reconciler (`reconcile.observe`/`act`), `kubetune run` and the CRD's
enums and admission rules all iterate over `STAGES`; adding a stage or a
serving mode is a change here and in its builders, nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from kubetune.contract import facts
from kubetune.contract import vllm as pin
from kubetune.contract.rules import Rule

from . import adapter_servers, configmaps, job_rbac, names, revisions, serving, stage_jobs, training
from .api import FineTuneJob
from .api.spec import FineTuneJobSpec
from .outcomes import StageOutcome, deployment_outcome, job_outcome, queue_state
from .pods import selector_labels

# The Job controller labels every pod with its Job's uid (Kubernetes' own constant).
JOB_CONTROLLER_UID = "batch.kubernetes.io/controller-uid"
from .settings import OperatorSettings

if TYPE_CHECKING:
    from .kube import Kube

Builder = Callable[[FineTuneJob, OperatorSettings], list[dict[str, Any]]]


@dataclass(frozen=True)
class Stage:
    name: str
    condition: str  # condition type this stage owns (True once done)
    phase: str  # status.phase while it runs
    done_reason: str
    # Waits in the Kueue queue when spec.resources.queueName is set (the GPU stages).
    queued: bool
    wanted: Callable[[FineTuneJobSpec], bool]
    children: Builder
    observe: Callable[["Kube", FineTuneJob, str], StageOutcome]
    # Status of its condition before it is done: Unknown while in progress, or
    # False for a condition that means "usable now" (Deployed).
    pending_status: str = "Unknown"
    # Recorded in status.revisions once done, and never run again for that revision
    # (serving is not: it is kept up for as long as the revision is asked for).
    recorded: bool = True
    # Its children are server-side applied on every pass that reaches it (serving: a
    # servedModelName edit reaches the Deployment, a hand edit is put back); a Job
    # stage creates its children once.
    reapplied: bool = False
    # Where its pod's verdict (termination message) is copied in status.
    result_field: Optional[str] = None
    # A message when a succeeded stage still says "stop here" (the evaluation gate).
    gate: Optional[Callable[[FineTuneJob, StageOutcome], Optional[str]]] = None
    gate_reason: str = "GateFailed"
    # Artifact URIs (status.artifacts) it leaves under output.uri once done.
    artifacts: tuple[tuple[str, str], ...] = ()
    # status.phase once it is done and nothing follows (Serving); Succeeded otherwise.
    done_phase: str = "Succeeded"
    # Spec combinations this stage cannot do: refused at admission (CEL), by
    # `kubetune run` and by the reconciler (Python twins), never after training.
    admission: tuple[Rule, ...] = ()
    # A failure without a verdict of its own restarts the whole stage (every rank of the
    # gang), up to spec.resources.maxRestarts: the training gang.
    restartable: bool = False
    # Reason of its condition before its children exist.
    start_reason: str = "Pending"
    # Status fields it publishes from its outcome (serve: the endpoint).
    extra_status: Optional[Callable[[FineTuneJob, StageOutcome], dict[str, Any]]] = None
    # Condition message once done.
    done_message: Optional[Callable[[FineTuneJob, StageOutcome], str]] = None

    def build(self, job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
        """Its children in creation order (shared objects first); with a queue its Jobs
        are created suspended and labelled, for Kueue to admit."""
        objs = self.children(job, settings)
        r = job.spec.resources
        if self.queued and r.queue_name:
            objs = [stage_jobs.enqueue(o, r.queue_name, r.workload_priority_class_name) if o["kind"] == "Job" else o
                    for o in objs]
        return objs

    def artifact_uris(self, job: FineTuneJob) -> dict[str, str]:
        root = revisions.artifact_root(job.spec, revisions.of(job))
        return {key: f"{root}{path}" for key, path in self.artifacts}


# ---------------------------------------------------------------- observers


def _observe_job(kube: "Kube", job: FineTuneJob, stage: str) -> StageOutcome:
    ns, rev = job.metadata.namespace, revisions.of(job)
    child = kube.get("batch/v1", "Job", ns, names.stage_job(job.metadata.name, stage, rev))
    # This Job's own pods (by its uid): a restarted gang's Job has the same name, and the
    # pods of the one before may still be terminating.
    pods = kube.list_pods(ns, {JOB_CONTROLLER_UID: child["metadata"]["uid"]}) if child else []
    outcome = job_outcome(child, pods)
    if outcome.state == "suspended" and job.spec.resources.queue_name:
        # Waiting in Kueue: say what Kueue says (insufficient quota, preempted) instead of "queued".
        waiting = queue_state(kube.workload_of(ns, child["metadata"]["uid"]))
        if waiting is not None:
            outcome = StageOutcome("suspended", waiting[0], waiting[1], None, outcome.generation)
    return outcome


def _observe_adapter(kube: "Kube", job: FineTuneJob) -> StageOutcome:
    """The job's adapter on its shared server: the server's Deployment and what its sidecars reported."""
    ns, name = job.metadata.namespace, adapter_servers.server_name(job)
    server = kube.get(facts.API_VERSION, "AdapterServer", ns, name)
    dep = kube.get("apps/v1", "Deployment", ns, name) if server else None
    pods = kube.list_pods(ns, {adapter_servers.LABEL_SERVER: name}) if dep else []
    return adapter_servers.job_outcome(job, server, dep, pods, OperatorSettings.from_env().serving_max_restarts)


def _observe_deployment(kube: "Kube", job: FineTuneJob, stage: str) -> StageOutcome:
    ns, name = job.metadata.namespace, names.serving(job.metadata.name)
    if job.spec.serving.autoscaling is None:
        # Autoscaling switched off: its HPA goes, or it would keep resizing the Deployment the operator
        # now sizes again (applying children never removes a kind the builder stopped emitting).
        hpa = kube.get("autoscaling/v2", "HorizontalPodAutoscaler", ns, name)
        if hpa is not None and ((hpa.get("metadata") or {}).get("labels") or {}).get(facts.LABEL_JOB) == job.metadata.name:
            kube.delete("autoscaling/v2", "HorizontalPodAutoscaler", ns, name)
    dep = kube.get("apps/v1", "Deployment", ns, name)
    pods = kube.list_pods(ns, selector_labels(job, stage)) if dep else []
    # Read here (observers get no settings): the installation's bound on a serving pod's crash loop.
    outcome = deployment_outcome(dep, pods, OperatorSettings.from_env().serving_max_restarts)
    rev = revisions.of(job)
    template = (((dep or {}).get("spec") or {}).get("template") or {}).get("metadata") or {}
    if dep is not None and (template.get("labels") or {}).get(facts.LABEL_REVISION) != rev:
        # Another revision's server (the one serving while this one was built; its failures are its own):
        # this revision is not served until its own template has rolled out (this pass applies it).
        return StageOutcome("running", "RollingOut", f"revision {rev} is not rolled out yet", None,
                            outcome.generation, outcome.details)
    return outcome


# ---------------------------------------------------------------- builders


def _shared(job: FineTuneJob) -> list[dict[str, Any]]:
    """What every pod stage needs first (created idempotently by each)."""
    return job_rbac.rbac_objects(job) + [configmaps.config_map(job)]


def _evaluation_gate(job: FineTuneJob, outcome: StageOutcome) -> Optional[str]:
    """Message when a finished evaluation says the tuned model must not be served.
    Fails closed: a pod that ended without a verdict never lets a model through."""
    if outcome.result is None:
        return "the evaluate pod ended without a verdict (no termination message): the gate fails closed"
    result = outcome.result
    if result.get("ok") is False:
        return result.get("message") or "the tuned model did not pass the evaluation gate"
    gate = job.spec.evaluation.min_improvement
    improvement = result.get("improvement")
    if gate is not None and isinstance(improvement, (int, float)) and improvement < gate:
        return f"held-out loss improved by {improvement:.4f}, below evaluation.minImprovement {gate}"
    return None


@dataclass(frozen=True)
class ServingMode:
    """One value of spec.serving.mode: what the job's serve stage applies, how it reads the outcome, and
    where clients go."""

    children: Builder
    observe: Callable[["Kube", FineTuneJob], StageOutcome]
    endpoint: Callable[[FineTuneJob], dict[str, str]]


SERVING_MODES: dict[str, ServingMode] = {
    # A server of the job's own, serving merged/.
    "merged": ServingMode(serving.merged_objects, lambda kube, job: _observe_deployment(kube, job, "serve"),
                          serving.endpoint),
    # The job's entry on the shared server of its base model (the server's own children are the server
    # pass's: handlers.py, adapter_servers.server_objects).
    "adapter": ServingMode(lambda job, settings: [adapter_servers.intent(job)], _observe_adapter,
                           adapter_servers.endpoint),
}


def endpoint(job: FineTuneJob) -> dict[str, str]:
    return SERVING_MODES[job.spec.serving.mode].endpoint(job)


def _serve_children(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    return SERVING_MODES[job.spec.serving.mode].children(job, settings)


def _serving_modes_rule() -> Rule:
    modes = sorted(SERVING_MODES)
    listed = ", ".join(f"'{m}'" for m in modes)
    return Rule(
        cel=f"!self.serving.enabled || self.serving.mode in [{listed}]",
        message=f"this operator version serves {' and '.join(modes)} models only; "
        "set serving.mode: merged or serving.enabled: false",
        field_path=".serving.mode",
        check=lambda s: not s.serving.enabled or s.serving.mode in SERVING_MODES,
    )


def _adapter_mode_rules() -> tuple[Rule, ...]:
    """What a shared vLLM server cannot do with a job's adapter: refused at admission, before training
    (kubetune.contract.vllm.lora_problems is the same predicate; tests/vllm checks it against vLLM)."""
    # has(): the API server checks the rules against the schema's defaults too, where a field may be absent.
    when = "!self.serving.enabled || self.serving.mode != 'adapter' || "
    adapter = lambda s: s.serving.enabled and s.serving.mode == "adapter"  # noqa: E731
    saveable = ", ".join(f"'{m}'" for m in pin.SAVEABLE_MODULES)
    return (
        Rule(cel=when + f"!has(self.method.r) || self.method.r <= {pin.MAX_LORA_RANK}",
             message=f"serving.mode adapter: vLLM serves LoRA ranks up to {pin.MAX_LORA_RANK} (method.r)",
             field_path=".method.r", check=lambda s: not adapter(s) or s.method.r <= pin.MAX_LORA_RANK),
        Rule(cel=when + "!has(self.method.useDora) || !self.method.useDora", message="serving.mode adapter: vLLM does not serve DoRA adapters "
             "(method.useDora); use serving.mode merged", field_path=".method.useDora",
             check=lambda s: not adapter(s) or not s.method.use_dora),
        Rule(cel=when + "!has(self.method.bias) || self.method.bias == 'none'", message="serving.mode adapter: vLLM serves no adapter with "
             "trained biases (method.bias must be none); use serving.mode merged", field_path=".method.bias",
             check=lambda s: not adapter(s) or s.method.bias == "none"),
        Rule(cel=when + f"!has(self.method.modulesToSave) || self.method.modulesToSave.all(m, m in [{saveable}])",
             message="serving.mode adapter: vLLM serves adapters whose method.modulesToSave are classifier/score "
             "heads only; use serving.mode merged", field_path=".method.modulesToSave",
             check=lambda s: not adapter(s) or all(m in pin.SAVEABLE_MODULES for m in s.method.modules_to_save)),
        Rule(cel=when + "!has(self.serving.canary)",
             message="serving.canary applies to merged mode: on a shared server a new adapter is swapped in place "
             "once it answers", field_path=".serving.canary",
             check=lambda s: not adapter(s) or s.serving.canary is None),
        Rule(cel=when + "!has(self.serving.autoscaling)",
             message="serving.autoscaling applies to merged mode: a shared adapter server is sized by "
             "serving.replicas", field_path=".serving.autoscaling",
             check=lambda s: not adapter(s) or s.serving.autoscaling is None),
    )


VALIDATE = Stage(
    name="validate", condition="Validated", phase="Validating", done_reason="DatasetValid", queued=False,
    wanted=lambda spec: True,
    children=lambda job, settings: _shared(job) + [stage_jobs.validate_job(job, settings)],
    observe=_observe_job, result_field="validation",
    artifacts=(("validationReport", facts.VALIDATION_REPORT),),
)
TRAIN = Stage(
    name="train", condition="Trained", phase="Training", done_reason="TrainingSucceeded", queued=True,
    wanted=lambda spec: True,
    children=lambda job, settings: _shared(job) + [training.train_service(job, settings), training.train_job(job, settings)],
    observe=_observe_job, restartable=True,
    artifacts=(("adapter", f"{facts.ADAPTER}/"), ("metrics", f"{facts.ADAPTER}/{facts.METRICS_FILE}"),
               ("lossCurve", f"{facts.ADAPTER}/{facts.LOSS_CURVE_FILE}")),
)
MERGE = Stage(
    # A CPU stage: it never waits behind GPU quota.
    name="merge", condition="Merged", phase="Merging", done_reason="MergeSucceeded", queued=False,
    wanted=lambda spec: spec.output.merge,
    children=lambda job, settings: _shared(job) + [stage_jobs.merge_job(job, settings)],
    observe=_observe_job,
    artifacts=(("merged", f"{facts.MERGED}/"),),
)
EVALUATE = Stage(
    name="evaluate", condition="Evaluated", phase="Evaluating", done_reason="EvaluationPassed", queued=True,
    wanted=lambda spec: spec.evaluation.enabled,
    children=lambda job, settings: _shared(job) + [stage_jobs.evaluate_job(job, settings)],
    observe=_observe_job, result_field="evaluation", gate=_evaluation_gate, gate_reason="EvaluationGateFailed",
    artifacts=(("evaluationReport", facts.EVALUATION_REPORT),),
)
SERVE = Stage(
    name="serve", condition="Deployed", phase="Deploying", done_reason="DeploymentAvailable", queued=False,
    wanted=lambda spec: spec.serving.enabled,
    children=_serve_children, observe=lambda kube, job, stage: SERVING_MODES[job.spec.serving.mode].observe(kube, job), pending_status="False", done_phase="Serving", recorded=False,
    reapplied=True,
    admission=(_serving_modes_rule(), *_adapter_mode_rules()), start_reason="Deploying",
    # The endpoint only while vLLM answers (Ready): not while deploying, failed or scaled to zero, when a
    # client would be sent to a Service with no ready pod. None removes an earlier one (merge patch).
    extra_status=lambda job, outcome: {
        "endpoint": endpoint(job) if outcome.state == "succeeded" else None,
        # The shared server the job has joined (adapter mode): the reconciler leaves it when the spec moves away.
        **({"adapterServer": adapter_servers.server_name(job)} if job.spec.serving.mode == "adapter" else {}),
    },
    done_message=lambda job, outcome: f"vLLM serves {serving.served_model_name(job)} at {endpoint(job)['url']}",
)

STAGES: tuple[Stage, ...] = (VALIDATE, TRAIN, MERGE, EVALUATE, SERVE)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
QUEUED_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.queued)


def pipeline(spec: FineTuneJobSpec) -> list[Stage]:
    """The stages this spec asks for, in order."""
    return [s for s in STAGES if s.wanted(spec)]


def admission_rules() -> list[Rule]:
    return [rule for s in STAGES for rule in s.admission]


def refusals(spec: FineTuneJobSpec) -> list[str]:
    """Messages of the admission rules `spec` breaks (the Python twins of the CRD's CEL)."""
    out = []
    for rule in admission_rules():
        if rule.check is not None and not rule.check(spec):
            out.append(f"spec{rule.field_path or ''}: {rule.message}")
    return out


# ---------------------------------------------------------------- what the CRD and status say


def phases() -> list[str]:
    """Every status.phase, in lifecycle order."""
    out = ["Pending", "Queued"]
    for s in STAGES:
        out.append(s.phase)
    for s in STAGES:
        if s.done_phase not in out:
            out.append(s.done_phase)
    return [*out, "Failed"] if "Succeeded" in out else [*out, "Succeeded", "Failed"]


# The summary conditions (lifecycle.summary_conditions), after the stages' own.
SUMMARY_CONDITIONS = ("Ready", "Reconciling", "Stalled")


# Blue/green between revisions (lifecycle.keep_serving / promoted): does the revision the spec asks
# for take the traffic yet, and if not, why.
ROLLOUT_CONDITIONS = ("Promoted",)


def condition_types() -> list[str]:
    return [s.condition for s in STAGES] + list(SUMMARY_CONDITIONS) + list(ROLLOUT_CONDITIONS)
