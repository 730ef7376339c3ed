"""The merge stage: fold the adapter into the base model and publish bf16 safetensors.

The base is always loaded in bf16 from its original weights (never from 4-bit
weights: dequantized NF4 values are not the base the adapter should be added
to, and the rounding would end up in every served token).

The merged folder is written for the serving side: `make_servable` makes it
load the same under the transformers range of the pinned vLLM
(`kubetune.contract.vllm.TRANSFORMERS`) and under older readers as under the
trainer's own transformers: rope settings in both the v5 form
(`rope_parameters`) and the classic keys (`rope_theta`, `rope_scaling`), a
tokenizer class every version knows, and the chat template inline in
tokenizer_config.json as well as in chat_template.jinja. tests/vllm loads the
result through vLLM's own loaders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from kubetune.trainer import artifacts
from kubetune.trainer.config import TrainerConfig
from kubetune.trainer.termination import write_message
from kubetune.trainer.tokenization import install_chat_template

STAGE = "merge"

# transformers v5 saves the fast tokenizer as "TokenizersBackend", a class transformers 4.x does not have
# (such a reader fails to load the tokenizer); "PreTrainedTokenizerFast" names the same tokenizer.json in
# every version (an alias of TokenizersBackend in v5).
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_V5_ONLY_TOKENIZER_CLASSES = ("TokenizersBackend",)


def _classic_rope(config: dict[str, Any]) -> dict[str, Any]:
    """rope_theta/rope_scaling from v5's rope_parameters, for readers that know only those keys (a reader
    that misses them silently uses rope_theta 10000 and no scaling). Empty when rope_parameters is per
    layer type (Gemma 3: one entry per attention kind), which only v5 readers have a form for."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or "rope_type" not in params:
        return {}
    out: dict[str, Any] = {}
    if "rope_theta" in params and "rope_theta" not in config:
        out["rope_theta"] = params["rope_theta"]
    if params.get("rope_type") != "default" and not config.get("rope_scaling"):
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out


def make_servable(out_dir: Path) -> dict[str, Any]:
    """Rewrite a saved model folder so that every transformers range that may serve it reads it alike
    (see the module docstring). Idempotent; returns what was changed, per file."""
    out_dir = Path(out_dir)
    changed: dict[str, Any] = {}
    config_path = out_dir / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        extra = _classic_rope(config)
        for sub in ("text_config",):  # multimodal configs keep the language model's rope one level down
            if isinstance(config.get(sub), dict) and _classic_rope(config[sub]):
                config[sub].update(_classic_rope(config[sub]))
                changed.setdefault("config.json", {})[sub] = True
        if extra:
            config.update(extra)
            changed.setdefault("config.json", {}).update(extra)
        if changed.get("config.json"):
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tok_path = out_dir / "tokenizer_config.json"
    if tok_path.exists():
        tok = json.loads(tok_path.read_text(encoding="utf-8"))
        edits: dict[str, Any] = {}
        if tok.get("tokenizer_class") in _V5_ONLY_TOKENIZER_CLASSES and (out_dir / "tokenizer.json").exists():
            edits["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
        template_file = out_dir / "chat_template.jinja"
        if template_file.exists() and not tok.get("chat_template"):
            # Readers before chat_template.jinja existed find the template here; both say the same.
            edits["chat_template"] = template_file.read_text(encoding="utf-8")
        if edits:
            tok.update(edits)
            tok_path.write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            changed["tokenizer_config.json"] = sorted(edits)
    return changed


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
    make_servable(out_dir)
    return out_dir


def remove_stale(store, prefix: str, keep: set[str]) -> list[str]:
    """Delete the objects under `prefix` that the new publish will not write (an earlier publish's shards,
    e.g. model-00003-of-00003 after a re-merge into two): serving streams whatever *.safetensors lie under
    merged/, and a stale shard would be loaded beside the new ones. Returns the deleted names."""
    from kubetune.trainer.artifacts import MANIFEST

    deleted = []
    base = prefix.rstrip("/") + "/"
    for obj in store.list(base):
        name = obj.key[len(base):] if obj.key.startswith(base) else obj.key
        if name and name != MANIFEST and name not in keep:
            store.delete(obj.key)
            deleted.append(name)
    return deleted


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
    # The manifest goes first (a reader never pairs it with a half-replaced folder), then the stale files.
    store.delete(f"{artifacts.MERGED}/{artifacts.MANIFEST}")
    stale = remove_stale(store, artifacts.MERGED, set(artifacts.local_files(out)))
    if stale:
        print(f"removed {len(stale)} file(s) of an earlier merged/ publish: {', '.join(sorted(stale)[:5])}")
    manifest = artifacts.publish_dir(store, out, artifacts.MERGED, meta={"baseModel": cfg.base_model.served_name,
                                                                         "dtype": "bfloat16"})
    uri = f"{store.uri.rstrip('/')}/{artifacts.MERGED}/"
    size = sum(f["size"] for f in manifest["files"].values())
    write_message(STAGE, True, "Merged", f"merged model at {uri}", uri=uri, bytes=size)
    print(f"merged model: {uri} ({len(manifest['files'])} files, {size / 1e6:.1f} MB)")
    return 0
