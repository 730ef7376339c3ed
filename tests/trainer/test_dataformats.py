"""Every supported format and file type parses; every bad row is reported by row number and field."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.trainer.dataformats import DatasetError, parse_file, parse_records

GOOD = {
    "alpaca": [{"instruction": "Say hi", "input": "", "output": "Hi!"},
               {"instruction": "Add", "input": "2 and 3", "output": "5"}],
    "sharegpt": [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                    {"from": "gpt", "value": "Hello"}]},
                 {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
                                    {"from": "human", "value": "and 3+3?"}, {"from": "gpt", "value": "6"}]}],
    "messages": [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
                 {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4"}]}],
    "prompt-completion": [{"prompt": "The capital of France is", "completion": " Paris."},
                          {"prompt": "2+2=", "completion": "4"}],
    "text": [{"text": "Plain pretraining text."}, {"text": "Another document."}],
}


def _write(path: Path, rows: list[dict]) -> Path:
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == ".csv":
        keys = sorted({k for r in rows for k in r})
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
@pytest.mark.parametrize("fmt", list(GOOD))
def test_every_format_in_every_file_type(tmp_path, fmt, suffix):
    path = _write(tmp_path / f"data{suffix}", GOOD[fmt])
    detected = parse_file(path, "auto")
    assert detected.format == fmt
    assert detected.errors == []
    assert len(detected.examples) == 2
    enforced = parse_file(path, fmt)
    assert [e.fingerprint() for e in enforced.examples] == [e.fingerprint() for e in detected.examples]


def test_normalized_shapes():
    alpaca = parse_records([(1, GOOD["alpaca"][1])], "alpaca").examples[0]
    assert alpaca.messages == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    share = parse_records([(1, GOOD["sharegpt"][0])], "sharegpt").examples[0]
    assert [m["role"] for m in share.messages] == ["system", "user", "assistant"]
    pc = parse_records([(1, GOOD["prompt-completion"][0])], "prompt-completion").examples[0]
    assert (pc.kind, pc.prompt, pc.completion) == ("prompt-completion", "The capital of France is", " Paris.")


U, A = "user", "assistant"
BAD = [
    # (format, row, expected field, message fragment)
    ("alpaca", {"input": "x", "output": "y"}, "instruction", "missing"),
    ("alpaca", {"instruction": "x", "input": ""}, "output", "missing"),
    ("alpaca", {"instruction": "x", "output": "   "}, "output", "is empty"),
    ("alpaca", {"instruction": 5, "output": "y"}, "instruction", "must be a string, got int"),
    ("alpaca", ["not", "an", "object"], "", "expected an object, got list"),
    ("sharegpt", {"conversations": []}, "conversations", "has no turns"),
    ("sharegpt", {"conversations": "hi"}, "conversations", "must be a list"),
    ("sharegpt", {"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]},
     "conversations[0].from", "unknown role 'robot'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": ""}]},
     "conversations[1].value", "empty assistant reply"),
    ("sharegpt", {"conversations": [{"from": "human"}, {"from": "gpt", "value": "y"}]}, "conversations[0].value", "missing"),
    ("messages", {"messages": [{"role": A, "content": "x"}, {"role": U, "content": "y"}]},
     "messages[0].role", "turn order: expected user, got assistant"),
    ("messages", {"messages": [{"role": U, "content": "x"}, {"role": U, "content": "y"}]},
     "messages[1].role", "turn order: expected assistant, got user"),
    ("messages", {"messages": [{"role": U, "content": "x"}]}, "messages", "must end with an assistant turn"),
    ("messages", {"messages": [{"role": U, "content": "x"}, {"role": A, "content": "y"}, {"role": "system", "content": "z"}]},
     "messages[2].role", "system turn is only allowed first"),
    ("messages", {"messages": [{"role": "tool", "content": "x"}, {"role": A, "content": "y"}]},
     "messages[0].role", "unknown role 'tool'"),
    ("messages", {"messages": [{"content": "x"}, {"role": A, "content": "y"}]}, "messages[0].role", "missing"),
    ("messages", {"messages": [{"role": U, "content": ["x"]}, {"role": A, "content": "y"}]},
     "messages[0].content", "must be a string, got list"),
    ("messages", {"msgs": []}, "messages", "missing"),
    ("prompt-completion", {"prompt": "x"}, "completion", "missing"),
    ("prompt-completion", {"prompt": "x", "completion": ""}, "completion", "is empty"),
    ("prompt-completion", {"prompt": None, "completion": "y"}, "prompt", "missing"),
    ("text", {"text": ""}, "text", "is empty"),
    ("text", {"text": {"nested": 1}}, "text", "must be a string, got dict"),
]


@pytest.mark.parametrize("fmt, row, field, fragment", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_row_is_reported_with_row_and_field(fmt, row, field, fragment):
    good = GOOD[fmt][0]
    result = parse_records([(1, good), (2, row), (3, GOOD[fmt][1])], fmt)
    assert [e.row for e in result.errors] == [2], result.errors
    err = result.errors[0]
    assert err.field == field
    assert fragment in err.message
    assert str(err).startswith("row 2")
    assert len(result.examples) == 2  # the good rows around it are kept


def test_file_level_row_errors(tmp_path):
    """Bad bytes and bad JSON cost their own line, reported by line number; duplicates name the first row."""
    good = json.dumps(GOOD["messages"][0]).encode()
    other = json.dumps(GOOD["messages"][1]).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([good, b'{"messages": [\xff\xfe]}', b"{not json", other, good, b""]))
    result = parse_file(path, duplicates="error")
    assert [(e.row, e.message.split(" (")[0].split(":")[0]) for e in result.errors] == [
        (2, "not valid UTF-8"), (3, "invalid JSON"), (5, "duplicate of row 1")]
    assert len(result.examples) == 2


# ---------------------------------------------------------------- quirks of real exports


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_utf8_bom_is_accepted(tmp_path, suffix):
    """Windows tools start UTF-8 files with a byte order mark; the first row is still row 1 and parses,
    and a bad row after it is still named by its row and field."""
    rows = [GOOD["messages"][0], {"messages": [{"role": "user", "content": "x"}]}, GOOD["messages"][1]]
    path = _write(tmp_path / f"d{suffix}", rows)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    result = parse_file(path)
    assert result.format == "messages"
    assert [e.row for e in result.examples] == [1, 3]
    assert [(e.row, e.field, e.message) for e in result.errors] == [
        (2, "messages", "must end with an assistant turn (nothing to learn from otherwise)")]


def test_bom_of_each_concatenated_export_is_skipped(tmp_path):
    """`cat a.jsonl b.jsonl` of two Windows exports puts a BOM at the start of b's first line."""
    a, b = (json.dumps(r).encode() for r in GOOD["messages"])
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + a + b"\n" + b"\xef\xbb\xbf" + b + b"\n")
    result = parse_file(path)
    assert result.errors == [] and [e.row for e in result.examples] == [1, 2]


def _dup_file(tmp_path) -> Path:
    a, b = GOOD["messages"]
    return _write(tmp_path / "d.jsonl", [a, b, a, a, b])  # rows 3, 4 repeat row 1; row 5 repeats row 2


def test_duplicates_warn_by_default_and_are_counted(tmp_path):
    result = parse_file(_dup_file(tmp_path))
    assert result.duplicate_policy == "warn" and result.errors == []
    assert result.duplicates == [(3, 1), (4, 1), (5, 2)]
    # Kept, each pointing at its first copy (the split keeps copies together).
    assert [(e.row, e.duplicate_of) for e in result.examples] == [(1, None), (2, None), (3, 1), (4, 1), (5, 2)]


def test_duplicates_drop_keeps_the_first_copy(tmp_path):
    result = parse_file(_dup_file(tmp_path), duplicates="drop")
    assert result.errors == [] and result.duplicates == [(3, 1), (4, 1), (5, 2)]
    assert [e.row for e in result.examples] == [1, 2]


def test_duplicates_error_makes_bad_rows(tmp_path):
    result = parse_file(_dup_file(tmp_path), duplicates="error")
    assert [(e.row, e.field, e.message) for e in result.errors] == [
        (3, "", "duplicate of row 1"), (4, "", "duplicate of row 1"), (5, "", "duplicate of row 2")]
    assert [e.row for e in result.examples] == [1, 2]


def test_kept_duplicates_share_their_first_copy_split():
    """Held-out loss must not be measured on a row the model also trained on."""
    from kubetune.trainer.tokenization import Encoded, split_indices, split_rows

    firsts = [Encoded(r, [r], [r]) for r in range(1, 41)]
    copies = [Encoded(100 + r, [r], [r], duplicate_of=r) for r in range(1, 41)]
    train, val = split_rows(firsts + copies, 0.25, seed=5)
    val_firsts = {r.row for r in val if r.duplicate_of is None}
    assert len(val_firsts) == 10
    assert {r.duplicate_of for r in val if r.duplicate_of} == val_firsts
    assert not {r.duplicate_of for r in train if r.duplicate_of} & val_firsts
    # Without duplicates the split is exactly split_indices over the rows (what earlier runs used).
    t, v = split_rows(firsts, 0.25, seed=5)
    ti, vi = split_indices(40, 0.25, seed=5)
    assert [r.row for r in t] == [firsts[i].row for i in ti] and [r.row for r in v] == [firsts[i].row for i in vi]


def test_file_mixing_formats_is_reported_as_such(tmp_path):
    """Rows of another format are named as such (not as rows missing 'messages'), with the rows of each."""
    m, a = GOOD["messages"], GOOD["alpaca"]
    rows = [m[0], m[1], dict(m[0], id=3), a[0], a[1], dict(m[1], id=6), dict(m[0], id=7)]
    result = parse_file(_write(tmp_path / "d.jsonl", rows))
    assert result.format == "messages"
    assert result.mixed_formats == {"messages": [1, 2, 3, 6, 7], "alpaca": [4, 5]}
    assert [(e.row, e.field) for e in result.errors] == [(4, ""), (5, "")]
    assert result.errors[0].message == ("follows the alpaca format (instruction+output), not messages (messages) "
                                        "like rows 1-3, 6-7: the file mixes formats")
    assert [e.row for e in result.examples] == [1, 2, 3, 6, 7]


def test_rows_of_another_format_than_the_configured_one(tmp_path):
    result = parse_file(_write(tmp_path / "d.jsonl", GOOD["alpaca"]), "messages")
    assert not result.mixed_formats
    assert [(e.row, e.message) for e in result.errors] == [
        (1, "follows the alpaca format (instruction+output), but dataset.format is messages (messages)"),
        (2, "follows the alpaca format (instruction+output), but dataset.format is messages (messages)")]


def test_bad_rows_count_rows_not_errors():
    """A row missing two fields is one bad row with two errors."""
    from kubetune.trainer.dataset import PreparedData

    result = parse_records([(1, {"input": "x"}), (2, GOOD["alpaca"][0]), (3, {"instruction": "", "output": ""})], "alpaca")
    assert [(e.row, e.field) for e in result.errors] == [(1, "instruction"), (1, "output"), (3, "instruction"),
                                                         (3, "output")]
    assert result.bad_rows == 2
    data = PreparedData(result.format, result.total_rows, [], [], result.errors)
    assert data.problem().startswith("2 bad rows (4 errors): row 1, field 'instruction': missing; ")
    one = PreparedData("alpaca", 1, [], [], result.errors[:2])
    assert one.problem().startswith("1 bad row (2 errors): row 1")


def test_csv_non_utf8_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,completion\nhello,world\n\xc3\x28bad,x\nfoo,bar\n")
    result = parse_file(path)
    assert result.format == "prompt-completion"
    assert [(e.row, "UTF-8" in e.message) for e in result.errors] == [(2, True)]


@pytest.mark.parametrize("name, content, fragment", [
    ("d.txt", b"hello", "unsupported file type '.txt'"),
    ("d.json", b"{\"rows\": 1}", "must be an array"),
    ("d.json", b"[1, 2", "invalid JSON at line 1"),
    ("d.jsonl", b"", "contains no rows"),
    ("d.jsonl", b'{"question": "a", "answer": "b"}\n', "cannot detect the dataset format"),
])
def test_unreadable_dataset_is_clear(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        parse_file(path)


def _validate_config(tmp_path, tiny_model, data: Path, **dataset) -> Path:
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"baseModel": {"uri": str(tiny_model)},
                                  "dataset": {"uri": str(data), "maxLength": 120, **dataset},
                                  "output": {"uri": str(tmp_path / "out")}, "storage": {"cacheDir": str(tmp_path / "c")}}))
    return config


@pytest.mark.trainer
def test_validate_command_reports_bad_rows(tmp_path, tiny_model, support_rows):
    """The CLI exits 1 with a short summary, a JSON report, and the first bad rows in the termination message;
    bad rows are counted as rows (one row, two errors), a duplicate is a warning, a row of another format is
    named as such, and no validation/report.json stands for the bad data (an earlier one is withdrawn)."""
    from kubetune.trainer import artifacts
    from kubetune.trainer.storage import LocalStore

    rows = [json.dumps(r) for r in support_rows[:20]]
    rows[4] = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    rows[9] = rows[0]
    rows[11] = json.dumps({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": ""}]})
    rows[14] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]})
    rows[17] = json.dumps({"instruction": "Say hi", "output": "Hi"})
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows) + "\n")
    config = _validate_config(tmp_path, tiny_model, data)
    # A report of an earlier, good version of the data.
    artifacts.publish_json(LocalStore(tmp_path / "out"), artifacts.VALIDATION, {"ok": True})
    term = tmp_path / "termination-log"
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "kubetune", "validate", "--config", str(config), "--report", str(report)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KUBETUNE_TERMINATION_LOG": str(term)})
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "row 5, field 'messages': must end with an assistant turn" in proc.stderr
    assert "row 12, field 'messages[0].content': is empty" in proc.stderr
    assert "row 12, field 'messages[1].content': empty assistant reply" in proc.stderr
    assert "row 15, field 'messages[1].content': empty assistant reply" in proc.stderr
    assert "row 18: follows the alpaca format (instruction+output), not messages (messages) like rows 1-17, 19-20" in proc.stderr
    assert "the file mixes formats: messages in rows 1-17, 19-20; alpaca in rows 18 (format messages taken)" in proc.stderr
    assert "warning: 1 row repeats an earlier row exactly (kept, dataset.duplicates: warn): row 10 = row 1" in proc.stderr
    body = json.loads(report.read_text())
    assert body["ok"] is False
    assert body["badRows"] == 4 and body["errorCount"] == 5
    assert [e["row"] for e in body["errors"]] == [5, 12, 12, 15, 18]
    assert body["duplicates"] == {"count": 1, "policy": "warn", "rows": [{"row": 10, "sameAs": 1}]}
    assert body["mixedFormats"] == {"messages": [r for r in range(1, 21) if r != 18], "alpaca": [18]}
    assert body["tokens"]["count"] == 16 and body["tokens"]["overMaxLength"] > 0  # maxLength 120 < longest rows
    msg = json.loads(term.read_text())
    assert msg["stage"] == "validate" and msg["ok"] is False and msg["reason"] == "InvalidRows"
    assert msg["badRows"] == 4 and msg["errorCount"] == 5
    assert msg["message"].startswith("the file mixes formats: messages in rows 1-17, 19-20; alpaca in rows 18 "
                                     "(format messages taken); 4 bad rows (5 errors): row 5, field 'messages'")
    assert msg["errors"][0]["row"] == 5
    # Bad data leaves no validation/report.json, and the earlier good one no longer vouches for it.
    assert not (tmp_path / "out" / "validation" / "report.json").exists()
    assert not (tmp_path / "out" / "validation" / "MANIFEST.json").exists()


@pytest.mark.trainer
def test_validate_publishes_the_report_of_good_data_with_its_warnings(tmp_path, tiny_model, support_rows, monkeypatch):
    from kubetune.trainer import artifacts
    from kubetune.trainer.config import load_config
    from kubetune.trainer.storage import LocalStore
    from kubetune.trainer.validate import run_validate

    rows = support_rows[:20] + [support_rows[3]]
    data = tmp_path / "good.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())  # with a BOM
    term = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(term))
    code, report = run_validate(load_config(_validate_config(tmp_path, tiny_model, data, maxLength=512)),
                                tmp_path / "report.json")
    assert code == 0 and report["ok"] is True and report["badRows"] == 0
    assert report["duplicates"]["rows"] == [{"row": 21, "sameAs": 4}]
    assert report["validRows"] == 21
    assert artifacts.read_json(LocalStore(tmp_path / "out"), artifacts.VALIDATION) == report
    msg = json.loads(term.read_text())
    assert msg["reason"] == "DatasetValid" and msg["duplicates"] == 1
    assert "1 row repeats an earlier row exactly (kept, dataset.duplicates: warn): row 21 = row 4" in msg["message"]
