"""AdapterServer: one vLLM server of a base model, shared by the FineTuneJobs that serve adapters on it.

An internal resource: the operator creates it, never a user. Each FineTuneJob
with `serving.mode: adapter` server-side applies its own entry of
`spec.adapters` and its own owner reference, under a field manager of its own
(`adapter_servers.job_manager`), so the entries of several jobs merge in one
object and each job removes only its own. The server fields (`baseModel`,
`serving`, `storage`) are the same for every job on it: the object's name is a
hash of them (`adapter_servers.server_name`), so jobs that differ there get
different servers. The object goes with its last owner (the garbage collector
deletes an object none of whose owners exists; the operator deletes one left
without adapters).

`status.adapters` is written by the loader sidecar of the server's pods
(trainer/adapter_loader.py), the rest of status by the operator.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import ConfigDict, Field

from kubetune.contract.rules import ApiModel

from .spec import DnsLabel, LabelValue, ModelUri, ObjectName, Quantity, S3Uri, SecretKeyRef, StorageSpec
from .status import Condition, StatusModel

KIND = "AdapterServer"
PLURAL = "adapterservers"
SINGULAR = "adapterserver"
LIST_KIND = "AdapterServerList"
SHORT_NAMES = ["kas"]

PRINTER_COLUMNS = [
    {"name": "Base", "type": "string", "jsonPath": ".spec.baseModel", "description": "Base model served."},
    {"name": "Adapters", "type": "integer", "jsonPath": ".status.adapterCount", "description": "Adapters assigned."},
    {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


class ServerServing(ApiModel):
    """The serving settings the jobs on one server share (their FineTuneJobs' spec.serving)."""

    gpus: int = Field(default=1, ge=1, le=8, description="GPUs per replica (tensor-parallel size).")
    gpu_type: Optional[LabelValue] = Field(default=None, description="nvidia.com/gpu.product of the serving nodes.")
    replicas: int = Field(default=1, ge=0, le=64, description="vLLM replicas.")
    cpu: Quantity = Field(default="8", description="CPU request per vLLM pod.")
    memory: Quantity = Field(default="64Gi", description="Memory request and limit per vLLM pod.")
    max_model_len: Optional[int] = Field(default=None, ge=16, le=1_048_576, description="vLLM --max-model-len.")
    api_key_secret_ref: Optional[SecretKeyRef] = Field(default=None, description="Secret key holding the API key.")


class AdapterEntry(ApiModel):
    """One job's adapter on the server."""

    name: DnsLabel = Field(description="Model name clients send (the job's served model name).")
    job: ObjectName = Field(description="The FineTuneJob serving it.")
    uri: S3Uri = Field(description="s3:// prefix of the adapter (its revision's adapter/).")
    rank: int = Field(ge=1, le=1024, description="Its LoRA rank (sizes --max-lora-rank).")


class AdapterServerSpec(ApiModel):
    base_model: ModelUri = Field(description="s3:// prefix of the base model every adapter was trained on.")
    serving: ServerServing = Field(default_factory=ServerServing, description="Shared serving settings.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3 endpoint and credentials.")
    adapters: list[AdapterEntry] = Field(
        default_factory=list, max_length=256,
        # A list-map: server-side apply merges the entries that different jobs (field managers) apply.
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="One entry per job, applied by that job.",
    )


class AdapterState(StatusModel):
    """What the loader sidecar last did with one adapter."""

    uri: Optional[str] = Field(default=None, description="The adapter prefix it acted on (the job's revision).")
    state: Literal["Loaded", "Refused"] = Field(
        description="Loaded into vLLM, or refused (tampered, incomplete, did not answer).")
    served_uri: Optional[str] = Field(
        default=None, description="The version answering under the name now: an earlier revision's while a "
        "refused new one is held back.")
    message: Optional[str] = Field(default=None, max_length=4096, description="Why it was refused.")
    pod: Optional[str] = Field(default=None, description="The server pod that reported it.")
    time: Optional[str] = Field(default=None, description="When (RFC 3339).")


class AdapterServerStatus(StatusModel):
    model_config = ConfigDict(extra="allow")

    observed_generation: Optional[int] = Field(default=None, description="metadata.generation last reconciled.")
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="Ready: a replica is Ready (every assigned adapter loaded on it).",
    )
    adapter_count: Optional[int] = Field(default=None, description="Adapters assigned (entries of live jobs).")
    max_loras: Optional[int] = Field(default=None, description="The server's --max-loras.")
    max_lora_rank: Optional[int] = Field(default=None, description="The server's --max-lora-rank.")
    endpoint: Optional[str] = Field(default=None, description="In-cluster base URL of the OpenAI-compatible API.")
    adapters: dict[str, AdapterState] = Field(
        default_factory=dict, description="Per adapter name, what the loader sidecar last did (written by the pods)."
    )
