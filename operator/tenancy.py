"""Tenant policy: the limits of a TenantPolicy (operator/api/tenancy.py), each stated once.

Every `Limit` is both a CEL validation of the `kubetune-tenancy`
ValidatingAdmissionPolicy, which the API server runs on every create and
spec edit of a FineTuneJob (no webhook: the chart ships the policy and its
binding, `python -m kubetune.operator.packaging` generates them from
`LIMITS`), and the same check in Python, which the operator runs on objects
that got in while no policy covered their namespace (admitted before the
TenantPolicy or the admission policy existed, or before the namespace got
its tenant label). Both name the field and what the policy allows, in the
same words: the cluster tests compare the two messages.

How a policy reaches a namespace: the binding hands the admission policy
every TenantPolicy (`paramRef.selector: {}`), and the policy's match
condition keeps those whose `namespaceSelector` matches the labels of the
FineTuneJob's namespace (`namespaceObject`). Several matching policies all
apply. No TenantPolicy at all (`parameterNotFoundAction: Allow`) restricts
nothing, so the chart can be installed before the admin writes one. Only
creates and spec edits are checked: the operator's own metadata patches
(kopf's finalizer) on a job admitted under an older policy must keep
working, or it could never be deleted.

Cross-namespace references cannot be written at all: every reference in a
FineTuneJob spec is a bare name resolved in the job's own namespace
(storage.credentialsSecretRef, serving.apiKeySecretRef, storage.
serviceAccountName, resources.queueName) or a cluster-scoped name
(resources.priorityClassName, limited here); the CRD has no `namespace`
field and prunes unknown ones (tests/unit/test_tenancy.py walks the schema).

Pure, except `read`, which fetches the namespace's labels and the policies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional

from pydantic import ValidationError

from kubetune.contract.facts import GROUP, PLURAL, VERSION

from .api import FineTuneJob
from .api import tenancy as api
from .api.spec import FineTuneJobSpec
from .api.tenancy import DOT_SEGMENT, TenantPolicySpec

if TYPE_CHECKING:
    from .kube import Kube

POLICY_NAME = "kubetune-tenancy"
# '.' and '..' path segments (DOT_SEGMENT): "s3://team-a/../team-b/x" starts with
# "s3://team-a/" but some S3-compatible servers normalise it into team-b's prefix.


@dataclass(frozen=True)
class Limit:
    name: str  # the validation's id (tests and docs)
    field: str  # what the denial names
    cel: str  # true when allowed; `object.spec` is the job's spec, `params.spec` the policy's
    message_cel: str  # CEL string expression: the denial message
    allowed: Callable[[FineTuneJobSpec, TenantPolicySpec], bool]
    message: Callable[[FineTuneJobSpec, TenantPolicySpec, str], str]  # (spec, policy spec, policy name)


def _list(values: Iterable[str]) -> str:
    return "[" + ", ".join(values) + "]"


def _cel_list(path: str) -> str:
    return f"'[' + {path}.join(', ') + ']'"


def _under(uri: str, prefixes: Iterable[str]) -> bool:
    return any(uri.startswith(p) for p in prefixes) and re.search(DOT_SEGMENT, uri) is None


def _cel_under(uri: str, prefixes: str) -> str:
    return f"({prefixes}.exists(p, {uri}.startsWith(p)) && !{uri}.matches('{DOT_SEGMENT}'))"


def _entry_allows(entry: str, value: str, prefix_ends: tuple[str, ...]) -> bool:
    return value.startswith(entry) if entry.endswith(prefix_ends) else value == entry


def _cel_entry_allows(entries: str, value: str, prefix_ends: tuple[str, ...]) -> str:
    ends = " || ".join(f"e.endsWith('{end}')" for end in prefix_ends)
    return f"{entries}.exists(e, ({ends}) ? {value}.startsWith(e) : {value} == e)"


def _prefix_limit(name: str, field: str, kind: str, uri: Callable[[FineTuneJobSpec], str], key: str,
                  when_cel: str = "true", when: Callable[[FineTuneJobSpec], bool] = lambda s: True) -> Limit:
    cel_uri = f"object.{field}"
    prefixes = f"params.spec.uriPrefixes.{key}"
    return Limit(
        name=name,
        field=field,
        cel=f"!({when_cel}) || {_cel_under(cel_uri, prefixes)}",
        message_cel=(f"'{field} ' + {cel_uri} + ' is outside the {kind} prefixes TenantPolicy ' + params.metadata.name"
                     f" + ' allows (no . or .. segments): ' + {_cel_list(prefixes)}"),
        allowed=lambda s, p: not when(s) or _under(uri(s), getattr(p.uri_prefixes, key)),
        message=lambda s, p, n: (f"{field} {uri(s)} is outside the {kind} prefixes TenantPolicy {n} allows "
                                 f"(no . or .. segments): {_list(getattr(p.uri_prefixes, key))}"),
    )


IMAGE_PREFIX_ENDS = ("/", ":", "@")
MODEL_PREFIX_ENDS = ("/",)

def _named_in(name: str, section: str, key: str, attr: str, allowed_key: str, allowed_attr: str, what: str) -> Limit:
    """A name the job may set only to one of the policy's list `allowed_key` (none allowed when
    the policy has no list): the same check for ServiceAccounts and (Workload)PriorityClasses."""
    field = f"object.spec.{section}.{key}"
    allowed = f"params.spec.{allowed_key}"
    return Limit(
        name=name,
        field=f"spec.{section}.{key}",
        cel=f"!has({field}) || (has({allowed}) && {field} in {allowed})",
        message_cel=f"'spec.{section}.{key} ' + {field} + ' is not a {what} TenantPolicy ' + params.metadata.name + "
                    f"' allows: ' + (has({allowed}) ? " + _cel_list(allowed) + " : '[]')",
        allowed=lambda s, p: getattr(getattr(s, section), attr) is None
        or getattr(getattr(s, section), attr) in getattr(p, allowed_attr),
        message=lambda s, p, n: f"spec.{section}.{key} {getattr(getattr(s, section), attr)} is not a "
        f"{what} TenantPolicy {n} allows: {_list(getattr(p, allowed_attr))}",
    )


LIMITS: tuple[Limit, ...] = (
    _prefix_limit("dataset-prefix", "spec.dataset.uri", "dataset", lambda s: s.dataset.uri, "datasets"),
    _prefix_limit("model-prefix", "spec.baseModel.uri", "model", lambda s: s.base_model.uri, "models",
                  # A Hugging Face id is read from the trainer image's cache, not from S3: baseModels limits those.
                  when_cel="object.spec.baseModel.uri.startsWith('s3://')",
                  when=lambda s: s.base_model.uri.startswith("s3://")),
    _prefix_limit("output-prefix", "spec.output.uri", "output", lambda s: s.output.uri, "outputs"),
    # Written by the job's pods like its artifacts, so within the same prefixes.
    _prefix_limit("kernel-cache-prefix", "spec.output.kernelCacheUri", "output", lambda s: s.output.kernel_cache_uri,
                  "outputs", when_cel="has(object.spec.output.kernelCacheUri)",
                  when=lambda s: s.output.kernel_cache_uri is not None),
    Limit(
        name="base-model",
        field="spec.baseModel.uri",
        cel="!has(params.spec.baseModels) || "
            + _cel_entry_allows("params.spec.baseModels", "object.spec.baseModel.uri", MODEL_PREFIX_ENDS),
        message_cel="'spec.baseModel.uri ' + object.spec.baseModel.uri + ' is not a base model TenantPolicy ' + "
                    "params.metadata.name + ' allows: ' + " + _cel_list("params.spec.baseModels"),
        allowed=lambda s, p: p.base_models is None
        or any(_entry_allows(e, s.base_model.uri, MODEL_PREFIX_ENDS) for e in p.base_models),
        message=lambda s, p, n: f"spec.baseModel.uri {s.base_model.uri} is not a base model TenantPolicy {n} "
        f"allows: {_list(p.base_models or [])}",
    ),
    Limit(
        name="training-gpus",
        field="spec.resources.nodes * spec.resources.gpusPerNode",
        cel="!has(params.spec.maxGpusPerJob) || "
            "object.spec.resources.nodes * object.spec.resources.gpusPerNode <= params.spec.maxGpusPerJob",
        message_cel="'spec.resources.nodes * spec.resources.gpusPerNode is ' + "
                    "string(object.spec.resources.nodes * object.spec.resources.gpusPerNode) + "
                    "' GPUs; TenantPolicy ' + params.metadata.name + ' allows at most ' + "
                    "string(params.spec.maxGpusPerJob) + ' per job'",
        allowed=lambda s, p: p.max_gpus_per_job is None
        or s.resources.nodes * s.resources.gpus_per_node <= p.max_gpus_per_job,
        message=lambda s, p, n: f"spec.resources.nodes * spec.resources.gpusPerNode is "
        f"{s.resources.nodes * s.resources.gpus_per_node} GPUs; TenantPolicy {n} allows at most "
        f"{p.max_gpus_per_job} per job",
    ),
    Limit(
        name="serving-gpus",
        field="spec.serving.gpus * spec.serving.replicas",
        cel="!has(params.spec.maxGpusPerJob) || !object.spec.serving.enabled || "
            "object.spec.serving.gpus * object.spec.serving.replicas <= params.spec.maxGpusPerJob",
        message_cel="'spec.serving.gpus * spec.serving.replicas is ' + "
                    "string(object.spec.serving.gpus * object.spec.serving.replicas) + "
                    "' GPUs; TenantPolicy ' + params.metadata.name + ' allows at most ' + "
                    "string(params.spec.maxGpusPerJob) + ' per job'",
        allowed=lambda s, p: p.max_gpus_per_job is None or not s.serving.enabled
        or s.serving.gpus * s.serving.replicas <= p.max_gpus_per_job,
        message=lambda s, p, n: f"spec.serving.gpus * spec.serving.replicas is {s.serving.gpus * s.serving.replicas} "
        f"GPUs; TenantPolicy {n} allows at most {p.max_gpus_per_job} per job",
    ),
    Limit(
        name="training-gpu-type",
        field="spec.resources.gpuType",
        cel="!has(params.spec.gpuTypes) || "
            "(has(object.spec.resources.gpuType) && object.spec.resources.gpuType in params.spec.gpuTypes)",
        message_cel="'spec.resources.gpuType ' + (has(object.spec.resources.gpuType) ? object.spec.resources.gpuType "
                    ": '(unset: any GPU type)') + ' is not a GPU type TenantPolicy ' + params.metadata.name + "
                    "' allows: ' + " + _cel_list("params.spec.gpuTypes"),
        allowed=lambda s, p: p.gpu_types is None or s.resources.gpu_type in p.gpu_types,
        message=lambda s, p, n: f"spec.resources.gpuType {s.resources.gpu_type or '(unset: any GPU type)'} is not a "
        f"GPU type TenantPolicy {n} allows: {_list(p.gpu_types or [])}",
    ),
    Limit(
        name="serving-gpu-type",
        field="spec.serving.gpuType",
        cel="!has(params.spec.gpuTypes) || !object.spec.serving.enabled || "
            "(has(object.spec.serving.gpuType) && object.spec.serving.gpuType in params.spec.gpuTypes)",
        message_cel="'spec.serving.gpuType ' + (has(object.spec.serving.gpuType) ? object.spec.serving.gpuType "
                    ": '(unset: any GPU type)') + ' is not a GPU type TenantPolicy ' + params.metadata.name + "
                    "' allows: ' + " + _cel_list("params.spec.gpuTypes"),
        allowed=lambda s, p: p.gpu_types is None or not s.serving.enabled or s.serving.gpu_type in p.gpu_types,
        message=lambda s, p, n: f"spec.serving.gpuType {s.serving.gpu_type or '(unset: any GPU type)'} is not a "
        f"GPU type TenantPolicy {n} allows: {_list(p.gpu_types or [])}",
    ),
    Limit(
        name="image",
        field="spec.image",
        cel="!has(object.spec.image) || (has(params.spec.images) && "
            + _cel_entry_allows("params.spec.images", "object.spec.image", IMAGE_PREFIX_ENDS) + ")",
        message_cel="'spec.image ' + object.spec.image + ' is not an image TenantPolicy ' + params.metadata.name + "
                    "' allows (unset runs the operator default): ' + "
                    "(has(params.spec.images) ? " + _cel_list("params.spec.images") + " : '[]')",
        allowed=lambda s, p: s.image is None or any(_entry_allows(e, s.image, IMAGE_PREFIX_ENDS) for e in p.images),
        message=lambda s, p, n: f"spec.image {s.image} is not an image TenantPolicy {n} allows "
        f"(unset runs the operator default): {_list(p.images)}",
    ),
    Limit(
        name="serving-replicas",
        field="spec.serving.replicas",
        cel="!has(params.spec.maxServingReplicas) || !object.spec.serving.enabled || "
            "object.spec.serving.replicas <= params.spec.maxServingReplicas",
        message_cel="'spec.serving.replicas is ' + string(object.spec.serving.replicas) + '; TenantPolicy ' + "
                    "params.metadata.name + ' allows at most ' + string(params.spec.maxServingReplicas)",
        allowed=lambda s, p: p.max_serving_replicas is None or not s.serving.enabled
        or s.serving.replicas <= p.max_serving_replicas,
        message=lambda s, p, n: f"spec.serving.replicas is {s.serving.replicas}; TenantPolicy {n} allows at most "
        f"{p.max_serving_replicas}",
    ),
    _named_in("service-account", "storage", "serviceAccountName", "service_account_name", "serviceAccountNames",
              "service_account_names", "ServiceAccount"),
    _named_in("priority-class", "resources", "priorityClassName", "priority_class_name", "priorityClassNames",
              "priority_class_names", "PriorityClass"),
    _named_in("workload-priority-class", "resources", "workloadPriorityClassName", "workload_priority_class_name",
              "workloadPriorityClassNames", "workload_priority_class_names", "WorkloadPriorityClass"),
    Limit(
        name="queue",
        field="spec.resources.queueName",
        cel="!has(params.spec.queueNames) || "
            "(has(object.spec.resources.queueName) && object.spec.resources.queueName in params.spec.queueNames)",
        message_cel="'spec.resources.queueName ' + (has(object.spec.resources.queueName) ? "
                    "object.spec.resources.queueName : '(unset: no Kueue quota)') + ' is not a queue TenantPolicy ' + "
                    "params.metadata.name + ' allows: ' + " + _cel_list("params.spec.queueNames"),
        allowed=lambda s, p: p.queue_names is None or s.resources.queue_name in p.queue_names,
        message=lambda s, p, n: f"spec.resources.queueName {s.resources.queue_name or '(unset: no Kueue quota)'} is "
        f"not a queue TenantPolicy {n} allows: {_list(p.queue_names or [])}",
    ),
)
BY_NAME = {limit.name: limit for limit in LIMITS}


# ---------------------------------------------------------------- which namespaces a policy covers

_LABELS = "namespaceObject.metadata.labels"
_HAS = f"has({_LABELS}) && "
SELECTS_CEL = (
    "(!has(params.spec.namespaceSelector.matchLabels) || params.spec.namespaceSelector.matchLabels.all(k, "
    f"{_HAS}k in {_LABELS} && {_LABELS}[k] == params.spec.namespaceSelector.matchLabels[k])) && "
    "(!has(params.spec.namespaceSelector.matchExpressions) || params.spec.namespaceSelector.matchExpressions.all(e, "
    f"e.operator == 'In' ? ({_HAS}e.key in {_LABELS} && has(e.values) && {_LABELS}[e.key] in e.values) : "
    f"e.operator == 'NotIn' ? !({_HAS}e.key in {_LABELS} && has(e.values) && {_LABELS}[e.key] in e.values) : "
    f"e.operator == 'Exists' ? ({_HAS}e.key in {_LABELS}) : "
    f"!({_HAS}e.key in {_LABELS})))"
)


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics over a raw `namespaceSelector` (camelCase keys)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for req in selector.get("matchExpressions") or []:
        key, op, values = req.get("key"), req.get("operator"), req.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False  # unknown operator: select nothing rather than everything
    return True


# ---------------------------------------------------------------- the operator's check (pure)


@dataclass(frozen=True)
class Violation:
    policy: str  # TenantPolicy name
    field: str
    message: str


def violations(job: FineTuneJob, namespace_labels: Mapping[str, str], policies: Iterable[Mapping[str, Any]]
               ) -> list[Violation]:
    """What every TenantPolicy selecting the job's namespace refuses, in LIMITS order.

    `policies`: TenantPolicy objects as the API server returns them. One whose
    spec this operator cannot read refuses everything in the namespaces it
    selects (fail closed, as the admission policy's failurePolicy does)."""
    out: list[Violation] = []
    for raw in policies:
        name = str((raw.get("metadata") or {}).get("name", ""))
        spec = raw.get("spec") or {}
        if not selects(spec.get("namespaceSelector") or {}, namespace_labels):
            continue
        try:
            policy = TenantPolicySpec.model_validate(spec)
        except ValidationError as e:
            out.append(Violation(name, "TenantPolicy", f"TenantPolicy {name} cannot be read: {_errors(e)}"))
            continue
        for limit in LIMITS:
            if not limit.allowed(job.spec, policy):
                out.append(Violation(name, limit.field, limit.message(job.spec, policy, name)))
    return out


def refusal(job: FineTuneJob, namespace_labels: Mapping[str, str], policies: Iterable[Mapping[str, Any]]
            ) -> Optional[str]:
    """The Stalled/Failed condition message for a job the tenant policies refuse, or None."""
    found = violations(job, namespace_labels, policies)
    return "; ".join(v.message for v in found)[:2000] or None


def _errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())[:500]


def read(kube: "Kube", namespace: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(labels of `namespace`, every TenantPolicy); no policies when the CRD is not installed.

    Needs `get` on namespaces and `list` on tenantpolicies (operator/rbac.py)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ns = json.loads(client.CoreV1Api(kube.api).read_namespace(namespace, _preload_content=False).data)
    labels = (ns.get("metadata") or {}).get("labels") or {}
    try:
        listed = client.CustomObjectsApi(kube.api).list_cluster_custom_object(
            GROUP, VERSION, api.PLURAL, _preload_content=False)
    except ApiException as e:
        if e.status == 404:
            return labels, []
        raise
    return labels, json.loads(listed.data).get("items", [])


# ---------------------------------------------------------------- the admission policy and its binding


def admission_policy(name: str = POLICY_NAME) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "kubetune"}},
        "spec": {
            # A policy that cannot be evaluated refuses: tenancy fails closed.
            "failurePolicy": "Fail",
            "paramKind": {"apiVersion": api.API_VERSION, "kind": api.KIND},
            "matchConstraints": {
                "resourceRules": [{
                    "apiGroups": [GROUP],
                    "apiVersions": [VERSION],
                    # Not DELETE, and not the status subresource the operator and trainer write.
                    "operations": ["CREATE", "UPDATE"],
                    "resources": [PLURAL],
                }],
            },
            "matchConditions": [
                # Metadata-only updates (kopf's finalizer, labels) of a job admitted under an
                # older policy must go through, or it could never be deleted.
                {"name": "spec-written", "expression": "request.operation == 'CREATE' || object.spec != oldObject.spec"},
            ],
            # Each TenantPolicy (the binding passes all of them) applies to the namespaces it selects.
            # A variable, not a match condition: match conditions do not see namespaceObject.
            "variables": [{"name": "selected", "expression": SELECTS_CEL}],
            "validations": [
                {"expression": f"!variables.selected || ({limit.cel})", "messageExpression": limit.message_cel,
                 "message": f"{limit.field} is not allowed by the namespace's TenantPolicy", "reason": "Forbidden"}
                for limit in LIMITS
            ],
        },
    }


def admission_binding(name: str = POLICY_NAME, policy_name: str = POLICY_NAME,
                      actions: Optional[list[str]] = None) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "kubetune"}},
        "spec": {
            "policyName": policy_name,
            "validationActions": actions or ["Deny"],
            "paramRef": {
                "selector": {},  # every TenantPolicy; its namespaceSelector says where it applies
                "parameterNotFoundAction": "Allow",  # no TenantPolicy yet: nothing to enforce
            },
        },
    }
