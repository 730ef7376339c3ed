"""TenantPolicy: what a platform admin allows the FineTuneJobs of some namespaces.

Cluster-scoped, so that only cluster admins edit it (a tenant who could edit
its own limits would have none). It is the parameter object of the
`kubetune-tenancy` ValidatingAdmissionPolicy (built in operator/tenancy.py,
shipped in the chart): the API server applies every TenantPolicy whose
`namespaceSelector` matches a FineTuneJob's namespace, and the operator
checks the same limits again (`kubetune.operator.tenancy.violations`) for a
FineTuneJob that got in while no policy covered its namespace.

A CRD rather than a ConfigMap: the API server checks an admin's edit against
a schema (a typo'd limit is refused instead of silently meaning "no limit"),
limits are typed (integers, lists) so the CEL reads them without parsing
strings, the object is cluster-scoped (a ConfigMap lives in some namespace,
whose editors would then hold every tenant's limits), `kubectl explain`
documents each field, and the operator's RBAC can name exactly this resource.

Unset limits differ on purpose: URI prefixes must be stated (there is no safe
default for where a tenant reads and writes); `images`, `serviceAccountNames`,
`priorityClassNames` and `workloadPriorityClassNames` default to none allowed
(the operator's default trainer image, the per-job ServiceAccount, no
priority over other tenants: all safe); the others are unlimited when unset.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, Field

from kubetune.contract.facts import GROUP, VERSION
from kubetune.contract.rules import ApiModel, Rule, matches

from .spec import _pattern_str

KIND = "TenantPolicy"
LIST_KIND = "TenantPolicyList"
PLURAL = "tenantpolicies"
SINGULAR = "tenantpolicy"
SHORT_NAMES = ["tpol"]
API_VERSION = f"{GROUP}/{VERSION}"

# A prefix ends with '/' so that s3://team-a/ can never allow s3://team-ab/...;
# no empty, '.' or '..' segment (some S3-compatible servers normalise paths).
S3_PREFIX = "^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/([^/]+/)*$"
DOT_SEGMENT = "/[.][.]?(/|$)"
S3_PREFIX_MESSAGE = "must be an s3://bucket/ or s3://bucket/prefix/ URI ending with '/'"
DOT_SEGMENT_MESSAGE = "must have no '.' or '..' segment"


def _s3_prefix(value: str) -> str:
    if not matches(S3_PREFIX, value):
        raise ValueError(S3_PREFIX_MESSAGE)
    if matches(DOT_SEGMENT, value):
        raise ValueError(DOT_SEGMENT_MESSAGE)
    return value


S3Prefix = Annotated[
    str,
    Field(min_length=1, max_length=1024, description="An s3://bucket/prefix/ ending with '/': URIs starting with it are allowed.",
          json_schema_extra={"x-kubernetes-validations": [
              {"rule": f"self.matches('{S3_PREFIX}')", "message": S3_PREFIX_MESSAGE},
              {"rule": f"!self.matches('{DOT_SEGMENT}')", "message": DOT_SEGMENT_MESSAGE},
          ]}),
    AfterValidator(_s3_prefix),
]
LabelValue = _pattern_str(
    "^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", "must be a valid label value", 63, "A Kubernetes label value."
)
ObjectName = _pattern_str(
    "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "must be a valid Kubernetes object name", 253, "A Kubernetes object name."
)
Entry = Annotated[str, Field(min_length=1, max_length=1024)]


class LabelSelectorRequirement(ApiModel):
    """One requirement of a label selector (Kubernetes' own semantics)."""

    __rules__ = (
        Rule(
            cel="(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
            message="In and NotIn need values; Exists and DoesNotExist take none",
            field_path=".values",
            check=lambda r: (r.operator in ("In", "NotIn")) == bool(r.values),
        ),
    )

    key: str = Field(min_length=1, max_length=317, description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[Annotated[str, Field(max_length=63)]] = Field(
        default_factory=list, max_length=64, description="Values for In and NotIn."
    )


class NamespaceSelector(ApiModel):
    """Which namespaces the policy covers: a label selector over Namespace objects."""

    __rules__ = (
        Rule(
            # An empty selector would cover every namespace: say so with an explicit expression instead.
            cel="(has(self.matchLabels) && size(self.matchLabels) > 0) || "
                "(has(self.matchExpressions) && size(self.matchExpressions) > 0)",
            message="namespaceSelector must not be empty (it would select every namespace)",
            check=lambda s: bool(s.match_labels or s.match_expressions),
        ),
    )

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict, max_length=16, description="Labels a namespace must carry, all of them."
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=16, description="Requirements a namespace must meet, all of them."
    )


class UriPrefixes(ApiModel):
    """Where the tenant's jobs may read and write. An empty list allows nothing."""

    datasets: list[S3Prefix] = Field(max_length=32, description="Prefixes spec.dataset.uri must start with.")
    models: list[S3Prefix] = Field(
        max_length=32, description="Prefixes an s3:// spec.baseModel.uri must start with (Hugging Face ids: see baseModels)."
    )
    outputs: list[S3Prefix] = Field(max_length=32, description="Prefixes spec.output.uri must start with.")


class TenantPolicySpec(ApiModel):
    """Limits on the FineTuneJobs of the namespaces the selector picks; every TenantPolicy that selects a namespace applies there."""

    namespace_selector: NamespaceSelector = Field(description="The tenant's namespaces, by label.")
    uri_prefixes: UriPrefixes = Field(description="S3 prefixes for datasets, base models and outputs.")
    base_models: Optional[list[Entry]] = Field(
        default=None, max_length=64,
        description="Allowed spec.baseModel.uri values (s3:// URIs or Hugging Face ids); an entry ending in '/' "
        "allows everything under it. Unset: any base model within uriPrefixes.models, and any Hugging Face id.",
    )
    max_gpus_per_job: Optional[int] = Field(
        default=None, ge=0, le=512,
        description="Most GPUs one job may ask for: resources.nodes * resources.gpusPerNode for training, "
        "serving.gpus * serving.replicas for serving. Unset: no limit.",
    )
    gpu_types: Optional[list[LabelValue]] = Field(
        default=None, max_length=32,
        description="Allowed nvidia.com/gpu.product values; resources.gpuType (and serving.gpuType when "
        "serving) must then be set to one of them. Unset: any GPU type.",
    )
    images: list[Entry] = Field(
        default=[], max_length=64,
        description="Allowed spec.image values; an entry ending in '/', ':' or '@' allows every image starting "
        "with it (a repository, its tags, its digests). Empty: only the operator's default trainer image.",
    )
    max_serving_replicas: Optional[int] = Field(
        default=None, ge=0, le=64, description="Most serving.replicas. Unset: no limit."
    )
    service_account_names: list[ObjectName] = Field(
        default=[], max_length=32,
        description="ServiceAccounts spec.storage.serviceAccountName may name (cloud identity). Empty: none, "
        "the stages run as the per-job ServiceAccount the operator creates.",
    )
    priority_class_names: list[ObjectName] = Field(
        default=[], max_length=32,
        description="PriorityClasses spec.resources.priorityClassName may name. Empty: none.",
    )
    workload_priority_class_names: list[ObjectName] = Field(
        default=[], max_length=32,
        description="Kueue WorkloadPriorityClasses spec.resources.workloadPriorityClassName may name (they decide "
        "which job Kueue preempts for which). Empty: none, the queue's default priority.",
    )
    queue_names: Optional[list[Annotated[str, Field(min_length=1, max_length=63)]]] = Field(
        default=None, max_length=32,
        description="Kueue LocalQueues of the tenant's namespaces: spec.resources.queueName must then be set "
        "to one of them, so that no job takes GPUs outside Kueue's quotas. Unset: any queue, or none.",
    )


class TenantPolicy(ApiModel):
    """A whole TenantPolicy object (as read from the API server)."""

    api_version: str = Field(default=API_VERSION, alias="apiVersion")
    kind: str = KIND
    metadata: dict = Field(default_factory=dict)
    spec: TenantPolicySpec

    model_config = ApiModel.model_config | {"extra": "ignore"}

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))


PRINTER_COLUMNS = [
    {"name": "Datasets", "type": "string", "jsonPath": ".spec.uriPrefixes.datasets", "description": "Allowed dataset prefixes."},
    {"name": "Outputs", "type": "string", "jsonPath": ".spec.uriPrefixes.outputs", "description": "Allowed output prefixes."},
    {"name": "Max GPUs", "type": "integer", "jsonPath": ".spec.maxGpusPerJob", "description": "Most GPUs per job."},
    {"name": "GPU types", "type": "string", "jsonPath": ".spec.gpuTypes", "description": "Allowed GPU products."},
    {"name": "Max replicas", "type": "integer", "jsonPath": ".spec.maxServingReplicas", "priority": 1,
     "description": "Most serving replicas."},
    {"name": "Selector", "type": "string", "jsonPath": ".spec.namespaceSelector", "priority": 1,
     "description": "The tenant's namespaces."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

__all__ = [
    "KIND", "LIST_KIND", "PLURAL", "SINGULAR", "SHORT_NAMES", "API_VERSION", "PRINTER_COLUMNS",
    "TenantPolicy", "TenantPolicySpec", "NamespaceSelector", "LabelSelectorRequirement", "UriPrefixes",
]
