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
    result = parse_file(path)
    assert [(e.row, e.message.split(" (")[0].split(":")[0]) for e in result.errors] == [
        (2, "not valid UTF-8"), (3, "invalid JSON"), (5, "duplicate of row 1")]
    assert len(result.examples) == 2


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


@pytest.mark.trainer
def test_validate_command_reports_bad_rows(tmp_path, tiny_model, support_rows):
    """The CLI exits 1 with a short summary, a JSON report, and the first bad rows in the termination message."""
    rows = [json.dumps(r) for r in support_rows[:20]]
    rows[4] = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    rows[9] = rows[0]
    rows[14] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]})
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows) + "\n")
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"baseModel": {"uri": str(tiny_model)}, "dataset": {"uri": str(data), "maxLength": 120},
                                  "output": {"uri": str(tmp_path / "out")}, "storage": {"cacheDir": str(tmp_path / "c")}}))
    term = tmp_path / "termination-log"
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "kubetune", "validate", "--config", str(config), "--report", str(report)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KUBETUNE_TERMINATION_LOG": str(term)})
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "row 5, field 'messages': must end with an assistant turn" in proc.stderr
    assert "row 10: duplicate of row 1" in proc.stderr
    assert "row 15, field 'messages[1].content': empty assistant reply" in proc.stderr
    body = json.loads(report.read_text())
    assert body["errorCount"] == 3 and [e["row"] for e in body["errors"]] == [5, 10, 15]
    assert body["tokens"]["count"] == 17 and body["tokens"]["overMaxLength"] > 0  # maxLength 120 < longest rows
    msg = json.loads(term.read_text())
    assert msg["stage"] == "validate" and msg["ok"] is False and msg["reason"] == "InvalidRows"
    assert "row 5" in msg["message"] and msg["errors"][0]["row"] == 5
    # The manifested copy under output.uri is what the operator links to.
    assert (tmp_path / "out" / "validation" / "report.json").exists()
    assert (tmp_path / "out" / "validation" / "MANIFEST.json").exists()
