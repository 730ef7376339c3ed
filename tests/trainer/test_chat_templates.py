"""Which chat template renders the rows, and what happens when a template cannot be used: dataset.chatTemplate
(inline Jinja or the name of a template TRL ships), templates without generation blocks, templates that fail
on one row or leave a reply out of the loss."""

from __future__ import annotations

import pytest

from kubetune.trainer.dataformats import Example
from kubetune.trainer.tokenization import (IGNORE, RowTemplateError, TemplateError, encode_all, encode_example,
                                           install_chat_template, resolve_chat_template, trl_template_dir)

pytestmark = pytest.mark.trainer

TWO_TURNS = [
    {"role": "user", "content": "How big is Pro?"},
    {"role": "assistant", "content": "The Pro plan includes 2 TB."},
    {"role": "user", "content": "And Plus?"},
    {"role": "assistant", "content": "Plus has 200 GB."},
]
# A template of the user's own: "### role:" headers, the reply and "<|end|>" in a generation block.
MARKED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '### assistant:\n' }}"
    "{% generation %}{{ m['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '### ' + m['role'] + ':\n' + m['content'] + '\n' }}{% endif %}{% endfor %}"
)
UNMARKED = "{% for m in messages %}{{ '### ' + m['role'] + ':\n' + m['content'] + '\n' }}{% endfor %}"
LAST_ONLY = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}{{ '### assistant:\n' }}"
    "{% generation %}{{ m['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ '### ' + m['role'] + ':\n' + m['content'] + '\n' }}{% endif %}{% endfor %}"
)


@pytest.fixture
def tokenizer(tiny_model):
    from kubetune.trainer.modelio import load_tokenizer

    return load_tokenizer(tiny_model)


def _learned(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE])


def test_inline_template_replaces_the_tokenizers(tokenizer):
    install_chat_template(tokenizer, MARKED)
    ids, labels = encode_example(tokenizer, Example(1, "chat", messages=TWO_TURNS, field="messages"))
    assert tokenizer.decode(ids).startswith("### user:\nHow big is Pro?\n### assistant:\n")
    assert _learned(tokenizer, ids, labels) == "The Pro plan includes 2 TB.<|end|>Plus has 200 GB.<|end|>"


def test_a_named_template_is_the_one_trl_ships(tokenizer):
    install_chat_template(tokenizer, "phi3")
    assert tokenizer.chat_template == (trl_template_dir() / "phi3.jinja").read_text()
    template = resolve_chat_template(tokenizer, completion_only=True, origin="dataset.chatTemplate")
    assert template.trl_training and template.text == (trl_template_dir() / "phi3_training.jinja").read_text()


def test_an_unknown_name_lists_the_templates_trl_ships(tokenizer):
    with pytest.raises(TemplateError, match=r"dataset.chatTemplate: TRL \S+ ships no template named 'llama9'; "
                                            r"use one of llama3, qwen2_5, qwen3, gemma, gemma3, phi3, phi3_5 and \d+ more"):
        install_chat_template(tokenizer, "llama9")


def test_a_template_without_generation_blocks_that_trl_does_not_know(tokenizer):
    """Completion-only loss needs the replies marked: the error says the three ways out."""
    install_chat_template(tokenizer, UNMARKED)
    with pytest.raises(TemplateError) as err:
        resolve_chat_template(tokenizer, completion_only=True, origin="dataset.chatTemplate")
    msg = str(err.value)
    assert msg.startswith("dataset.chatTemplate has no {% generation %} blocks marking the assistant's replies "
                          "and TRL ships no training version of it")
    assert "set dataset.chatTemplate to a template TRL ships (llama3," in msg
    assert msg.endswith("or set training.completionOnlyLoss: false to train on whole conversations")
    assert "\n" not in msg
    # Training on whole conversations needs no markers.
    ids, labels = encode_example(tokenizer, Example(1, "chat", messages=TWO_TURNS), completion_only=False)
    assert labels == ids and tokenizer.decode(ids).startswith("### user:\nHow big is Pro?\n")


def test_a_reply_outside_the_generation_blocks_is_a_bad_row(tokenizer):
    """A template marking only the last reply would silently train on half the replies."""
    install_chat_template(tokenizer, LAST_ONLY)
    single = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    encoded, errors, _ = encode_all(tokenizer, [Example(1, "chat", messages=TWO_TURNS, field="conversations"),
                                                Example(2, "chat", messages=single, field="conversations")],
                                    max_length=512, over_length="truncate")
    assert [e.row for e in encoded] == [2]
    assert [(e.row, e.field) for e in errors] == [(1, "conversations[1]")]
    assert errors[0].message.startswith("the chat template renders this reply outside its {% generation %} blocks")


def test_a_template_raising_on_one_row_names_that_row(tokenizer):
    raising = MARKED.replace("{% for m in messages %}",
                             "{% for m in messages %}{% if 'forbidden' in m['content'] %}"
                             "{{ raise_exception('Content not allowed in turn ' + loop.index0|string) }}{% endif %}", 1)
    install_chat_template(tokenizer, raising)
    bad = [{"role": "user", "content": "a forbidden word"}, {"role": "assistant", "content": "ok"}]
    encoded, errors, _ = encode_all(tokenizer, [Example(1, "chat", messages=TWO_TURNS, field="messages"),
                                                Example(7, "chat", messages=bad, field="messages")],
                                    max_length=512, over_length="truncate")
    assert [e.row for e in encoded] == [1]
    assert [(e.row, e.field, e.message) for e in errors] == [
        (7, "messages", "the chat template cannot render this conversation: Content not allowed in turn 0 "
                        "(fix the row or set dataset.chatTemplate)")]
    with pytest.raises(RowTemplateError):
        encode_example(tokenizer, Example(7, "chat", messages=bad, field="messages"))


def test_a_template_that_cannot_render_anything_fails_once(tokenizer):
    install_chat_template(tokenizer, "{% for m in messages %}{{ m['content'] }")  # Jinja syntax error
    with pytest.raises(TemplateError, match=r"^dataset.chatTemplate cannot render a plain user/assistant conversation: "):
        resolve_chat_template(tokenizer, completion_only=False, origin="dataset.chatTemplate")


def test_prepare_installs_dataset_chat_template(train_config, tiny_model, tmp_path):
    """The config's template is what the rows and everything after them (saved tokenizer, generations) use."""
    from kubetune.trainer.dataset import prepare
    from kubetune.trainer.modelio import load_tokenizer

    cfg = train_config(rows=8, dataset={"chatTemplate": MARKED})
    tok = load_tokenizer(tiny_model)
    data = prepare(cfg, tok)
    assert data.ok and tok.chat_template == MARKED
    assert data.token_stats["chatTemplate"] == {"origin": "dataset.chatTemplate", "trlTrainingVersion": False,
                                                "assistantMasks": True, "contentBlocks": False}
    row = (data.train + data.validation)[0]
    assert tok.decode(row.input_ids).startswith("### system:\n")
