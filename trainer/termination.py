"""The termination message a stage pod leaves for the operator (docs/contracts.md).

One compact JSON object, under 4 KiB (the kubelet's limit for
`terminationMessagePath`), written to /dev/termination-log or to the path in
KUBETUNE_TERMINATION_LOG. Long messages are shortened and list fields trimmed
until the object fits, so the operator always gets valid JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kubetune.contract.facts import ENV_TERMINATION_LOG as ENV_PATH
from kubetune.contract.facts import TERMINATION_LOG_PATH as DEFAULT_PATH
MAX_BYTES = 4096


def build_message(stage: str, ok: bool, reason: str, message: str, **fields: Any) -> str:
    """Pure: the JSON text, guaranteed < MAX_BYTES. Shrinks in order of what matters least:
    long messages first, then list fields (keeping their first items), then extra fields."""
    if len(message) > 1500:
        message = message[:1500] + "…"
    obj: dict[str, Any] = {"stage": stage, "ok": ok, "reason": reason, "message": message, **fields}

    def dump() -> str:
        return json.dumps(obj, separators=(",", ":"), default=str, ensure_ascii=False)

    text = dump()
    while len(text.encode()) >= MAX_BYTES:
        lists = [k for k, v in obj.items() if isinstance(v, list) and len(v) > 1]
        if lists:
            longest = max(lists, key=lambda k: len(json.dumps(obj[k], default=str)))
            obj[longest] = obj[longest][: len(obj[longest]) // 2]
        elif len(obj["message"]) > 300:
            obj["message"] = obj["message"][:300] + "…"
        else:
            obj = {k: obj[k] for k in ("stage", "ok", "reason", "message")}
        text = dump()
    return text


def write_message(stage: str, ok: bool, reason: str, message: str, **fields: Any) -> str:
    text = build_message(stage, ok, reason, message, **fields)
    path = Path(os.environ.get(ENV_PATH, DEFAULT_PATH))
    try:
        path.write_text(text, encoding="utf-8")
    except OSError:
        pass  # outside a pod (no /dev/termination-log): the stdout summary is the record
    return text
