"""Tiny random-weight models with locally trained tokenizers, built from configs (no download).

For local runs, examples and tests where no model hub can be reached. The
tokenizer is a byte-level BPE trained with the `tokenizers` library on the
given texts; a family's turn markers are special tokens of it, as in the real
vocabulary.

- family "kubetune" (the default): a Llama with kubetune's own small chat
  template, whose `{% generation %}` blocks mark the assistant's replies.
- the families of `FAMILIES` (llama, mistral, qwen2, qwen3, gemma2, gemma3,
  phi3): that family's architecture with the chat template TRL ships for it,
  read from the installed TRL package (the template the model's own
  tokenizer_config.json carries, without generation blocks: the trainer
  finds TRL's training version of it as it would for the real model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Every turn is "<|role|>\n{content}<|end|>\n"; generation is prompted with "<|assistant|>\n"
# and stops at <|end|> (the eos token). The generation block holds what the model must learn to
# say: the reply and its <|end|>\n, not the "<|assistant|>\n" cue the prompt already carries.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' + '\n' }}{% generation %}{{ message['content'] + '<|end|>' + '\n' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """What a tiny model of a family needs beyond its config class: the template TRL ships for it and
    the vocabulary's special tokens (facts about the family's tokenizer, not its template)."""

    config: str  # transformers config class
    template: str  # name of the chat template in trl/chat_templates
    eos: str  # the token that ends an assistant turn (generation stops there)
    pad: str
    specials: tuple[str, ...]
    bos: Optional[str] = None
    config_kwargs: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", "llama3", "<|eot_id|>", "<|finetune_right_pad_id|>",
                    ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                     "<|finetune_right_pad_id|>"), bos="<|begin_of_text|>"),
    # TRL ships no text-only Mistral template; llava_next is Mistral's [INST] format (llava-v1.6-mistral-7b),
    # written for content blocks, which the trainer detects and hands it.
    "mistral": Family("MistralConfig", "llava_next", "</s>", "<unk>", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
                      bos="<s>", config_kwargs={"sliding_window": 32}),
    "qwen2": Family("Qwen2Config", "qwen2_5", "<|im_end|>", "<|endoftext|>", ("<|endoftext|>", "<|im_start|>", "<|im_end|>")),
    "qwen3": Family("Qwen3Config", "qwen3", "<|im_end|>", "<|endoftext|>",
                    ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")),
    # Gemma and Gemma 2 ship the same template (TRL's gemma.jinja); it has no system turn.
    "gemma2": Family("Gemma2Config", "gemma", "<end_of_turn>", "<pad>",
                     ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), bos="<bos>",
                     config_kwargs={"sliding_window": 32, "query_pre_attn_scalar": 16}),
    "gemma3": Family("Gemma3TextConfig", "gemma3", "<end_of_turn>", "<pad>",
                     ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), bos="<bos>",
                     config_kwargs={"sliding_window": 32, "query_pre_attn_scalar": 16,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": Family("Phi3Config", "phi3", "<|endoftext|>", "<|endoftext|>",
                   ("<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), bos="<s>"),
}


def trl_template(name: str) -> str:
    from kubetune.trainer.tokenization import trl_template_dir

    return (trl_template_dir() / f"{name}.jinja").read_text(encoding="utf-8")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, family: str = "kubetune"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if family == "kubetune":
        specials, bos, eos, pad, unk, template = SPECIAL_TOKENS, "<|begin|>", "<|end|>", "<pad>", "<unk>", CHAT_TEMPLATE
    else:
        fam = FAMILIES[family]
        specials, bos, eos, pad, template = list(fam.specials), fam.bos, fam.eos, fam.pad, trl_template(fam.template)
        unk = "<unk>" if "<unk>" in fam.specials else None
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        chat_template=template,
        model_max_length=4096,
    )


def _config(family: str, tokenizer, *, hidden_size: int, layers: int, heads: int, kv_heads: int, max_positions: int,
            initializer_range: float):
    import transformers

    name = "LlamaConfig" if family == "kubetune" else FAMILIES[family].config
    extra = {} if family == "kubetune" else dict(FAMILIES[family].config_kwargs)
    if "layer_types" in extra:
        extra["layer_types"] = [extra["layer_types"][i % len(extra["layer_types"])] for i in range(layers)]
    return getattr(transformers, name)(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Wider than the usual 0.02: behind the final RMSNorm a frozen head with tiny weights caps how far
        # LoRA can move the logits, and a random model would then barely learn in a test-sized run.
        initializer_range=initializer_range,
        torch_dtype="float32",
        **extra,
    )


def write_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int = 512,
    max_positions: int = 1024,
    seed: int = 0,
    initializer_range: float = 0.2,
    family: str = "kubetune",
) -> Path:
    """Write a random-weight causal LM of `family` + tokenizer to `out_dir` (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    if family != "kubetune" and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (kubetune, {', '.join(FAMILIES)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, family=family)
    config = _config(family, tokenizer, hidden_size=hidden_size, layers=layers, heads=heads, kv_heads=kv_heads,
                     max_positions=max_positions, initializer_range=initializer_range)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def texts_of_jsonl(path: str | Path) -> list[str]:
    """Every string found in a JSON Lines dataset (to train the tokenizer on)."""
    import json

    out: list[str] = []

    def walk(v):
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    for line in Path(path).read_text(encoding="utf-8-sig").splitlines():
        if line.strip():
            walk(json.loads(line))
    return out


# Enough text for a usable byte-level BPE when no dataset is given.
DEFAULT_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password? Open Settings, then Security, then Reset password.",
    "You are a helpful assistant. Answer briefly and precisely.",
    "Kubernetes runs containers in pods; a Job runs pods to completion.",
] * 50
