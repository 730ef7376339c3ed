"""Status conditions per Kubernetes API conventions (pure).

lastTransitionTime changes only when `status` changes; reason/message/
observedGeneration are refreshed on every set.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: Optional[int],
    timestamp: Optional[str] = None,
) -> list[dict[str, Any]]:
    """A new list with condition `type_` set; others untouched, order kept."""
    if status not in ("True", "False", "Unknown"):
        raise ValueError(f"condition {type_}: status must be True, False or Unknown, got {status!r}")
    out = []
    found = False
    for cond in conditions:
        if cond.get("type") != type_:
            out.append(dict(cond))
            continue
        found = True
        changed = cond.get("status") != status
        out.append(
            {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": (timestamp or now()) if changed else cond.get("lastTransitionTime") or (timestamp or now()),
                "observedGeneration": generation,
            }
        )
    if not found:
        out.append(
            {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": timestamp or now(),
                "observedGeneration": generation,
            }
        )
    return out


def get_condition(conditions: list[dict[str, Any]], type_: str) -> Optional[dict[str, Any]]:
    return next((c for c in conditions if c.get("type") == type_), None)
