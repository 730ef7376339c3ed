"""Completion-only labels, and packing without cross-sample attention on the CPU (sdpa/eager) path."""

from __future__ import annotations

import pytest

from kubetune.trainer.dataformats import Example
from kubetune.trainer.tokenization import IGNORE, encode_all, encode_example, split_indices

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from kubetune.trainer.modelio import load_tokenizer

    return load_tokenizer(tiny_model)


def _label_text(tokenizer, ids, labels):
    return tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE])


def test_chat_labels_cover_only_assistant_turns(tokenizer):
    ex = Example(1, "chat", messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How big is Pro?"},
        {"role": "assistant", "content": "The Pro plan includes 2 TB."},
        {"role": "user", "content": "And Plus?"},
        {"role": "assistant", "content": "Plus has 200 GB."},
    ])
    ids, labels = encode_example(tokenizer, ex)
    assert len(ids) == len(labels)
    learned = _label_text(tokenizer, ids, labels)
    # Both replies and their end-of-turn token are learned; nothing of the prompt is.
    assert learned == "The Pro plan includes 2 TB.<|end|>\nPlus has 200 GB.<|end|>\n"
    _, all_labels = encode_example(tokenizer, ex, completion_only=False)
    assert IGNORE not in all_labels


def test_prompt_completion_and_text_labels(tokenizer):
    ids, labels = encode_example(tokenizer, Example(1, "prompt-completion", prompt="Capital of France:", completion=" Paris"))
    assert _label_text(tokenizer, ids, labels) == " Paris<|end|>"
    ids, labels = encode_example(tokenizer, Example(2, "text", text="plain text"))
    assert labels == ids


def test_over_length_truncate_and_drop(tokenizer):
    long = Example(1, "text", text="storage plan " * 200)
    short = Example(2, "text", text="hi")
    kept, errors, stats = encode_all(tokenizer, [long, short], max_length=32, over_length="truncate")
    assert [len(e.input_ids) for e in kept] == [32, len(encode_example(tokenizer, short)[0])]
    assert kept[0].truncated and stats["overMaxLength"] == 1 and stats["truncated"] == 1
    kept, errors, stats = encode_all(tokenizer, [long, short], max_length=32, over_length="drop")
    assert [e.row for e in kept] == [2] and stats["dropped"] == 1 and not errors


def test_split_is_deterministic_and_disjoint():
    a = split_indices(100, 0.1, seed=3)
    assert a == split_indices(100, 0.1, seed=3)
    train, val = a
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert split_indices(100, 0.0, 3) == (list(range(100)), [])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_samples_do_not_attend_to_each_other(tiny_model, tokenizer, support_rows, attn):
    """Logits and loss of each sample are the same packed (padding-free, one row) as alone."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from kubetune.trainer.dataformats import parse_records

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32, attn_implementation=attn).eval()
    examples = parse_records([(i + 1, r) for i, r in enumerate(support_rows[:3])], "messages").examples
    encoded = [encode_example(tokenizer, ex) for ex in examples]
    # The same collator SFTTrainer uses with packing="bfd" (padding_free): one row, position_ids restart per sample.
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    packed = collator([{"input_ids": ids, "labels": labels} for ids, labels in encoded])
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    # Forward exactly as SFTTrainer.compute_loss does: the whole collated batch and use_cache=False (with a
    # cache, transformers does not derive the per-sample mask from position_ids).
    batch = {k: v for k, v in packed.items() if k != "labels"}
    with torch.no_grad():
        packed_logits = model(**batch, use_cache=False).logits[0]
        offset = 0
        total_alone = 0.0
        for ids, labels in encoded:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed_logits[offset : offset + len(ids)], alone, atol=1e-5, rtol=1e-4)
            offset += len(ids)
            total_alone += torch.nn.functional.cross_entropy(
                alone[:-1], torch.tensor(labels[1:]), ignore_index=IGNORE, reduction="sum").item()
        packed_loss = torch.nn.functional.cross_entropy(
            packed_logits[:-1], packed["labels"][0, 1:], ignore_index=IGNORE, reduction="sum").item()
    assert packed_loss == pytest.approx(total_alone, rel=1e-5)

    # Control: the same row with positions that do not restart is one long sequence and the samples leak.
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"], use_cache=False).logits[0]
    second = slice(len(encoded[0][0]), len(encoded[0][0]) + len(encoded[1][0]))
    assert not torch.allclose(leaky[second], packed_logits[second], atol=1e-3)


def test_chat_rows_need_a_chat_template(tiny_model):
    from kubetune.trainer.modelio import load_tokenizer
    from kubetune.trainer.tokenization import TemplateError

    tok = load_tokenizer(tiny_model)
    tok.chat_template = None
    with pytest.raises(TemplateError, match="no chat template.*prompt-completion or text"):
        encode_example(tok, Example(1, "chat", messages=[{"role": "user", "content": "a"},
                                                         {"role": "assistant", "content": "b"}]))
    ids, labels = encode_example(tok, Example(2, "text", text="still fine"))
    assert ids == labels
