"""DeepSpeed config rendered from the spec (pure)."""

from __future__ import annotations

import json
from typing import Any, Optional

from kubetune.contract.facts import DEEPSPEED_FILE  # noqa: F401  (re-exported: the file name lives with the other pod paths)
from kubetune.trainer.deepspeed import deepspeed_config as config_for_strategy

from .api import FineTuneJob



def deepspeed_config(job: FineTuneJob) -> Optional[dict[str, Any]]:
    """None for DDP. The trainer owns the config itself (one source for both launch paths)."""
    return config_for_strategy(job.spec.resources.strategy)


def render(job: FineTuneJob) -> Optional[str]:
    cfg = deepspeed_config(job)
    return None if cfg is None else json.dumps(cfg, indent=2, sort_keys=True)
