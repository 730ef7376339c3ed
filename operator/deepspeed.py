"""DeepSpeed config rendered from the spec (pure).

Batch sizes, clipping and precision are "auto": the Hugging Face Trainer fills
them from the trainer config, so the two can never disagree.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from .api import FineTuneJob

DEEPSPEED_FILE = "deepspeed.json"
_STAGES = {"deepspeed-zero2": 2, "deepspeed-zero3": 3}


def deepspeed_config(job: FineTuneJob) -> Optional[dict[str, Any]]:
    """None for DDP."""
    stage = _STAGES.get(job.spec.resources.strategy)
    if stage is None:
        return None
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                # Save a consolidated 16-bit model instead of per-rank shards,
                # so the adapter upload reads ordinary safetensors.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "steps_per_print": 1000000,
        "wall_clock_breakdown": False,
    }


def render(job: FineTuneJob) -> Optional[str]:
    cfg = deepspeed_config(job)
    return None if cfg is None else json.dumps(cfg, indent=2, sort_keys=True)
