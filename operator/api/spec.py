"""FineTuneJob `spec`: what a user asks for.

Every field has a description (it is what `kubectl explain ftj.spec...`
prints), a default where one is sensible, and bounds. Invariants that span
fields are `Rule`s: the CRD carries them as CEL, the model checks them in
Python too.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, Field

from kubetune.contract import recipe
from kubetune.contract.recipe import EvaluationSpec, MethodSpec, QuantizationSpec, Strategy, TrainingSpec
from kubetune.contract.rules import ApiModel, Rule, matches, string_rule

__all__ = [
    "FineTuneJobSpec", "BaseModelSpec", "DatasetSpec", "MethodSpec", "QuantizationSpec", "TrainingSpec",
    "EvaluationSpec", "ResourcesSpec", "OutputSpec", "ServingSpec", "AutoscalingSpec", "StorageSpec", "PodMetadataSpec",
]

# Patterns avoid backslashes so that they read the same in Python and inside
# CEL string literals.
S3_URI = "^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"
HTTP_URL = "^https?://[^ /]+(/.*)?$"
DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
LABEL_VALUE = "^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
# A Kubernetes quantity as a person writes it (4, 500m, 1.5, 32Gi): what a pod's resources accept.
QUANTITY = "^[0-9]+([.][0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
# An image reference: registry[:port]/path[:tag][@sha256:digest], lowercase path components.
IMAGE_REF = ("^[a-z0-9]([a-z0-9._-]*[a-z0-9])?(:[0-9]+)?(/[a-z0-9]([a-z0-9._-]*[a-z0-9])?)*"
             "(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$")


def _pattern_str(pattern: str, message: str, max_length: int, description: str):
    def check(value: str) -> str:
        if not matches(pattern, value):
            raise ValueError(message)
        return value

    return Annotated[
        str,
        Field(min_length=1, max_length=max_length, description=description, json_schema_extra=string_rule(pattern, message)),
        AfterValidator(check),
    ]


S3Uri = _pattern_str(S3_URI, "must be an s3:// URI (s3://bucket/prefix) whose bucket name is 3-63 lowercase letters, "
                     "digits, '.' or '-'", 1024, "An s3://bucket/prefix URI.")
# Base models come from S3 only: a Hugging Face id (org/name) is refused at admission,
# saying how to copy the snapshot to S3 once (the trainer never downloads from a hub).
ModelUri = _pattern_str(
    S3_URI,
    "must be an s3:// URI of a model directory (s3://bucket/prefix/); a Hugging Face id is not downloaded: "
    "copy the snapshot to S3 once (huggingface-cli download ORG/NAME --local-dir DIR, then upload DIR)",
    1024,
    "s3://bucket/prefix/ of a Hugging Face model directory (save_pretrained's layout).",
)
DnsLabel = _pattern_str(DNS_LABEL, "must be a DNS label (lowercase letters, digits, '-')", 63, "A DNS label.")
ObjectName = _pattern_str(DNS_SUBDOMAIN, "must be a valid Kubernetes object name", 253, "A Kubernetes object name.")
HttpUrl = _pattern_str(HTTP_URL, "must be an http:// or https:// URL", 512, "An http(s) URL.")
LabelValue = _pattern_str(LABEL_VALUE, "must be a valid label value", 63, "A Kubernetes label value.")
Quantity = _pattern_str(QUANTITY, "must be a Kubernetes quantity, e.g. 4, 500m, 32Gi", 32, "A Kubernetes quantity.")
ImageRef = _pattern_str(IMAGE_REF, "must be an image reference, e.g. registry.example.com/team/kubetune:1.2.3", 512,
                        "An image reference.")

ServingMode = Literal["merged", "adapter"]


# The recipe sections are kubetune.contract.recipe's (the trainer's config is
# made of the same classes); the API only narrows where a cluster reads from.


class BaseModelSpec(recipe.BaseModelSpec):
    """The model to fine-tune."""

    __rules__ = (
        Rule(
            cel="!has(self.revision)",
            message="baseModel.revision applies to Hugging Face ids, which are not downloaded: the files under "
            "baseModel.uri are the version trained; remove revision",
            field_path=".revision",
            check=lambda b: b.revision is None,
            reason="FieldValueForbidden",
        ),
    )

    uri: ModelUri = Field(description="s3://bucket/prefix/ of a Hugging Face model directory (save_pretrained's layout).")


class DatasetSpec(recipe.DatasetSpec):
    """Training data: one file in S3."""

    uri: S3Uri = Field(description="s3://bucket/key of a .jsonl, .json, .parquet or .csv file.")


class ResourcesSpec(ApiModel):
    """Where and how wide training runs."""

    nodes: int = Field(default=1, ge=1, le=64, description="Machines; each runs one pod of the Indexed train Job.")
    gpus_per_node: int = Field(default=1, ge=1, le=8, description="GPUs per machine (nvidia.com/gpu).")
    gpu_type: Optional[LabelValue] = Field(
        default=None, description="Value of the nvidia.com/gpu.product node label to schedule on, e.g. NVIDIA-H100-80GB-HBM3."
    )
    strategy: Strategy = Field(default="ddp", description="ddp, or DeepSpeed ZeRO stage 2 or 3 (rendered into a ConfigMap).")
    cpu: Quantity = Field(default="4", description="CPU request per training pod, e.g. 4 or 500m.")
    memory: Quantity = Field(default="32Gi", description="Memory request and limit per training pod, e.g. 32Gi.")
    shm_size: Quantity = Field(default="16Gi", description="Size of /dev/shm (NCCL, data loader workers), e.g. 16Gi.")
    queue_name: Optional[DnsLabel] = Field(
        default=None, description="Kueue LocalQueue: the Jobs are created suspended and Kueue admits them."
    )
    priority_class_name: Optional[ObjectName] = Field(default=None, description="PriorityClass of the training pods.")
    workload_priority_class_name: Optional[ObjectName] = Field(
        default=None,
        description="Kueue WorkloadPriorityClass of the queued Jobs (with queueName): the order in the queue and "
        "which job Kueue preempts for which.",
    )
    max_restarts: int = Field(
        default=3, ge=0, le=100,
        description="Restarts of the whole training gang (every rank, from the newest checkpoint) after a rank "
        "fails without a verdict of its own (crash, lost node). Preemptions do not count; the trainer's refusals "
        "of bad input and OOM kills fail at once.",
    )


class OutputSpec(ApiModel):
    """Where artifacts go (layout: docs/contracts.md)."""

    uri: S3Uri = Field(description="s3://bucket/prefix/ receiving checkpoints, adapter, merged model and reports.")
    merge: bool = Field(default=True, description="Fold the adapter into the base and write bf16 safetensors to merged/.")
    delete_on_job_deletion: bool = Field(
        default=False,
        description="Delete everything under uri when the FineTuneJob is deleted (a cleanup Job runs first). "
        "By default artifacts outlive the job.",
    )
    kernel_cache_uri: Optional[S3Uri] = Field(
        default=None,
        description="s3://bucket/prefix/ keeping the GPU kernels the trainer compiles, per GPU kind and library "
        "versions: later pods restore them (a restart, a resume, the next revision) and their first step compiles "
        "nothing. Jobs that name the same prefix share them (a team's jobs, with the same storage credentials). "
        "Default: <uri>/kernel-cache/.",
    )


class SecretKeyRef(ApiModel):
    """A key of a Secret in the FineTuneJob's namespace."""

    name: ObjectName = Field(description="Secret name.")
    key: str = Field(default="api-key", min_length=1, max_length=253, description="Key inside the Secret.")


# Tensor-parallel sizes vLLM shards a model over on one node (its heads must divide evenly).
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)


class AutoscalingSpec(ApiModel):
    """A HorizontalPodAutoscaler on vLLM's queue length; the operator then leaves replicas to it."""

    __rules__ = (
        Rule(
            cel="!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
            message="autoscaling.minReplicas must be <= autoscaling.maxReplicas",
            field_path=".minReplicas",
            check=lambda a: a.min_replicas <= a.max_replicas,
        ),
    )

    min_replicas: int = Field(default=1, ge=1, le=64, description="Fewest vLLM replicas.")
    max_replicas: int = Field(ge=1, le=64, description="Most vLLM replicas.")
    target_waiting_requests: int = Field(
        default=4, ge=1, le=10_000,
        description="Average of vLLM's vllm:num_requests_waiting per replica to scale at (served to the HPA as a "
        "pods metric by a Prometheus adapter).",
    )


class GatewayRef(ApiModel):
    """A Gateway API Gateway in the job's namespace (a FineTuneJob names nothing outside it)."""

    name: ObjectName = Field(description="The Gateway's name.")
    section_name: Optional[DnsLabel] = Field(default=None, description="One listener of it (sectionName).")


class CanarySpec(ApiModel):
    """A weighted canary between revisions through a Gateway API HTTPRoute (merged mode; needs the
    Gateway API CRDs). Without it a new revision replaces the old one pod by pod once Ready."""

    gateway: GatewayRef = Field(description="The Gateway the job's HTTPRoute attaches to.")
    weight: int = Field(default=10, ge=1, le=99, description="Percent of the requests the new revision gets.")
    duration_seconds: int = Field(
        default=600, ge=0, le=86_400,
        description="How long the canary must stay healthy before it takes all the traffic (0: once Ready).",
    )


class ServingSpec(ApiModel):
    """vLLM serving of the result."""

    __rules__ = (
        Rule(
            # has(): the API server also checks the rule against the schema's defaults, where gpus is absent.
            cel="!has(self.gpus) || self.gpus in [" + ", ".join(str(n) for n in TENSOR_PARALLEL_SIZES) + "]",
            message="serving.gpus is vLLM's tensor-parallel size: 1, 2, 4 or 8 (the model's attention heads are "
            "split evenly over them)",
            field_path=".gpus",
            check=lambda s: s.gpus in TENSOR_PARALLEL_SIZES,
        ),
    )

    enabled: bool = Field(default=True, description="Serve the fine-tuned model with vLLM.")
    mode: ServingMode = Field(
        default="merged", description="merged: serve merged/ from S3; adapter: load the adapter onto a base-model server."
    )
    replicas: int = Field(
        default=1, ge=0, le=64,
        description="vLLM replicas; 0 scales serving to zero (status says ScaledToZero). Ignored with autoscaling.",
    )
    gpus: int = Field(default=1, ge=1, le=8, description="GPUs per replica (tensor parallel size): 1, 2, 4 or 8.")
    cpu: Quantity = Field(default="8", description="CPU request per vLLM pod (tokenization, weight streaming), e.g. 8.")
    memory: Quantity = Field(
        default="64Gi",
        description="Memory request and limit per vLLM pod. Weights stream from S3 through host memory: the "
        "streamer's buffer is held to half of this.",
    )
    autoscaling: Optional[AutoscalingSpec] = Field(
        default=None, description="Scale replicas on vLLM's waiting requests with a HorizontalPodAutoscaler."
    )
    gpu_type: Optional[LabelValue] = Field(default=None, description="nvidia.com/gpu.product of the serving nodes.")
    max_model_len: Optional[int] = Field(default=None, ge=16, le=1_048_576, description="vLLM --max-model-len.")
    served_model_name: Optional[DnsLabel] = Field(default=None, description="Model name in the OpenAI API; the job name by default.")
    api_key_secret_ref: Optional[SecretKeyRef] = Field(default=None, description="Secret key holding the API key clients must send.")
    canary: Optional[CanarySpec] = Field(
        default=None, description="Roll a new revision out as a weighted canary through a Gateway API HTTPRoute."
    )


class SecretRef(ApiModel):
    name: ObjectName = Field(description="Secret name (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).")


class StorageSpec(ApiModel):
    """S3 access for every stage."""

    __rules__ = (
        Rule(
            cel="!(has(self.credentialsSecretRef) && has(self.serviceAccountName))",
            message="set credentialsSecretRef or serviceAccountName (IRSA), not both",
            field_path=".serviceAccountName",
            check=lambda s: not (s.credentials_secret_ref and s.service_account_name),
            reason="FieldValueForbidden",
        ),
    )

    endpoint_url: Optional[HttpUrl] = Field(default=None, description="S3-compatible endpoint (AWS_ENDPOINT_URL).")
    region: Optional[str] = Field(default=None, max_length=64, description="AWS_REGION.")
    credentials_secret_ref: Optional[SecretRef] = Field(default=None, description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.")
    service_account_name: Optional[ObjectName] = Field(
        default=None, description="Existing ServiceAccount with cloud credentials (IRSA / workload identity) to run stages as."
    )


class PodMeta(ApiModel):
    """Extra labels and annotations for pods (cost allocation, mesh or monitoring opt-ins)."""

    labels: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict, max_length=32, description="Labels added to the pods; the operator's own labels win."
    )
    annotations: dict[str, Annotated[str, Field(max_length=8192)]] = Field(
        default_factory=dict, max_length=32, description="Annotations added to the pods."
    )


class PodMetadataSpec(ApiModel):
    """Pod labels/annotations for all stages, and per stage (merged over `all`)."""

    all: Optional[PodMeta] = Field(default=None, description="Every stage's pods.")
    validate_: Optional[PodMeta] = Field(default=None, alias="validate", description="Pods of the validate Job.")
    train: Optional[PodMeta] = Field(default=None, description="Pods of the train Job.")
    merge: Optional[PodMeta] = Field(default=None, description="Pods of the merge Job.")
    evaluate: Optional[PodMeta] = Field(default=None, description="Pods of the evaluate Job.")
    serve: Optional[PodMeta] = Field(default=None, description="vLLM pods.")

    def for_stage(self, stage: str) -> tuple[dict[str, str], dict[str, str]]:
        """(labels, annotations) for `stage`: `all`, then the stage's own."""
        labels: dict[str, str] = {}
        annotations: dict[str, str] = {}
        # A canary's pods are serving pods (serving.canary): they get the serve stage's metadata.
        own = {"validate": "validate_", "canary": "serve"}.get(stage, stage)
        for meta in (self.all, getattr(self, own, None)):
            if meta is not None:
                labels.update(meta.labels)
                annotations.update(meta.annotations)
        return labels, annotations


class FineTuneJobSpec(ApiModel):
    """One fine-tuning run: validate -> train -> merge -> evaluate -> serve."""

    __rules__ = (
        # Recipe combinations that cannot run under the strategy: kubetune.contract.recipe states each once.
        *(r.api_rule("self.resources.strategy") for r in recipe.RECIPE_RULES),
        Rule(
            cel="!self.serving.enabled || self.serving.mode != 'merged' || self.output.merge",
            message="serving.mode merged needs output.merge: true",
            field_path=".serving.mode",
            check=lambda s: not s.serving.enabled or s.serving.mode != "merged" or s.output.merge,
        ),
        Rule(
            cel="!has(self.evaluation.minImprovement) || self.evaluation.enabled",
            message="evaluation.minImprovement needs evaluation.enabled: true",
            field_path=".evaluation.minImprovement",
            check=lambda s: s.evaluation.min_improvement is None or s.evaluation.enabled,
        ),
        Rule(
            cel="self.resources.nodes * self.resources.gpusPerNode <= 512",
            message="resources.nodes * resources.gpusPerNode must be <= 512",
            field_path=".resources.nodes",
            check=lambda s: s.resources.nodes * s.resources.gpus_per_node <= 512,
        ),
        # No immutability rules: an edit of the recipe is a new content-addressed revision
        # (operator/revisions.py), an edit of the rest applies to the children in place.
    )

    base_model: BaseModelSpec = Field(description="The model to fine-tune.")
    dataset: DatasetSpec = Field(description="Training data.")
    method: MethodSpec = Field(default_factory=MethodSpec, description="LoRA / QLoRA settings.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimizer, schedule, checkpoints.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Nodes, GPUs, strategy, queue.")
    output: OutputSpec = Field(description="Artifact location.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Evaluation and serving gate.")
    serving: ServingSpec = Field(default_factory=ServingSpec, description="vLLM serving.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3 endpoint and credentials.")
    image: Optional[ImageRef] = Field(
        default=None, description="Trainer image for every stage; the operator's default when unset."
    )
    pod_metadata: PodMetadataSpec = Field(
        default_factory=PodMetadataSpec, description="Extra pod labels and annotations, for all stages or per stage."
    )
