"""The vLLM release kubetune serves with, pinned in one place.

The serving image (operator settings' default `vllm_image`) and the `vllm`
package the compatibility tests install (tests/vllm/vllm-env.lock, generated
from `PACKAGE`) are both derived from `VERSION`: bumping vLLM is a change of
this file and a regenerated lock, and tests/unit/test_serving.py fails when
the two disagree.

`TRANSFORMERS` is the transformers range that release requires (its wheel's
Requires-Dist; tests/vllm checks it against the installed package). The
trainer writes `merged/` with its own, newer transformers
(requirements.lock) and makes the output loadable by this range
(trainer/merge.py `make_servable`): the tests/vllm suite loads a merged
folder through vLLM's own config and tokenizer loaders to prove it.
"""

from __future__ import annotations

VERSION = "0.33.0"
PACKAGE = f"vllm=={VERSION}"
# The OpenAI-compatible server image vLLM publishes for each release.
IMAGE = f"vllm/vllm-openai:v{VERSION}"
# transformers range of vLLM VERSION (its Requires-Dist), as (lower inclusive, upper exclusive).
TRANSFORMERS = ("5.16.1", "5.21.0")
# vLLM's --max-lora-rank choices (its LoRAConfig); a published adapter above the top one cannot be served.
MAX_LORA_RANK = 512


# Reasons `kubetune verify-artifact` refuses an artifact with (its termination message): the same files give
# the same answer on every retry, so the operator fails the serve stage at once. Any other failure of the
# init container (S3 unreachable, a crash) is retried by the kubelet and bounded like a crash loop.
ARTIFACT_REFUSALS = ("ArtifactCorrupted", "ArtifactIncomplete", "UnmanifestedFiles", "TensorParallelMismatch")


def tensor_parallel_problem(config: dict, tp: int) -> str | None:
    """Why vLLM cannot shard a model with this config.json over `tp` GPUs, or None.

    vLLM splits the attention heads evenly over the tensor-parallel ranks; key/value heads are split
    when there are at least `tp` of them, and replicated otherwise (then `tp` must be a multiple).
    Multimodal configs keep the language model's under text_config."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    heads = text.get("num_attention_heads")
    if not isinstance(heads, int) or heads <= 0:
        return None  # not a head-count model vLLM shards this way: vLLM's own check applies
    kv = text.get("num_key_value_heads") or heads
    if heads % tp:
        return (f"the model has {heads} attention heads, which {tp} GPUs cannot split evenly: set serving.gpus "
                f"to one of {[n for n in (1, 2, 4, 8) if heads % n == 0]}")
    if kv >= tp and kv % tp:
        return f"the model has {kv} key/value heads, which {tp} GPUs cannot split evenly"
    if kv < tp and tp % kv:
        return f"the model's {kv} key/value heads cannot be replicated evenly over {tp} GPUs"
    return None


# The only modules_to_save vLLM loads with an adapter (heads of classification models).
SAVEABLE_MODULES = ("classifier", "score")

# vLLM's --max-lora-rank choices (its LoRAConfig.max_lora_rank Literal); tests/vllm compares with vLLM's own.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_problems(r: int, use_dora: bool, bias: str, modules_to_save: list[str] | tuple[str, ...],
                  rank_pattern: dict | None = None) -> list[str]:
    """Why vLLM VERSION would refuse to load an adapter of this recipe (its PEFTHelper checks), or [].

    For adapter-mode serving, which must refuse such a recipe at admission instead of after training;
    tests/vllm checks this predicate against vLLM's own checks on a matrix of adapter configs."""
    out = []
    unsupported = [m for m in modules_to_save or () if m not in SAVEABLE_MODULES]
    if unsupported:
        out.append(f"vLLM serves no adapter with modules_to_save {unsupported} (only classifier/score heads)")
    if use_dora:
        out.append("vLLM does not serve DoRA adapters")
    top = max([r, *(rank_pattern or {}).values()])
    if top > MAX_LORA_RANK:
        out.append(f"LoRA rank {top} is above vLLM's largest --max-lora-rank {MAX_LORA_RANK}")
    if bias != "none":
        out.append("vLLM serves no adapter with trained biases (bias must be none)")
    return out


def max_lora_rank_for(r: int) -> int:
    """The --max-lora-rank a server needs for adapters of rank up to r: the smallest choice at or above it."""
    return min(c for c in LORA_RANKS if c >= r)
