"""Examples -> token ids and labels, with the base model's tokenizer and chat template.

Labels are -100 outside the completion (prompt-completion) or the assistant
turns (chat), so that by default the loss is only on what the model should
learn to say.

Assistant turns are found with the libraries' own mechanism, not by comparing
renderings: the chat template's `{% generation %}` blocks, which transformers
turns into a token mask (`apply_chat_template(return_assistant_tokens_mask=True)`).
Most models ship templates without those blocks; for the ones TRL knows
(Llama 3, Qwen2.5/3, Gemma/Gemma 2/3, Phi-3/3.5, ...) TRL ships a training
version that renders the same text with the blocks added
(`trl.chat_template_utils.get_training_chat_template`), and that is what
renders the training rows. The template the tokenizer keeps (saved with the
adapter, used for generations) stays the model's own.

`dataset.chatTemplate` replaces the tokenizer's template: inline Jinja, or the
name of a template TRL ships (`install_chat_template`).
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kubetune.trainer.dataformats import Example, RowError

IGNORE = -100

TOKENIZER_TEMPLATE = "the base model's chat template (tokenizer_config.json)"
OVERRIDE_TEMPLATE = "dataset.chatTemplate"
# Shown first when the error lists the templates TRL ships (the families kubetune tests).
COMMON_TEMPLATES = ("llama3", "qwen2_5", "qwen3", "gemma", "gemma3", "phi3", "phi3_5")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Distinct words, so that a template that drops or rewrites a message's text is caught.
_PROBE_USER, _PROBE_REPLY = "kubetuneprobequestion", "kubetuneprobeanswer"


class TemplateError(ValueError):
    """The chat template cannot be used for this dataset at all (no template, unknown name, no way to mask)."""


@dataclass
class Encoded:
    row: int
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    duplicate_of: Optional[int] = None  # the row this one repeats (dataset.duplicates: warn)


# ---------------------------------------------------------------- which template


def trl_template_dir() -> Path:
    import trl

    return Path(trl.__file__).parent / "chat_templates"


def trl_template_names() -> list[str]:
    """Templates TRL ships that can train with completion-only loss (a training version exists or is not needed)."""
    d = trl_template_dir()
    names = []
    for p in sorted(d.glob("*.jinja")):
        if p.stem.endswith("_training"):
            continue
        if (d / f"{p.stem}_training.jinja").is_file() or _GENERATION.search(p.read_text(encoding="utf-8")):
            names.append(p.stem)
    return names


def _names_hint() -> str:
    names = trl_template_names()
    common = [n for n in COMMON_TEMPLATES if n in names]
    rest = len(names) - len(common)
    return ", ".join(common) + (f" and {rest} more (files in trl/chat_templates)" if rest > 0 else "")


def is_template_name(value: str) -> bool:
    """A dataset.chatTemplate without Jinja syntax is a name (Jinja text always has a {{ or {%)."""
    return _NAME.fullmatch(value) is not None


def template_text(value: str) -> str:
    """dataset.chatTemplate -> Jinja text: inline text as is, a name -> the template TRL ships under it."""
    if not is_template_name(value):
        return value
    path = trl_template_dir() / f"{value}.jinja"
    if not path.is_file():
        import trl

        raise TemplateError(f"{OVERRIDE_TEMPLATE}: TRL {trl.__version__} ships no template named {value!r}; "
                            f"use one of {_names_hint()}, or give the Jinja text itself")
    return path.read_text(encoding="utf-8")


def install_chat_template(tokenizer, override: Optional[str]) -> None:
    """Make dataset.chatTemplate the tokenizer's own, so that everything downstream (the rows, the tokenizer
    saved with the adapter, evaluate's generations, the merged model) renders the same template."""
    if override:
        tokenizer.chat_template = template_text(override)


def has_generation_blocks(template: str) -> bool:
    return _GENERATION.search(template) is not None


@dataclass(frozen=True)
class ChatTemplate:
    """The template rows are rendered with, and how messages are handed to it."""

    text: str
    masks: bool  # has {% generation %} blocks: assistant tokens come from transformers' mask
    blocks: bool  # content as [{"type": "text", "text": ...}] (templates written for multimodal models)
    origin: str  # which setting the template comes from, for messages
    trl_training: bool = False  # text is TRL's training version of the origin template

    def messages(self, messages: list[dict[str, str]]) -> list[dict[str, Any]]:
        if not self.blocks:
            return messages
        return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:300] + "…"


def resolve_chat_template(tokenizer, *, completion_only: bool, origin: str = TOKENIZER_TEMPLATE) -> ChatTemplate:
    """The template conversation rows are rendered with; TemplateError when there is none that can be used."""
    base = tokenizer.chat_template
    if isinstance(base, dict):  # named variants: the default one renders plain conversations
        base = base.get("default")
    if not base:
        raise TemplateError(
            "the base model's tokenizer has no chat template, so conversations cannot be rendered; set "
            f"{OVERRIDE_TEMPLATE} to the name of a template TRL ships ({_names_hint()}) or to Jinja text, "
            "or use dataset.format prompt-completion or text"
        )
    text, patched = base, False
    if completion_only and not has_generation_blocks(base):
        from trl.chat_template_utils import get_training_chat_template

        try:
            training = get_training_chat_template(tokenizer)
        except ValueError:
            raise TemplateError(
                f"{origin} has no {{% generation %}} blocks marking the assistant's replies and TRL ships no "
                f"training version of it, so the loss cannot be limited to the replies; set {OVERRIDE_TEMPLATE} "
                f"to a template TRL ships ({_names_hint()}) or to Jinja text with {{% generation %}}...{{% endgeneration %}} "
                "around each reply, or set training.completionOnlyLoss: false to train on whole conversations"
            ) from None
        except Exception as e:  # TRL renders the template to classify it; a broken template fails there
            raise TemplateError(f"{origin} cannot be rendered: {_one_line(e)}") from None
        if training:
            text, patched = training, True
    if completion_only and not getattr(tokenizer, "is_fast", True):
        # transformers maps the generation blocks to tokens through the fast tokenizer's offsets.
        raise TemplateError("the base model's tokenizer has no fast (tokenizer.json) version, which assistant token "
                            "masks need; add tokenizer.json to the model or set training.completionOnlyLoss: false")
    return ChatTemplate(text, has_generation_blocks(text), _probe_blocks(tokenizer, text, origin), origin, patched)


def _probe_blocks(tokenizer, text: str, origin: str) -> bool:
    """Whether the template wants content as text blocks: the one form under which a probe
    conversation's words survive rendering (string content is tried first)."""
    probe = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}]
    failure = "renders a user/assistant conversation without the messages' text"
    for blocks in (False, True):
        msgs = ChatTemplate(text, False, blocks, origin).messages(probe)
        try:
            out = tokenizer.apply_chat_template(msgs, chat_template=text, tokenize=False)
        except Exception as e:  # jinja2 errors, or a template indexing string content as a list
            failure = f"cannot render a plain user/assistant conversation: {_one_line(e)}"
            continue
        if _PROBE_USER in out and _PROBE_REPLY in out:
            return blocks
    raise TemplateError(f"{origin} {failure}")


# ---------------------------------------------------------------- rows


class RowTemplateError(ValueError):
    """One row the template cannot render or mask (reported as that row's error)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _render_hint(message: str) -> str:
    if "system" in message.lower():
        return "this template has no system turn: drop the system turn from the rows or set dataset.chatTemplate"
    return f"fix the row or set {OVERRIDE_TEMPLATE}"


def _encode_chat(tokenizer, template: ChatTemplate, ex: Example, completion_only: bool) -> tuple[list[int], list[int]]:
    msgs = template.messages(ex.messages)
    field = ex.field or "messages"
    try:
        if not completion_only:
            ids = tokenizer.apply_chat_template(msgs, chat_template=template.text, tokenize=True, return_dict=True)["input_ids"]
            return ids, list(ids)
        text = tokenizer.apply_chat_template(msgs, chat_template=template.text, tokenize=False)
        out = tokenizer.apply_chat_template(msgs, chat_template=template.text, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True,
                                            tokenizer_kwargs={"return_offsets_mapping": True})
    except Exception as e:  # raise_exception() in the template, or Jinja failing on this row's content
        msg = _one_line(e)
        raise RowTemplateError(field, f"the chat template cannot render this conversation: {msg} ({_render_hint(msg)})") from None
    ids, mask, offsets = out["input_ids"], out["assistant_masks"], out["offset_mapping"]
    _check_replies_masked(text, offsets, mask, ex, field)
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]


def _check_replies_masked(text: str, offsets, mask, ex: Example, field: str) -> None:
    """Every assistant reply the template renders verbatim must lie inside its {% generation %} blocks,
    or that reply would silently not be learned (a hand-written template that marks only the last turn).
    Replies the template rewrites (e.g. Qwen3 splitting a <think> block off) are not found and not checked."""
    for i, m in enumerate(ex.messages):
        reply = m["content"].strip() if m["role"] == "assistant" else ""
        if not reply or reply not in text:
            continue
        start = text.find(reply)
        while start != -1:
            end = start + len(reply)
            touched = [k for k, (s, e) in enumerate(offsets) if s < end and e > start]
            if touched and all(mask[k] for k in touched):
                break
            start = text.find(reply, start + 1)
        else:
            where = f"{field}[{i}]" if ex.field else "output"
            raise RowTemplateError(where, "the chat template renders this reply outside its {% generation %} blocks, "
                                          "so it would not be learned; fix the template's blocks or set "
                                          "training.completionOnlyLoss: false")


def encode_example(tokenizer, ex: Example, completion_only: bool = True,
                   template: Optional[ChatTemplate] = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example. Raises RowTemplateError for a row the template cannot render."""
    if ex.kind == "chat":
        template = template or resolve_chat_template(tokenizer, completion_only=completion_only)
        return _encode_chat(tokenizer, template, ex, completion_only)
    if ex.kind == "prompt-completion":
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        p = bos + tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return p + c, ([IGNORE] * len(p) if completion_only else p) + c
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + tokenizer(ex.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids, list(ids)


def encode_all(
    tokenizer, examples: list[Example], *, max_length: int, over_length: str, completion_only: bool = True,
    template_origin: str = TOKENIZER_TEMPLATE,
) -> tuple[list[Encoded], list[RowError], dict[str, Any]]:
    """Encode every example; apply the over-length policy; return stats for the report.

    A row the template cannot render is that row's error; a template that cannot be used at all
    raises TemplateError (once, before any row)."""
    out: list[Encoded] = []
    errors: list[RowError] = []
    lengths: list[int] = []
    over = []
    template = None
    if any(ex.kind == "chat" for ex in examples):
        template = resolve_chat_template(tokenizer, completion_only=completion_only, origin=template_origin)
    for ex in examples:
        try:
            ids, labels = encode_example(tokenizer, ex, completion_only, template)
        except RowTemplateError as e:
            errors.append(RowError(ex.row, e.field, str(e)))
            continue
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
        out.append(Encoded(ex.row, ids, labels, truncated, ex.duplicate_of))
    stats = length_stats(lengths)
    stats.update({"maxLength": max_length, "overLength": over_length, "overMaxLength": len(over),
                  "overMaxLengthRows": over[:20], "dropped" if over_length == "drop" else "truncated": len(over)})
    if template is not None:
        stats["chatTemplate"] = {"origin": template.origin, "trlTrainingVersion": template.trl_training,
                                 "assistantMasks": template.masks, "contentBlocks": template.blocks}
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


def split_rows(rows: list[Encoded], fraction: float, seed: int) -> tuple[list[Encoded], list[Encoded]]:
    """split_indices over the distinct rows; a kept duplicate goes where its first copy went, so that
    held-out loss is never measured on a row the model trained on. Without duplicates this is exactly
    split_indices over all rows."""
    firsts = [r for r in rows if r.duplicate_of is None]
    train_idx, val_idx = split_indices(len(firsts), fraction, seed)
    held_out = {firsts[i].row for i in val_idx}
    train = [r for r in rows if (r.duplicate_of or r.row) not in held_out]
    validation = [r for r in rows if (r.duplicate_of or r.row) in held_out]
    return train, validation
