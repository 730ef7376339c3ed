"""Reading instruction datasets and checking every row.

Pure functions (no torch, no tokenizer): file bytes -> records -> normalized
examples plus a list of row errors. Row numbers are 1-based: for JSON Lines
they are line numbers, for CSV/Parquet/JSON arrays the record's position
(header excluded), so a user can find the row with `sed -n Np` or a dataframe.

Every format is normalized to one of three shapes the tokenizer understands:
  chat              -> messages [{role: system|user|assistant, content}]
  prompt-completion -> prompt, completion (loss on the completion)
  text              -> text (loss on everything)

Quirks of real exports: a UTF-8 byte order mark (Windows tools write one) is
skipped; exact duplicate rows follow dataset.duplicates (warn, drop or error);
a file whose rows follow different formats is reported as mixing formats, with
the rows of each, instead of as rows missing fields.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

FORMATS = ("alpaca", "sharegpt", "messages", "prompt-completion", "text")
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
BOM = b"\xef\xbb\xbf"
# What makes a row one format or another, for messages.
FORMAT_KEYS = {"messages": "messages", "sharegpt": "conversations", "alpaca": "instruction+output",
               "prompt-completion": "prompt+completion", "text": "text"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
CHAT_ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """The dataset as a whole cannot be read (unknown suffix, undetectable format...)."""


@dataclass(frozen=True)
class RowError:
    row: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"row {self.row}" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "field": self.field, "message": self.message}


@dataclass
class Example:
    row: int
    kind: str  # chat | prompt-completion | text
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str = ""
    completion: str = ""
    text: str = ""
    field: str = ""  # the row's key holding the turns (messages, conversations); "" for alpaca
    duplicate_of: Optional[int] = None  # first row with the same content (dataset.duplicates: warn)

    def fingerprint(self) -> str:
        payload = json.dumps([self.kind, self.messages, self.prompt, self.completion, self.text], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class ParseResult:
    format: str
    examples: list[Example]
    errors: list[RowError]
    total_rows: int
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (row, first row with the same content)
    duplicate_policy: str = "warn"
    # format -> its rows, when the rows follow more than one format
    mixed_formats: dict[str, list[int]] = field(default_factory=dict)

    @property
    def bad_rows(self) -> int:
        """Rows with at least one error (a row can have several)."""
        return len({e.row for e in self.errors})


def row_ranges(rows: list[int], limit: int = 12) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1-3, 7, 9-10' (the first `limit` ranges, then how many rows more)."""
    ranges: list[list[int]] = []
    for r in sorted(rows):
        if ranges and r == ranges[-1][1] + 1:
            ranges[-1][1] = r
        else:
            ranges.append([r, r])
    text = ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in ranges[:limit])
    if len(ranges) > limit:
        text += f" and {sum(b - a + 1 for a, b in ranges[limit:])} rows more"
    return text


# ---------------------------------------------------------------- reading files


def read_records(path: Path) -> tuple[list[tuple[int, Any]], list[RowError]]:
    """(row number, decoded record) pairs, and errors for rows that cannot be decoded at all."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DatasetError(f"dataset {path.name}: unsupported file type '{suffix}' (use one of {', '.join(SUFFIXES)})")
    data = path.read_bytes()
    if suffix == ".jsonl":
        return _read_jsonl(data)
    if suffix == ".json":
        return _read_json(data, path.name)
    if suffix == ".csv":
        return _read_csv(data, path.name)
    return _read_parquet(path)


def _read_jsonl(data: bytes) -> tuple[list[tuple[int, Any]], list[RowError]]:
    records, errors = [], []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        # A BOM starts a file written by Windows tools, and every part of such files concatenated.
        if raw.startswith(BOM):
            raw = raw[len(BOM):]
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(RowError(lineno, "", f"not valid UTF-8 (byte {e.start} of the line)"))
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            errors.append(RowError(lineno, "", f"invalid JSON: {e.msg} at column {e.colno}"))
    return records, errors


def _read_json(data: bytes, name: str) -> tuple[list[tuple[int, Any]], list[RowError]]:
    try:
        text = data.decode("utf-8-sig")  # -sig: skips a leading BOM (Windows exports)
    except UnicodeDecodeError as e:
        raise DatasetError(f"dataset {name}: not valid UTF-8 (byte offset {e.start})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"dataset {name}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise DatasetError(f"dataset {name}: a .json dataset must be an array of rows (or {{\"data\": [...]}})")
    return list(enumerate(doc, start=1)), []


def _read_csv(data: bytes, name: str) -> tuple[list[tuple[int, Any]], list[RowError]]:
    records, errors = [], []
    lines = data.split(b"\n")
    # Decode line by line so that one bad byte costs one row, not the file.
    header, *rest = lines
    try:
        header_text = header.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"dataset {name}: header is not valid UTF-8 (byte {e.start})") from None
    good = [header_text]
    bad_rows = set()
    for i, raw in enumerate(rest, start=1):
        try:
            good.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad_rows.add(i)
            errors.append(RowError(i, "", f"not valid UTF-8 (byte {e.start} of the line)"))
            good.append("")
    reader = csv.DictReader(io.StringIO("\n".join(good)))
    for rec in reader:
        row = reader.line_num - 1
        if row in bad_rows or not any((v or "").strip() for v in rec.values() if isinstance(v, str)):
            continue
        # JSON-valued columns (messages, conversations) arrive as strings.
        for key in ("messages", "conversations"):
            if isinstance(rec.get(key), str):
                try:
                    rec[key] = json.loads(rec[key])
                except json.JSONDecodeError:
                    pass  # the row check reports the wrong type, naming the field
        records.append((row, rec))
    return records, errors


def _read_parquet(path: Path) -> tuple[list[tuple[int, Any]], list[RowError]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DatasetError(f"dataset {path.name}: cannot read parquet: {e}") from None
    return list(enumerate(table.to_pylist(), start=1)), []


# ---------------------------------------------------------------- format detection


def detect_format(records: Iterable[tuple[int, Any]]) -> str:
    """The format most rows follow (ties: the one seen first). Every row votes: in a file that mixes
    formats the majority is the format, and parse_records names the rows that follow another one."""
    votes: dict[str, int] = {}
    seen_keys: set[str] = set()
    for _, rec in records:
        if not isinstance(rec, dict):
            continue
        if len(seen_keys) < 256:
            seen_keys |= set(rec)
        fmt = _format_of_keys(set(rec))
        if fmt:
            votes[fmt] = votes.get(fmt, 0) + 1
    if not votes:
        raise DatasetError(
            "cannot detect the dataset format: rows have keys "
            f"{sorted(seen_keys) or '(none)'}; expected one of: messages (OpenAI style), conversations (sharegpt), "
            "instruction+output (alpaca), prompt+completion, text. Set dataset.format explicitly or fix the keys."
        )
    return max(votes, key=votes.get)


def _formats_of_keys(keys: set[str]) -> list[str]:
    """Every format whose keys the row has, most specific first."""
    found = []
    if "messages" in keys:
        found.append("messages")
    if "conversations" in keys:
        found.append("sharegpt")
    if "instruction" in keys and "output" in keys:
        found.append("alpaca")
    if "prompt" in keys and "completion" in keys:
        found.append("prompt-completion")
    if "text" in keys:
        found.append("text")
    return found


def _format_of_keys(keys: set[str]) -> Optional[str]:
    found = _formats_of_keys(keys)
    return found[0] if found else None


# ---------------------------------------------------------------- row checks


def _str_field(rec: dict, key: str, row: int, errors: list[RowError], *, required=True, non_empty=True, label=None) -> Optional[str]:
    label = label or key
    if key not in rec or rec[key] is None:
        if required:
            errors.append(RowError(row, label, "missing"))
        return None if required else ""
    val = rec[key]
    if not isinstance(val, str):
        errors.append(RowError(row, label, f"must be a string, got {type(val).__name__}"))
        return None
    if non_empty and not val.strip():
        errors.append(RowError(row, label, "is empty"))
        return None
    return val


def _check_alpaca(rec: dict, row: int, errors: list[RowError]) -> Optional[Example]:
    n = len(errors)
    instruction = _str_field(rec, "instruction", row, errors)
    inp = _str_field(rec, "input", row, errors, required=False, non_empty=False)
    output = _str_field(rec, "output", row, errors)
    system = _str_field(rec, "system", row, errors, required=False, non_empty=False)
    if len(errors) > n:
        return None
    user = instruction if not (inp or "").strip() else f"{instruction}\n\n{inp}"
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": output},
    ]
    return Example(row, "chat", messages=msgs)


def _check_turns(turns: Any, row: int, errors: list[RowError], *, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> Optional[list[dict[str, str]]]:
    if key not in turns:
        errors.append(RowError(row, key, "missing"))
        return None
    items = turns[key]
    if not isinstance(items, list):
        errors.append(RowError(row, key, f"must be a list of turns, got {type(items).__name__}"))
        return None
    if not items:
        errors.append(RowError(row, key, "has no turns"))
        return None
    n = len(errors)
    msgs: list[dict[str, str]] = []
    for i, turn in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            errors.append(RowError(row, where, f"must be an object, got {type(turn).__name__}"))
            continue
        if role_key not in turn:
            errors.append(RowError(row, f"{where}.{role_key}", "missing"))
            continue
        role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            errors.append(RowError(row, f"{where}.{role_key}", f"unknown role {turn[role_key]!r} (expected one of {sorted(roles)})"))
            continue
        if text_key not in turn or turn[text_key] is None:
            errors.append(RowError(row, f"{where}.{text_key}", "missing"))
            continue
        text = turn[text_key]
        if not isinstance(text, str):
            errors.append(RowError(row, f"{where}.{text_key}", f"must be a string, got {type(text).__name__}"))
            continue
        if not text.strip():
            what = "empty assistant reply" if role == "assistant" else "is empty"
            errors.append(RowError(row, f"{where}.{text_key}", what))
            continue
        msgs.append({"role": role, "content": text})
    if len(errors) > n:
        return None
    # Order: optional system first, then user/assistant alternating, ending with the assistant.
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i != 0:
            errors.append(RowError(row, f"{key}[{i}].{role_key}", "a system turn is only allowed first"))
            return None
    offset = len(msgs) - len(body)
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            errors.append(RowError(row, f"{key}[{i + offset}].{role_key}", f"turn order: expected {expected}, got {m['role']}"))
            return None
    if not body or body[-1]["role"] != "assistant":
        errors.append(RowError(row, key, "must end with an assistant turn (nothing to learn from otherwise)"))
        return None
    return msgs


def _check_row(fmt: str, rec: Any, row: int, errors: list[RowError]) -> Optional[Example]:
    if not isinstance(rec, dict):
        errors.append(RowError(row, "", f"expected an object, got {type(rec).__name__}"))
        return None
    if fmt == "alpaca":
        return _check_alpaca(rec, row, errors)
    if fmt == "sharegpt":
        msgs = _check_turns(rec, row, errors, key="conversations", role_key="from", text_key="value", roles=SHAREGPT_ROLES)
        return Example(row, "chat", messages=msgs, field="conversations") if msgs else None
    if fmt == "messages":
        msgs = _check_turns(rec, row, errors, key="messages", role_key="role", text_key="content", roles={r: r for r in CHAT_ROLES})
        return Example(row, "chat", messages=msgs, field="messages") if msgs else None
    if fmt == "prompt-completion":
        n = len(errors)
        prompt = _str_field(rec, "prompt", row, errors)
        completion = _str_field(rec, "completion", row, errors)
        return Example(row, "prompt-completion", prompt=prompt, completion=completion) if len(errors) == n else None
    if fmt == "text":
        text = _str_field(rec, "text", row, errors)
        return Example(row, "text", text=text) if text is not None else None
    raise DatasetError(f"unknown dataset format {fmt!r}")


DUPLICATE_POLICIES = ("warn", "drop", "error")


def parse_records(records: list[tuple[int, Any]], fmt: str = "auto", read_errors: Optional[list[RowError]] = None,
                  duplicates: str = "warn") -> ParseResult:
    """Check every record; collect row errors (never raising for a bad row).

    duplicates: what a row identical to an earlier one is: warn (kept, listed in `duplicates`),
    drop (left out, listed) or error (a bad row)."""
    errors = list(read_errors or [])
    if duplicates not in DUPLICATE_POLICIES:
        raise DatasetError(f"dataset.duplicates: unknown policy {duplicates!r} (expected one of {', '.join(DUPLICATE_POLICIES)})")
    if fmt == "auto":
        fmt = detect_format(records)
    elif fmt not in FORMATS:
        raise DatasetError(f"dataset.format: unknown format {fmt!r} (expected auto or one of {', '.join(FORMATS)})")
    # Rows that follow another format are reported as such rather than as rows missing fields.
    matches = {row: _formats_of_keys(set(rec)) for row, rec in records if isinstance(rec, dict)}
    by_format: dict[str, list[int]] = {}
    for row, found in matches.items():
        if found:
            by_format.setdefault(fmt if fmt in found else found[0], []).append(row)
    mixed = by_format if len(by_format) > 1 else {}
    examples: list[Example] = []
    dups: list[tuple[int, int]] = []
    first_seen: dict[str, int] = {}
    for row, rec in records:
        found = matches.get(row) or []
        if found and fmt not in found:
            other = found[0]
            if mixed:
                theirs = f"not {fmt} ({FORMAT_KEYS[fmt]}) like rows {row_ranges(by_format.get(fmt, []))}: the file mixes formats"
            else:
                theirs = f"but dataset.format is {fmt} ({FORMAT_KEYS[fmt]})"
            errors.append(RowError(row, "", f"follows the {other} format ({FORMAT_KEYS[other]}), {theirs}"))
            continue
        ex = _check_row(fmt, rec, row, errors)
        if ex is None:
            continue
        fp = ex.fingerprint()
        if fp in first_seen:
            first = first_seen[fp]
            dups.append((row, first))
            if duplicates == "error":
                errors.append(RowError(row, "", f"duplicate of row {first}"))
                continue
            if duplicates == "drop":
                continue
            ex.duplicate_of = first
        else:
            first_seen[fp] = row
        examples.append(ex)
    errors.sort(key=lambda e: e.row)
    total = len(records) + len(read_errors or [])
    return ParseResult(fmt, examples, errors, total, dups, duplicates, {f: rows for f, rows in mixed.items()})


def parse_file(path: Path, fmt: str = "auto", duplicates: str = "warn") -> ParseResult:
    records, read_errors = read_records(Path(path))
    if not records and not read_errors:
        raise DatasetError(f"dataset {Path(path).name}: contains no rows")
    if not records:
        return ParseResult(fmt if fmt != "auto" else "unknown", [], read_errors, len(read_errors))
    return parse_records(records, fmt, read_errors, duplicates)
