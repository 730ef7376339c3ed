"""Unsloth as a reference recipe, on the benchmark's own model and data.

Run by `bench/run.py --unsloth 8x1` in a process of its own whose PYTHONPATH is
Unsloth's own install target (its trl and datasets pins stay out of the cases'
install), on a copy of the random model in a folder of its own (the word
tokenizer saved beside it), reading the same jsonl file the cases train on.

Unsloth's own recommended settings for QLoRA on this task (its notebooks and
docs): NF4 4-bit load (`load_in_4bit=True`), bf16 compute, LoRA dropout 0 and
no bias (its fast LoRA kernels need both), its own gradient checkpointing
(`use_gradient_checkpointing="unsloth"`: checkpoints offloaded to host memory),
packing (`packing=True`, which Unsloth turns into padding-free packed rows with
per-sequence lengths, so attention runs varlen), the 8-bit AdamW of its
notebooks (`optim="adamw_8bit"`), learning rate 2e-4, linear schedule. The
micro-batch is a command-line choice (`BxA`: rows per micro-batch x gradient
accumulation); at 8 x 1 an optimizer step holds the same ~16k tokens as the
cases' 8 x 2048 micro-batch and the reference's 2 x 4. LoRA r=16, alpha 32 on
q/k/v/o: the cases' and the reference's adapter.

The clock is the reference recipe's: a CUDA sync at every optimizer step.
Tokens: non-pad input ids of every training forward (the pad id never occurs
in the synthetic data, and the packed rows carry no padding). Prints one line
`RESULT {json}` and writes the same JSON to --result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

T_PROCESS = time.time()


def matmul_params(model_dir: str | Path) -> float:
    """The N of the 4·N FLOPs convention for the model in model_dir (every projection of
    every layer, plus the output head), read from its config.json: the same count as
    run.matmul_params, so that Unsloth's MFU and the cases' use one N for any shape."""
    c = json.loads(Path(model_dir, "config.json").read_text())
    h, ffn, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c.get("num_key_value_heads", c["num_attention_heads"])
    return float(layers * (h * (2 * h + 2 * kv) + 3 * h * ffn) + h * c["vocab_size"])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data", required=True, help="jsonl of {'text': ...} rows (bench/synthetic.py)")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--output-dir", default="out")
    ap.add_argument("--result", required=True)
    return ap


def main() -> int:
    args = parser().parse_args()

    # Unsloth patches transformers, peft and trl when imported: before any of them.
    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    t_imports = time.time()

    def sync():
        torch.cuda.synchronize()

    torch.cuda.reset_peak_memory_stats()
    t_load = time.time()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model_dir, max_seq_length=args.max_length, dtype=torch.bfloat16, load_in_4bit=True,
        use_gradient_checkpointing="unsloth", random_state=args.seed)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none", target_modules=args.targets.split(","),
        use_gradient_checkpointing="unsloth", random_state=args.seed, use_rslora=False)
    sync()
    load_s = time.time() - t_load
    load_peak = torch.cuda.max_memory_allocated()
    after_load = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t_after_load = time.time()

    # The same rows as the cases: each text's words are token ids of the word-level
    # tokenizer saved beside the model; end-of-sequence appended as the trainer does.
    t_data = time.time()
    texts = [json.loads(line)["text"] for line in Path(args.data).read_text().splitlines() if line.strip()]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": [row + [eos] for row in ids]})
    data_s = time.time() - t_data

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends, self.step_tokens, self.step_embedding_tokens, self.losses = [], [], [], {}
            self.tokens = 0
            self.embedding_tokens = 0
            self.peak_train = 0
            self.train_begin = None

        def count(self, module, a, kw):
            if not module.training:
                return
            x = kw.get("input_ids")
            if x is None and a:
                x = a[0]
            self.tokens += int((x != pad).sum())

        def count_embedding(self, module, a):
            # cross-check, and the count used should Unsloth call the model's forward
            # without its hooks: the embedding sees every training forward's ids once
            # (Unsloth's checkpointing recomputes decoder layers, never the embedding)
            if module.training and torch.is_grad_enabled():
                self.embedding_tokens += int((a[0] != pad).sum())

        def on_train_begin(self, args_, state, control, model=None, **kw):
            sync()
            self.train_begin = time.time()
            model.register_forward_pre_hook(self.count, with_kwargs=True)
            model.get_input_embeddings().register_forward_pre_hook(self.count_embedding)

        def on_step_end(self, args_, state, control, **kw):
            sync()
            self.ends.append(time.time())
            self.step_tokens.append(self.tokens)
            self.step_embedding_tokens.append(self.embedding_tokens)
            self.tokens = self.embedding_tokens = 0
            self.peak_train = max(self.peak_train, torch.cuda.max_memory_allocated())

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses[state.global_step] = logs["loss"]

    clock = Clock()
    settings = dict(
        load_in_4bit=True, dtype="bfloat16", max_seq_length=args.max_length, r=16, lora_alpha=32, lora_dropout=0.0,
        bias="none", target_modules=args.targets.split(","), use_gradient_checkpointing="unsloth", packing=True,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accum, optim="adamw_8bit",
        learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.001, bf16=True,
        logging_steps=args.log_every, seed=args.seed)
    cfg = SFTConfig(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum, learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=1,
        weight_decay=0.001, optim="adamw_8bit", bf16=True, logging_steps=args.log_every, save_strategy="no",
        report_to=[], max_length=args.max_length, packing=True, seed=args.seed)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    sync()
    t_setup = time.time()
    trainer.train()
    sync()

    ends, toks, counted_at = clock.ends, clock.step_tokens, "model forward"
    if not sum(toks):
        toks, counted_at = clock.step_embedding_tokens, "input embedding"
    if not sum(toks):
        raise RuntimeError("no training tokens counted: neither the model's nor the embedding's forward hook ran")
    steady = list(range(args.warmup, len(ends)))
    if len(steady) < 20:
        print(f"warning: only {len(steady)} steady steps (protocol: >= 20)", flush=True)
    rates = [toks[i] / (ends[i] - ends[i - 1]) for i in steady]
    sec = [ends[i] - ends[i - 1] for i in steady]
    tps = statistics.median(rates)
    n_matmul = matmul_params(args.model_dir)  # this model's shape (the 8B's 7.5e9 was fixed before)

    import importlib.metadata as md

    versions = {}
    for n in ("unsloth", "unsloth_zoo", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes",
              "datasets", "torchao", "cut_cross_entropy", "triton", "xformers", "flash_attn"):
        try:
            versions[n] = md.version(n)
        except md.PackageNotFoundError:
            versions[n] = None
    attention = {}
    try:
        from unsloth.utils import attention_dispatch as ad

        attention = {"packed_backend": ad.select_attention_backend(use_varlen=True),
                     "has_flash_attention": bool(ad.HAS_FLASH_ATTENTION), "has_xformers": bool(ad.HAS_XFORMERS)}
    except Exception as e:  # a record without it is still a record; say why
        attention = {"error": f"{type(e).__name__}: {e}"}
    collator = trainer.data_collator
    res = {
        "name": f"unsloth_{args.batch}x{args.accum}",
        "recipe": "unsloth",
        "settings": settings,
        "packing_effective": {"packing": bool(getattr(trainer.args, "packing", None)),
                              "padding_free": bool(getattr(trainer.args, "padding_free", None)),
                              "collator_padding_free": getattr(collator, "padding_free", None),
                              "collator_wrapped_for_packing": bool(getattr(collator, "_unsloth_packing_wrapped", False))},
        "attention": attention,
        "gradient_checkpointing": trainer.args.gradient_checkpointing,
        "steps": len(ends),
        "steady_steps": len(rates),
        "tokens_per_step_median": statistics.median(toks[i] for i in steady),
        "tokens_counted_at": counted_at,
        "tokens_seen_model_forward": sum(clock.step_tokens),
        "tokens_seen_embedding": sum(clock.step_embedding_tokens),
        "sec_per_step_median": round(statistics.median(sec), 4),
        "tokens_per_s": round(tps),
        "tokens_per_s_min_max": [round(min(rates)), round(max(rates))],
        "mfu_4N_vs_989TF": round(4 * n_matmul * tps / 989e12, 3),
        "model_matmul_params": n_matmul,
        "peak_gib_load": round(load_peak / 2**30, 2),
        "after_load_gib": round(after_load / 2**30, 2),
        "peak_gib_train": round(clock.peak_train / 2**30, 2),
        # measured from before loading, as the reference recipe measures its peak
        "peak_mem_gib": round(max(load_peak, clock.peak_train) / 2**30, 2),
        "ttfs": {"process_start_to_first_step_s": round(ends[0] - T_PROCESS, 1),
                 "imports_s": round(t_imports - T_PROCESS, 1), "load_quantize_lora_s": round(load_s, 1),
                 "data_prep_s": round(data_s, 1), "trainer_setup_s": round(t_setup - t_after_load - data_s, 1),
                 "first_step_s": round(ends[0] - clock.train_begin, 1)},
        "loss": {str(k): round(v, 4) for k, v in sorted(clock.losses.items())},
        "rows": len(texts),
        "versions": versions,
        "gpu": torch.cuda.get_device_name(),
    }
    Path(args.result).write_text(json.dumps(res))
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
