"""The evaluate stage: held-out loss and perplexity of the base vs the tuned model,
generations for the configured prompts, and the gate verdict (evaluation.minImprovement).

The held-out rows are the validation split that train used (same split function
and seed), so "tuned" was never trained on them.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from kubetune.trainer import artifacts
from kubetune.trainer.config import TrainerConfig
from kubetune.trainer.termination import write_message
from kubetune.trainer.tokenization import IGNORE, Encoded

STAGE = "evaluate"


def gate(base_loss: float, tuned_loss: float, min_improvement: Optional[float]) -> dict[str, Any]:
    """Pure: the verdict. improvement = relative drop of held-out loss."""
    improvement = (base_loss - tuned_loss) / base_loss if base_loss > 0 else 0.0
    passed = min_improvement is None or improvement >= min_improvement
    return {"improvement": round(improvement, 6), "minImprovement": min_improvement, "passed": passed}


def heldout_loss(model, rows: list[Encoded], batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy over the label tokens of `rows`."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            width = max(len(r.input_ids) for r in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, r in enumerate(chunk):
                n = len(r.input_ids)
                ids[j, :n] = torch.tensor(r.input_ids)
                labels[j, :n] = torch.tensor(r.labels)
                mask[j, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
            shift_labels = labels[:, 1:].reshape(-1).to(device)
            loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
            total += float(loss)
            count += int((shift_labels != IGNORE).sum())
    return total / max(count, 1)


def stop_tokens(model, tokenizer) -> list[int]:
    """The model's own stop tokens (generation_config: e.g. Llama 3's <|eot_id|> and <|end_of_text|>)
    plus the tokenizer's eos: passing only the latter would run past the end of a turn."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = list(configured) if isinstance(configured, (list, tuple)) else ([configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy replies to `prompts`, each asked as one user turn through the tokenizer's chat template
    (dataset.chatTemplate when set: prepare() installed it), or as plain text without a template."""
    import torch

    from kubetune.trainer.tokenization import resolve_chat_template

    device = next(model.parameters()).device
    template = resolve_chat_template(tokenizer, completion_only=False) if tokenizer.chat_template else None
    outs = []
    for prompt in prompts:
        if template is not None:
            text = tokenizer.apply_chat_template(template.messages([{"role": "user", "content": prompt}]),
                                                 chat_template=template.text, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        ids = tokenizer(text, add_special_tokens=template is None, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_tokens(model, tokenizer))
        outs.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return outs


def run_evaluate(cfg: TrainerConfig) -> tuple[int, dict[str, Any]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.dataset import prepare
    from kubetune.trainer.modelio import base_model_dir, check_model_source, fetch_adapter, load_tokenizer, output_store
    from kubetune.trainer.train import run_dir_for

    check_model_source(cfg)  # before "no adapter yet": a base model that can never load is the first thing to say
    store = output_store(cfg)
    work = run_dir_for(cfg) / "evaluate"
    msg = fetch_adapter(cfg, store, work / "adapter", STAGE)
    if msg is not None:
        return 1, {"ok": False, "message": msg}
    model_dir = base_model_dir(cfg)
    tokenizer = load_tokenizer(model_dir)
    data = prepare(cfg, tokenizer)
    rows = (data.validation or data.train)[: cfg.evaluation.max_eval_rows]
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if cuda:
        model = model.to("cuda")
    base_loss = heldout_loss(model, rows)
    base_gen = generate(model, tokenizer, cfg.evaluation.prompts, cfg.evaluation.max_new_tokens)
    tuned = PeftModel.from_pretrained(model, str(work / "adapter"))
    tuned_loss = heldout_loss(tuned, rows)
    tuned_gen = generate(tuned, tokenizer, cfg.evaluation.prompts, cfg.evaluation.max_new_tokens)
    verdict = gate(base_loss, tuned_loss, cfg.evaluation.min_improvement)
    report = {
        "ok": verdict["passed"],
        "heldoutRows": len(rows),
        "heldoutSplit": "validation" if data.validation else "train (no validation split configured)",
        "base": {"loss": round(base_loss, 6), "perplexity": round(math.exp(min(base_loss, 50)), 4)},
        "tuned": {"loss": round(tuned_loss, 6), "perplexity": round(math.exp(min(tuned_loss, 50)), 4)},
        **verdict,
        "generations": [{"prompt": p, "base": b, "tuned": t} for p, b, t in zip(cfg.evaluation.prompts, base_gen, tuned_gen)],
    }
    artifacts.publish_json(store, artifacts.EVALUATION, report)
    message = (f"held-out loss {base_loss:.4f} -> {tuned_loss:.4f} ({verdict['improvement']:+.1%}); "
               + ("gate passed" if verdict["passed"] else f"below minImprovement {cfg.evaluation.min_improvement}"))
    write_message(STAGE, verdict["passed"], "GatePassed" if verdict["passed"] else "GateFailed", message,
                  baseLoss=report["base"]["loss"], tunedLoss=report["tuned"]["loss"],
                  basePerplexity=report["base"]["perplexity"], tunedPerplexity=report["tuned"]["perplexity"],
                  improvement=verdict["improvement"], minImprovement=cfg.evaluation.min_improvement,
                  passed=verdict["passed"])
    print(message)
    for g in report["generations"]:
        print(f"  prompt: {g['prompt']}\n    base:  {g['base'][:200]}\n    tuned: {g['tuned'][:200]}")
    return 0, report
