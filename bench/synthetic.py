"""The benchmark's model and data (protocol: /shared/bench/README.md of the team).

- Model: Llama-3-8B shape with random weights, saved once as bf16
  safetensors, plus a word-level tokenizer whose words are the vocabulary
  ids ("w17" -> 17), so that synthetic token ids survive the trainer's real
  text -> tokenizer path unchanged (one word, one token).
- Data: rows of random words with lognormal lengths: the "instruct" profile
  (median ~250 tokens, tail to 2,000) and the "long" profile (multi-turn
  conversations, median ~1,000), and the "learn" profile: instruct's
  lengths with Zipf-distributed words, a loss curve that falls, for the loss
  checks of changes to the numerics.

Weights do not change speed, so random ones stand in for a download.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import time
from pathlib import Path

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
SPECIALS = ("<pad>", "<eos>", "<unk>")

# (mu, sigma, min, cap) of the lognormal token count per row.
PROFILES = {
    "instruct": (math.log(250), 0.6, 24, 2000),
    "long": (math.log(1000), 0.5, 128, 4000),
    # instruct's lengths, words drawn from a Zipf law: random words teach a random model
    # nothing, these let a loss curve fall, for comparing how two variants learn
    "learn": (math.log(250), 0.6, 24, 2000),
    # long context (issue 16 item 3): documents of median ~6k tokens, tail to 32k, packed
    # into rows of 16k-128k tokens; a document longer than dataset.maxLength is truncated
    "longctx": (math.log(6000), 0.7, 1024, 32768),
}
ZIPF = {"learn": (4096, 1.1)}  # profile: (distinct words, exponent)


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


TINY = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False)
# The large-model path (ZeRO-3 QLoRA): Llama-3-70B shape, about 141 GB in bf16.
LLAMA3_70B = dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8)
# Long context: Llama-3.1-8B's own config (the 8B shape, 128k positions, llama3 RoPE
# scaling), so that no recipe rescales RoPE itself past the 8k of Llama-3-8B.
LLAMA31_8B = dict(LLAMA3_8B, max_position_embeddings=131072,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
SHAPES = {"8b": LLAMA3_8B, "8b-128k": LLAMA31_8B, "70b": LLAMA3_70B, "tiny": TINY}
SHARD_BYTES = 5 * 2**30


def make_model(model_dir: str | Path, tiny: bool = False, shape: str | None = None) -> float:
    """Write the random model + tokenizer once; returns seconds spent (0 if present).

    The weights are written shard by shard, straight from random tensors (no
    model is ever instantiated), so that a 70B-shaped model needs no more host
    or GPU memory than one shard: N(0, 0.02) for matrices and embeddings, ones
    for the norms, like transformers' own initialisation of Llama (weights do
    not change speed, but they must be finite and of the usual scale)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = Path(model_dir)
    if (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists():
        return 0.0
    t = time.time()
    cfg = LlamaConfig(**SHAPES[shape or ("tiny" if tiny else "8b")], dtype="bfloat16")
    if not (model_dir / "config.json").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        with torch.device("meta"):
            names = [(n, tuple(p.shape)) for n, p in LlamaForCausalLM(cfg).state_dict().items()]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = torch.Generator(device=device).manual_seed(0)
        shards: list[list[str]] = []  # tensor names per shard, in order
        current: dict = {}

        def flush() -> None:
            shards.append(list(current))
            save_file(current, str(model_dir / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            current.clear()

        total_bytes = 0
        for name, dims in names:
            if name.endswith("norm.weight"):
                current[name] = torch.ones(dims, dtype=torch.bfloat16)
            else:
                current[name] = torch.empty(dims, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=gen).cpu()
            total_bytes += current[name].numel() * 2
            if sum(v.numel() * 2 for v in current.values()) >= SHARD_BYTES:
                flush()
        if current:
            flush()
        weight_map = {}
        for i, keys in enumerate(shards, start=1):
            final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            (model_dir / f"part-{i:05d}.safetensors").rename(model_dir / final)
            weight_map.update({k: final for k in keys})
        (model_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=1))
        cfg.save_pretrained(model_dir)  # last: config.json marks the weights complete
    word_tokenizer(cfg.vocab_size).save_pretrained(model_dir)
    return time.time() - t


def nf4_quantization_config() -> dict:
    """The trainer's QLoRA quantisation (method.quantization defaults: NF4, double
    quantisation, bf16 compute, uint8 storage), as config.json's quantization_config."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8).to_dict()


def quantized_linear(name: str) -> bool:
    """Weights bitsandbytes quantises when transformers loads the model in 4 bit: the
    decoder layers' projections (not the embeddings, norms or the output head)."""
    return ".layers." in name and name.endswith("_proj.weight")


def make_model_nf4(model_dir: str | Path, shape: str = "70b") -> float:
    """Write the random model already quantised, as a bitsandbytes 4-bit checkpoint
    (what `save_pretrained` of a model loaded in 4 bit writes): each projection's random
    bf16 weight, N(0, 0.02), is quantised with bitsandbytes (NF4, double quantisation,
    blocks of 64) on the GPU when there is one and stored with its quant state; the
    embeddings and the output head stay bf16, the norms ones. `from_pretrained` then loads
    it through the real loading path (no quantisation at load). The Llama-3-70B shape is
    about 37 GB this way, against 141 GB in bf16, which the single-GPU machine's 64 GiB
    disk cannot hold. Returns seconds spent (0 if present)."""
    import torch
    from bitsandbytes.functional import quantize_4bit
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = Path(model_dir)
    if (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists():
        return 0.0
    t = time.time()
    cfg = LlamaConfig(**SHAPES[shape], dtype="bfloat16")
    model_dir.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        names = [(n, tuple(p.shape)) for n, p in LlamaForCausalLM(cfg).state_dict().items()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    shards: list[list[str]] = []
    current: dict = {}
    size = 0
    total_bytes = 0

    def flush() -> None:
        shards.append(list(current))
        save_file(current, str(model_dir / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
        current.clear()

    for name, dims in names:
        if name.endswith("norm.weight"):
            entries = {name: torch.ones(dims, dtype=torch.bfloat16)}
        else:
            w = torch.empty(dims, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=gen)
            if quantized_linear(name):
                packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True,
                                              quant_storage=torch.uint8)
                entries = {name: packed.cpu()}
                entries.update({f"{name}.{k}": v.cpu() for k, v in state.as_dict(packed=True).items()})
            else:
                entries = {name: w.cpu()}
            del w
        for k, v in entries.items():
            current[k] = v
            size += v.numel() * v.element_size()
            total_bytes += v.numel() * v.element_size()
        if size >= SHARD_BYTES:
            flush()
            size = 0
    if current:
        flush()
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (model_dir / f"part-{i:05d}.safetensors").rename(model_dir / final)
        weight_map.update({k: final for k in keys})
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=1))
    cfg.quantization_config = nf4_quantization_config()
    cfg.save_pretrained(model_dir)  # last: config.json marks the weights complete
    word_tokenizer(cfg.vocab_size).save_pretrained(model_dir)
    return time.time() - t


def row_lengths(n: int, profile: str, seed: int) -> list[int]:
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    mu, sigma, lo, cap = PROFILES[profile]
    rng = random.Random(seed)
    return [int(min(cap, max(lo, rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def make_dataset(path: str | Path, n: int, profile: str = "instruct", seed: int = 0, vocab_size: int = 128256) -> dict:
    """Write a jsonl dataset in the trainer's "text" format; returns length stats.

    The text has one word fewer than the target length, leaving room for the
    end-of-sequence token the trainer may append.
    """
    rng = random.Random(seed + 1)
    lengths = row_lengths(n, profile, seed)
    lo = len(SPECIALS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if profile in ZIPF:
        n_words, a = ZIPF[profile]
        ids = list(range(lo, min(vocab_size, lo + n_words)))
        cum = list(itertools.accumulate(1.0 / (k + 1) ** a for k in range(len(ids))))
        draw = lambda k: rng.choices(ids, cum_weights=cum, k=k)  # noqa: E731
    else:
        draw = lambda k: [rng.randrange(lo, vocab_size) for _ in range(k)]  # noqa: E731
    with path.open("w") as f:
        for L in lengths:
            words = " ".join(f"w{i}" for i in draw(L - 1))
            f.write(json.dumps({"text": words}) + "\n")
    s = sorted(lengths)
    return {"rows": n, "profile": profile, "seed": seed, "tokens": sum(lengths), "median": s[n // 2],
            "p99": s[min(n - 1, int(n * 0.99))], "max": s[-1]}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write the benchmark model and/or dataset")
    ap.add_argument("--model-dir")
    ap.add_argument("--data")
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--profile", default="instruct", choices=sorted(PROFILES))
    a = ap.parse_args()
    if a.model_dir:
        print(f"model: {make_model(a.model_dir):.1f}s", flush=True)
    if a.data:
        print(make_dataset(a.data, a.rows, a.profile), flush=True)
    if not (a.model_dir or a.data):
        ap.error("nothing to do: give --model-dir and/or --data")
    os.sys.exit(0)
