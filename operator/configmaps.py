"""The `<job>-config` ConfigMap: the rendered TrainerConfig (and the DeepSpeed
config when the strategy is DeepSpeed). It holds no secret: credentials stay
in Secrets referenced by the pods' env."""

from __future__ import annotations

from typing import Any

from . import deepspeed, names, revisions
from .api import FineTuneJob
from .pods import metadata
from kubetune.contract.facts import CONFIG_FILE

from .render import trainer_config_for


def config_map(job: FineTuneJob) -> dict[str, Any]:
    """The config of the revision the spec asks for (immutable: a new revision gets a new one)."""
    rev = revisions.of(job)
    data = {CONFIG_FILE: trainer_config_for(job).to_yaml()}
    ds = deepspeed.render(job)
    if ds is not None:
        data[deepspeed.DEEPSPEED_FILE] = ds
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(job, names.config_map(job.metadata.name, rev), "config", rev=rev),
        # The config a run started with is the config it finishes with: an edit
        # that changes the recipe is a new revision with a ConfigMap of its own.
        "immutable": True,
        "data": data,
    }
