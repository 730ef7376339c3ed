"""Content-addressed revisions of a FineTuneJob (pure).

The fields that define an artifact (the recipe sections, less the run-only
settings of `recipe.RUN_ONLY_FIELDS`, plus where and whether it is merged)
hash to a revision id. Each revision has its own prefix under
`<output>/revisions/<id>/` and its own per-revision children. An edit that
changes the hash starts a new revision; reverting it finds the old id again,
and stages recorded as finished for that id in `status.revisions` are not run
again: the old artifact is reused.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from kubetune.contract.recipe import RUN_ONLY_FIELDS

from .api import FineTuneJob
from .api.spec import FineTuneJobSpec

REVISIONS_DIR = "revisions"
ID_LENGTH = 10  # 40 bits: collisions are not a concern within one job's history
KEEP = 10  # entries of status.revisions


def _drop(data: dict[str, Any], path: tuple[str, ...]) -> None:
    node = data
    for part in path[:-1]:
        node = node.get(part) or {}
    node.pop(path[-1], None)


def revision_id(spec: FineTuneJobSpec) -> str:
    from .render import RECIPE_SECTIONS

    data: dict[str, Any] = {name: getattr(spec, name).model_dump(mode="json") for name in RECIPE_SECTIONS}
    for path in RUN_ONLY_FIELDS:
        _drop(data, path)
    data["output"] = {"uri": spec.output.uri, "merge": spec.output.merge}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:ID_LENGTH]


def of(job: FineTuneJob) -> str:
    return revision_id(job.spec)


def artifact_root(spec: FineTuneJobSpec, rev: str) -> str:
    """s3:// prefix of one revision's artifacts (ends with '/')."""
    return f"{spec.output.uri.rstrip('/')}/{REVISIONS_DIR}/{rev}/"


def find(status: dict[str, Any], rev: str) -> Optional[dict[str, Any]]:
    return next((r for r in status.get("revisions") or [] if r.get("id") == rev), None)


def finished_stages(status: dict[str, Any], rev: str) -> dict[str, dict[str, Any]]:
    """{stage: record} of the stages recorded as finished for `rev`."""
    entry = find(status, rev) or {}
    return dict(entry.get("stages") or {})


def restarts(status: dict[str, Any], rev: str) -> int:
    """Counted gang restarts of `rev` so far."""
    return int((find(status, rev) or {}).get("restarts") or 0)


def record(
    status: dict[str, Any],
    rev: str,
    generation: Optional[int],
    finished: dict[str, dict[str, Any]],
    phase: str,
    artifacts: dict[str, str],
    evaluation: Optional[dict[str, Any]],
    restarted: bool = False,
) -> list[dict[str, Any]]:
    """status.revisions with `rev` updated (added last if new); others marked
    Superseded when they were still running; the oldest dropped past KEEP."""
    out = []
    entry: Optional[dict[str, Any]] = None
    for r in status.get("revisions") or []:
        r = dict(r)
        if r.get("id") == rev:
            entry = r
            continue
        if r.get("phase") == "Running":
            r["phase"] = "Superseded"
        out.append(r)
    entry = entry or {"id": rev, "generation": generation}
    stages = dict(entry.get("stages") or {})
    for stage, rec in finished.items():
        stages.setdefault(stage, rec)
    entry["stages"] = stages
    entry["phase"] = phase
    if artifacts:
        entry["artifacts"] = {**(entry.get("artifacts") or {}), **artifacts}
    if evaluation is not None:
        entry["evaluation"] = evaluation
    if restarted:
        entry["restarts"] = int(entry.get("restarts") or 0) + 1
    out.append(entry)  # the one asked for now is always last
    return out[-KEEP:]


def served(entries: list[dict[str, Any]], rev: str, before: Optional[str], timestamp: str) -> list[dict[str, Any]]:
    """`rev` serves from `timestamp` on (unless it already did); `before`, which it replaced, until then."""
    out = []
    for r in entries:
        r = dict(r)
        if r.get("id") == rev and (not r.get("servedFrom") or r.get("servedUntil")):
            r["servedFrom"] = timestamp  # served again after a revert: a new period
            r.pop("servedUntil", None)
        elif before and before != rev and r.get("id") == before and r.get("servedFrom") and not r.get("servedUntil"):
            r["servedUntil"] = timestamp
        out.append(r)
    return out
