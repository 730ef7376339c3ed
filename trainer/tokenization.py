"""Examples -> token ids and labels, with the base model's tokenizer and chat template.

Labels are -100 outside the completion (prompt-completion) or the assistant
turns (chat), so that by default the loss is only on what the model should
learn to say. Assistant spans are found on the rendered text: the template is
rendered for each conversation prefix, and the characters an assistant turn
adds are mapped to tokens through the tokenizer's offsets.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from kubetune.trainer.dataformats import Example, RowError

IGNORE = -100


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be used for completion-only loss."""


@dataclass
class Encoded:
    row: int
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def _assistant_char_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "the base model's tokenizer has no chat template, so conversations cannot be rendered; "
            "add one to the model's tokenizer_config.json or use dataset.format prompt-completion or text"
        )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TemplateError(
                "the chat template does not render conversations prefix-stably; "
                "set training.completionOnlyLoss=false or use a template with fixed turn markers"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def encode_example(tokenizer, ex: Example, completion_only: bool = True) -> tuple[list[int], list[int]]:
    if ex.kind == "chat":
        text, spans = _assistant_char_spans(tokenizer, ex.messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if not completion_only:
            return ids, list(ids)
        labels = []
        for tid, (start, end) in zip(ids, enc["offset_mapping"]):
            inside = any(s <= start < e for s, e in spans) if end > start else False
            labels.append(tid if inside else IGNORE)
        return ids, labels
    if ex.kind == "prompt-completion":
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        p = bos + tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return p + c, ([IGNORE] * len(p) if completion_only else p) + c
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + tokenizer(ex.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids, list(ids)


def encode_all(
    tokenizer, examples: list[Example], *, max_length: int, over_length: str, completion_only: bool = True
) -> tuple[list[Encoded], list[RowError], dict[str, Any]]:
    """Encode every example; apply the over-length policy; return stats for the report."""
    out: list[Encoded] = []
    errors: list[RowError] = []
    lengths: list[int] = []
    over = []
    for ex in examples:
        ids, labels = encode_example(tokenizer, ex, completion_only)
        lengths.append(len(ids))
        truncated = False
        if len(ids) > max_length:
            over.append(ex.row)
            if over_length == "drop":
                continue
            ids, labels, truncated = ids[:max_length], labels[:max_length], True
        if all(l == IGNORE for l in labels):
            errors.append(RowError(ex.row, "", "no tokens left to learn from (completion truncated away by maxLength)"))
            continue
        out.append(Encoded(ex.row, ids, labels, truncated))
    stats = length_stats(lengths)
    stats.update({"maxLength": max_length, "overLength": over_length, "overMaxLength": len(over),
                  "overMaxLengthRows": over[:20], "dropped" if over_length == "drop" else "truncated": len(over)})
    return out, errors, stats


def length_stats(lengths: list[int]) -> dict[str, Any]:
    if not lengths:
        return {"count": 0}
    s = sorted(lengths)

    def pct(p: float) -> int:
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]

    return {
        "count": len(s), "min": s[0], "mean": round(statistics.fmean(s), 1), "p50": pct(50),
        "p90": pct(90), "p99": pct(99), "max": s[-1], "totalTokens": sum(s),
    }


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split (same for validate, train and evaluate)."""
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = 0 if fraction <= 0 or n < 2 else max(1, round(n * fraction))
    n_val = min(n_val, n - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])
