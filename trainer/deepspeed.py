"""The DeepSpeed config for a training strategy (pure; no DeepSpeed import).

One source for both launch paths: the operator renders it into the job's
ConfigMap for `accelerate launch --deepspeed_config_file`, and the trainer uses
it when started without a launcher config. Batch sizes, clipping and precision
are "auto": the Hugging Face Trainer fills them from the trainer config, so the
two can never disagree.
"""

from __future__ import annotations

import os
from typing import Any, Optional

STAGES = {"deepspeed-zero2": 2, "deepspeed-zero3": 3}


def deepspeed_config(strategy: str) -> Optional[dict[str, Any]]:
    """None for DDP."""
    stage = STAGES.get(strategy)
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


def zero3_enabled(strategy: str) -> bool:
    """Whether ZeRO-3 partitions the weights: by the trainer config's strategy or by
    the launcher (`accelerate launch --zero_stage 3` sets the variable below)."""
    return strategy == "deepspeed-zero3" or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
