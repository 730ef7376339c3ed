"""FineTuneJob -> TrainerConfig: the one translation of the user's spec into the
trainer's config file (rendered to YAML into the `<job>-config` ConfigMap, and
used directly by `kubetune run`).

Every spec field is in exactly one of three places, and
tests/unit/test_contract.py fails when a new field is in none:
  * a recipe section (RECIPE_SECTIONS): the same class in the spec and the
    trainer config, copied whole;
  * RENDERED: a spec field that lands elsewhere in the trainer config;
  * OPERATOR_ONLY: read by the operator alone (pods, queueing, serving,
    credentials), never by the trainer.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from kubetune.contract.facts import CONFIG_DIR, CONFIG_FILE, CONFIG_PATH, KERNEL_CACHE  # noqa: F401  (the first three re-exported for the builders)
from kubetune.trainer.config import TrainerConfig

from . import revisions
from .api import FineTuneJob

# Spec sections that are trainer config sections (kubetune.contract.recipe).
RECIPE_SECTIONS = ("base_model", "dataset", "method", "training", "evaluation")

# spec path -> trainer config path, for the fields that change place (output.uri
# becomes the revision's own prefix under it).
RENDERED: dict[tuple[str, ...], tuple[str, ...]] = {
    ("output", "uri"): ("output", "uri"),
    ("output", "merge"): ("merge", "enabled"),
    # default: the job's own <uri>/kernel-cache/ (render)
    ("output", "kernel_cache_uri"): ("output", "kernel_cache_uri"),
    ("resources", "strategy"): ("launch", "strategy"),
    ("storage", "endpoint_url"): ("storage", "endpoint_url"),
    ("storage", "region"): ("storage", "region"),
    # The validate stage checks the base model's heads split over it (before any GPU time is spent).
    ("serving", "gpus"): ("serve", "tensor_parallel_size"),
}

# Spec paths (a section or one field) the trainer never reads.
OPERATOR_ONLY: frozenset[tuple[str, ...]] = frozenset({
    ("resources", "nodes"),  # the launcher's world size (accelerate launch flags)
    ("resources", "gpus_per_node"),
    ("resources", "gpu_type"),
    ("resources", "cpu"),
    ("resources", "memory"),
    ("resources", "shm_size"),
    ("resources", "queue_name"),
    ("resources", "priority_class_name"),
    ("resources", "workload_priority_class_name"),
    ("resources", "max_restarts"),  # the operator restarts the gang; the trainer resumes either way
    ("output", "delete_on_job_deletion"),
    *(("serving", f) for f in ("enabled", "mode", "replicas", "cpu", "memory", "autoscaling", "gpu_type",
                               "max_model_len", "served_model_name", "api_key_secret_ref", "canary")),
    ("storage", "credentials_secret_ref"),  # pods get it as env from the Secret, never in the config
    ("storage", "service_account_name"),
    ("image",),
    ("pod_metadata",),
})


def as_job(job: Union[FineTuneJob, Mapping[str, Any]]) -> FineTuneJob:
    return job if isinstance(job, FineTuneJob) else FineTuneJob.from_body(job)


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        obj = getattr(obj, part)
    return obj


def trainer_config_for(
    job: Union[FineTuneJob, Mapping[str, Any]],
    *,
    namespace: Optional[str] = None,
) -> TrainerConfig:
    """Pure. `job` is a FineTuneJob model or its dict (kopf body, YAML document).

    `namespace` overrides metadata.namespace (a YAML file applied with -n).
    """
    job = as_job(job)
    spec = job.spec
    data: dict[str, Any] = {name: getattr(spec, name).model_dump() for name in RECIPE_SECTIONS}
    for src, dst in RENDERED.items():
        section = data.setdefault(dst[0], {})
        section[dst[1]] = _get(spec, src)
    # Each revision writes under its own prefix: an edit never overwrites the artifact being served.
    data["output"]["uri"] = revisions.artifact_root(spec, revisions.revision_id(spec))
    # The compiled kernels are not an artifact of one revision: every pod of the job reuses them.
    data["output"]["kernel_cache_uri"] = spec.output.kernel_cache_uri or f"{spec.output.uri.rstrip('/')}/{KERNEL_CACHE}/"
    if not spec.serving.enabled:
        data["serve"]["tensor_parallel_size"] = None  # nothing will be served: nothing to check
    data["job"] = {"name": job.metadata.name, "namespace": namespace or job.metadata.namespace}
    return TrainerConfig.model_validate(data)
