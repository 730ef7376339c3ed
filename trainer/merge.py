"""The merge stage: fold the adapter into the base model and publish bf16 safetensors.

The base is always loaded in bf16 from its original weights (never from 4-bit
weights: dequantized NF4 values are not the base the adapter should be added
to, and the rounding would end up in every served token).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from kubetune.trainer import artifacts
from kubetune.trainer.config import TrainerConfig
from kubetune.trainer.termination import write_message
from kubetune.trainer.tokenization import install_chat_template

STAGE = "merge"


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, max_shard_size: str = "2GB",
                  chat_template: Optional[str] = None) -> Path:
    """Write base+adapter as one bf16 model (sharded safetensors + tokenizer) to `out_dir`.

    `chat_template` (dataset.chatTemplate) becomes the merged tokenizer's: the model is served with
    the template it was fine-tuned on, also when the base model had none."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # On a GPU the merge (one matmul per adapted layer) takes seconds instead of minutes; same bf16 math.
    device_map = {"": 0} if torch.cuda.is_available() else None
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16, device_map=device_map)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: fail on NaNs instead of publishing them
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    install_chat_template(tokenizer, chat_template)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def run_merge(cfg: TrainerConfig) -> int:
    from kubetune.trainer.modelio import base_model_dir, check_model_source, fetch_adapter, output_store
    from kubetune.trainer.train import run_dir_for

    if not cfg.merge.enabled:
        write_message(STAGE, True, "MergeDisabled", "merge.enabled is false; nothing to do")
        print("merge disabled (merge.enabled=false)")
        return 0
    check_model_source(cfg)  # before "no adapter yet": a base model that can never load is the first thing to say
    store = output_store(cfg)
    work = run_dir_for(cfg) / "merge"
    msg = fetch_adapter(cfg, store, work / "adapter", STAGE)
    if msg is not None:
        return 1
    out = merge_adapter(base_model_dir(cfg), work / "adapter", work / "merged", cfg.merge.max_shard_size,
                        cfg.dataset.chat_template)
    manifest = artifacts.publish_dir(store, out, artifacts.MERGED, meta={"baseModel": cfg.base_model.served_name,
                                                                         "dtype": "bfloat16"})
    uri = f"{store.uri.rstrip('/')}/{artifacts.MERGED}/"
    size = sum(f["size"] for f in manifest["files"].values())
    write_message(STAGE, True, "Merged", f"merged model at {uri}", uri=uri, bytes=size)
    print(f"merged model: {uri} ({len(manifest['files'])} files, {size / 1e6:.1f} MB)")
    return 0
