"""Every model family kubetune supports, as a tiny random-weight model built from the family's config (no
download) whose tokenizer carries the chat template TRL ships for the family, read from the installed TRL
at test time. For each: the loss mask of multi-turn rows covers exactly the assistant's replies, and
validate -> train -> merge -> evaluate run through."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kubetune.trainer.tinymodel import FAMILIES

pytestmark = pytest.mark.trainer

# What each family's template renders for an assistant reply r: exactly the text the loss must cover (the
# reply and the end-of-turn tokens the model must learn to emit; never the role cue or a user/system turn).
# Facts about each family's turn format, checked against TRL's training version of its template.
LEARNED = {
    "llama": lambda r: f"{r}<|eot_id|>",
    "mistral": lambda r: f" {r}</s>",
    "qwen2": lambda r: f"\n{r}<|im_end|>\n",
    "qwen3": lambda r: f"<think>\n\n</think>\n\n{r}<|im_end|>\n",
    "gemma2": lambda r: f"{r}<end_of_turn>\n",
    "gemma3": lambda r: f"{r}<end_of_turn>\n",
    "phi3": lambda r: f"{r}<|end|>\n",
}
# Phi-3's template ends a conversation with eos, inside the last reply's block: the model learns to stop.
AFTER_LAST = {"phi3": "<|endoftext|>"}
NO_SYSTEM_TURN = {"gemma2"}  # Gemma and Gemma 2's template raises on a system turn

SYSTEM = "You are the support assistant of Nimbus Drive. Answer briefly."
EXCHANGES = [
    ("How much storage does Pro have?", "The Pro plan includes 2 TB."),
    ("And the Plus plan?", "Plus has 200 GB."),
    ("Can I share folders?", "Yes, open the folder and choose Share."),
    ("How do I reset my password?", "Open Settings, then Security, then Reset password."),
    ("Is there a Linux app?", "Yes, download it from the Nimbus website."),
    ("Where is two-factor?", "Settings, then Security, then Two-factor."),
]


def conversation(i: int, system: bool) -> list[dict[str, str]]:
    """Row i: two or three exchanges of EXCHANGES, each row a different combination."""
    turns = [EXCHANGES[i % 6], EXCHANGES[(i + 1 + i // 6) % 6]] + ([EXCHANGES[(i + 3) % 6]] if i % 2 else [])
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    for user, reply in turns:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": f"{reply} (#{i})"}]
    return msgs


def rows(family: str, n: int = 24) -> list[dict]:
    return [{"messages": conversation(i, system=family not in NO_SYSTEM_TURN and i % 3 != 0)} for i in range(n)]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """family -> a tiny model directory, built on first use."""
    from kubetune.trainer.tinymodel import write_tiny_model

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            texts = [m["content"] for r in rows(family) for m in r["messages"]]
            built[family] = write_tiny_model(tmp_path_factory.mktemp(family), texts, family=family, vocab_size=320)
        return built[family]

    return get


def _learned_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The text of each maximal run of learned (labelled) tokens."""
    from kubetune.trainer.tokenization import IGNORE

    runs, cur = [], []
    for t, l in zip(ids, labels):
        if l != IGNORE:
            assert l == t  # a learned token's label is the token itself
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


def test_every_family_is_covered():
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"} == set(LEARNED)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loss_mask_covers_exactly_the_assistant_replies(family, family_models):
    from kubetune.trainer.dataformats import parse_records
    from kubetune.trainer.modelio import load_tokenizer
    from kubetune.trainer.tokenization import encode_all, trl_template_dir

    model_dir = family_models(family)
    tokenizer = load_tokenizer(model_dir)
    # The model ships the family's own template (no generation blocks); the rows are rendered with TRL's
    # training version of it.
    assert tokenizer.chat_template == (trl_template_dir() / f"{FAMILIES[family].template}.jinja").read_text()
    data = rows(family, 6)
    parsed = parse_records([(i + 1, r) for i, r in enumerate(data)], "messages")
    encoded, errors, stats = encode_all(tokenizer, parsed.examples, max_length=4096, over_length="truncate")
    assert errors == []
    assert stats["chatTemplate"]["trlTrainingVersion"] is True and stats["chatTemplate"]["assistantMasks"] is True
    assert stats["chatTemplate"]["contentBlocks"] is (family == "mistral")
    for row, enc in zip(data, encoded):
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        want = [LEARNED[family](r) for r in replies]
        want[-1] += AFTER_LAST.get(family, "")
        assert _learned_runs(tokenizer, enc.input_ids, enc.labels) == want
        # ...and the whole row is rendered: every user and system text is there, unlearned.
        text = tokenizer.decode(enc.input_ids)
        assert all(m["content"] in text for m in row["messages"])
    # Without completion-only loss every token is learned.
    full, _, _ = encode_all(tokenizer, parsed.examples[:1], max_length=4096, over_length="truncate", completion_only=False)
    assert full[0].labels == full[0].input_ids


def test_a_row_the_template_cannot_render_is_named(family_models):
    """Gemma 2's template has no system turn: the row is a bad row with a one-line reason, not a traceback."""
    from kubetune.trainer.dataformats import parse_records
    from kubetune.trainer.modelio import load_tokenizer
    from kubetune.trainer.tokenization import encode_all

    tokenizer = load_tokenizer(family_models("gemma2"))
    records = [(1, rows("gemma2")[0]), (2, {"messages": conversation(1, system=True)}), (3, rows("gemma2")[2])]
    encoded, errors, _ = encode_all(tokenizer, parse_records(records, "messages").examples, max_length=4096,
                                    over_length="truncate")
    assert [e.row for e in encoded] == [1, 3]
    assert [(e.row, e.field) for e in errors] == [(2, "messages")]
    assert errors[0].message == ("the chat template cannot render this conversation: System role not supported "
                                 "(this template has no system turn: drop the system turn from the rows or set "
                                 "dataset.chatTemplate)")


def _config(tmp_path: Path, model_dir: Path, data: Path, **dataset):
    from kubetune.trainer.config import parse_config

    return parse_config({
        "baseModel": {"uri": str(model_dir), "name": "tiny"},
        "dataset": {"uri": str(data), "validationSplit": 0.2, "maxLength": 256, **dataset},
        "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"maxSteps": 3, "learningRate": 0.01, "batchSize": 4, "checkpointEvery": 100, "warmupRatio": 0.0,
                     "seed": 1},
        "output": {"uri": str(tmp_path / "out")},
        "merge": {"maxShardSize": "10MB"},
        "evaluation": {"prompts": ["And the Plus plan?"], "maxNewTokens": 4},
        "storage": {"cacheDir": str(tmp_path / "cache")},
    })


def _pipeline(cfg, tmp_path: Path) -> tuple[dict, Path]:
    """validate -> train -> merge -> evaluate as the stage pods run them; returns (evaluation report, merged dir)."""
    from kubetune.trainer import artifacts
    from kubetune.trainer.evaluate import run_evaluate
    from kubetune.trainer.merge import run_merge
    from kubetune.trainer.modelio import output_store
    from kubetune.trainer.train import run_train
    from kubetune.trainer.validate import run_validate

    code, report = run_validate(cfg, tmp_path / "validation.json")
    assert code == 0 and report["badRows"] == 0, report
    result = run_train(cfg)
    assert result.exit_code == 0 and result.global_step == 3 and math.isfinite(result.eval_loss)
    assert run_merge(cfg) == 0
    code, evaluation = run_evaluate(cfg)
    assert code == 0
    merged = tmp_path / "merged"
    artifacts.fetch_dir(output_store(cfg), artifacts.MERGED, merged)
    return evaluation, merged


def _assert_merged_is_base_plus_adapter(cfg, merged: Path, model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune.trainer import artifacts
    from kubetune.trainer.modelio import output_store

    adapter = tmp_path / "adapter"
    artifacts.fetch_dir(output_store(cfg), artifacts.ADAPTER, adapter)
    got_model = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    assert got_model.dtype == torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    ref = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.randint(5, got_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = got_model(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float()
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()  # equal within bf16 rounding


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_merges_and_evaluates(family, family_models, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(family)))
    model_dir = family_models(family)
    cfg = _config(tmp_path, model_dir, data)
    evaluation, merged = _pipeline(cfg, tmp_path)
    assert math.isfinite(evaluation["base"]["loss"]) and math.isfinite(evaluation["tuned"]["loss"])
    assert evaluation["tuned"]["loss"] != evaluation["base"]["loss"]  # the adapter was applied
    assert len(evaluation["generations"]) == 1 and isinstance(evaluation["generations"][0]["tuned"], str)
    _assert_merged_is_base_plus_adapter(cfg, merged, model_dir, tmp_path)
    # Served with the model's own template (not the training version the rows were rendered with).
    assert AutoTokenizer.from_pretrained(str(merged)).chat_template == AutoTokenizer.from_pretrained(str(model_dir)).chat_template


def test_base_model_without_template_trains_with_a_named_trl_template(family_models, tmp_path, monkeypatch):
    """dataset.chatTemplate: qwen3 on a Qwen3 model whose tokenizer has no template: the rows are masked
    with TRL's training version, and the adapter's and the merged model's tokenizers carry the template."""
    import shutil

    from transformers import AutoTokenizer

    from kubetune.trainer.tokenization import trl_template_dir

    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    model_dir = tmp_path / "no-template"
    shutil.copytree(family_models("qwen3"), model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = None
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(str(model_dir))
    assert AutoTokenizer.from_pretrained(str(model_dir)).chat_template is None
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows("qwen3")))

    from kubetune.trainer.tokenization import TemplateError
    from kubetune.trainer.validate import run_validate

    code, report = run_validate(_config(tmp_path, model_dir, data), tmp_path / "v.json", publish=False)
    assert code == 1 and report["reason"] == "ChatTemplateUnusable"
    assert "has no chat template" in report["message"] and "dataset.chatTemplate" in report["message"]
    assert issubclass(TemplateError, ValueError)

    cfg = _config(tmp_path, model_dir, data, chatTemplate="qwen3")
    _, merged = _pipeline(cfg, tmp_path)
    qwen3 = (trl_template_dir() / "qwen3.jinja").read_text()
    assert AutoTokenizer.from_pretrained(str(merged)).chat_template == qwen3
    from kubetune.trainer import artifacts
    from kubetune.trainer.modelio import output_store

    artifacts.fetch_dir(output_store(cfg), artifacts.ADAPTER, tmp_path / "adapter")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "adapter")).chat_template == qwen3
