"""A tiny random-weight Llama-style model with a locally trained tokenizer.

For local runs, examples and tests where no model hub can be reached: the
tokenizer is a byte-level BPE trained with the `tokenizers` library on the
given texts, with a chat template whose turn markers are special tokens (so
the template renders prefix-stably, which completion-only loss relies on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Every turn is "<|role|>\n{content}<|end|>\n"; generation is prompted with "<|assistant|>\n"
# and stops at <|end|> (the eos token), which is part of the assistant's labels.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin|>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
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
) -> Path:
    """Write a random-weight LlamaForCausalLM + tokenizer to `out_dir` (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Wider than the usual 0.02: behind the final RMSNorm a frozen head with tiny weights caps how far
        # LoRA can move the logits, and a random model would then barely learn in a test-sized run.
        initializer_range=initializer_range,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
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

    for line in Path(path).read_text(encoding="utf-8").splitlines():
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
