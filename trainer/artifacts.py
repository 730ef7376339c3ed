"""The artifact layout under `output.uri`, and the manifest protocol that makes uploads atomic.

S3 has no atomic rename, so an artifact is a prefix whose files are uploaded
first and whose MANIFEST.json (sha256 and size of every file) is written last.
A prefix without a manifest does not exist for a reader, however many files it
holds. Re-publishing a prefix removes its manifest before touching any file, so
a reader never pairs an old manifest with new files.

This module is the one place that knows the layout (docs/contracts.md).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

# The layout's names are facts the operator shares (status URIs, serving): defined once there.
from kubetune.contract.facts import (ADAPTER, CHECKPOINTS, EVALUATION, EVALUATION_REPORT, MANIFEST,  # noqa: F401
                                     MERGED, REPORT, VALIDATION, VALIDATION_REPORT)
from kubetune.trainer.storage import Store

_STEP_RE = re.compile(r"^step-(\d{8})$")


class IntegrityError(RuntimeError):
    """A manifested file whose content does not match its checksum."""


class CheckpointMismatch(ValueError):
    """The newest checkpoint under output.uri was trained under a different recipe than the config's."""


def checkpoint_prefix(step: int) -> str:
    return f"{CHECKPOINTS}/step-{step:08d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(files: dict[str, Path], meta: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Pure: the manifest for `files` (relative name -> local path)."""
    return {
        "version": 1,
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {name: {"sha256": sha256_file(p), "size": p.stat().st_size} for name, p in sorted(files.items())},
        "meta": meta or {},
    }


def local_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def publish_dir(
    store: Store,
    local_dir: Path,
    prefix: str,
    meta: Optional[dict[str, Any]] = None,
    on_file: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Upload every file of `local_dir` under `prefix`, then the manifest. Returns the manifest."""
    files = local_files(Path(local_dir))
    manifest = build_manifest(files, meta)
    store.delete(f"{prefix}/{MANIFEST}")
    for name, path in files.items():
        store.put_file(path, f"{prefix}/{name}")
        if on_file is not None:
            on_file(name)
    store.put_bytes(json.dumps(manifest, indent=1).encode(), f"{prefix}/{MANIFEST}")
    return manifest


def publish_json(store: Store, prefix: str, obj: Any, name: str = REPORT) -> None:
    """A one-file artifact (validation/evaluation reports), manifested like the rest."""
    data = json.dumps(obj, indent=1, default=str).encode()
    manifest = {
        "version": 1,
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}},
        "meta": {},
    }
    store.delete(f"{prefix}/{MANIFEST}")
    store.put_bytes(data, f"{prefix}/{name}")
    store.put_bytes(json.dumps(manifest, indent=1).encode(), f"{prefix}/{MANIFEST}")


def read_manifest(store: Store, prefix: str) -> Optional[dict[str, Any]]:
    raw = store.get_bytes(f"{prefix}/{MANIFEST}")
    if raw is None:
        return None
    try:
        manifest = json.loads(raw)
    except ValueError:
        return None  # a torn or foreign manifest is no manifest
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def read_json(store: Store, prefix: str, name: str = REPORT) -> Optional[Any]:
    """A manifested JSON artifact, or None while it is absent or incomplete."""
    manifest = read_manifest(store, prefix)
    if manifest is None or name not in manifest["files"]:
        return None
    raw = store.get_bytes(f"{prefix}/{name}")
    if raw is None or hashlib.sha256(raw).hexdigest() != manifest["files"][name]["sha256"]:
        raise IntegrityError(f"{prefix}/{name} does not match its manifest")
    return json.loads(raw)


def fetch_dir(store: Store, prefix: str, local_dir: Path) -> dict[str, Any]:
    """Download exactly the manifested files of `prefix` and verify their checksums."""
    manifest = read_manifest(store, prefix)
    if manifest is None:
        raise FileNotFoundError(f"{store.uri}/{prefix} has no {MANIFEST}: not a complete artifact")
    local_dir = Path(local_dir)
    for name, entry in manifest["files"].items():
        dst = local_dir / name
        if not (dst.exists() and dst.stat().st_size == entry["size"] and sha256_file(dst) == entry["sha256"]):
            store.get_file(f"{prefix}/{name}", dst)
            if sha256_file(dst) != entry["sha256"]:
                raise IntegrityError(f"{store.uri}/{prefix}/{name}: sha256 mismatch")
    return manifest


def complete_checkpoints(store: Store) -> list[int]:
    """Steps of the checkpoints that have a manifest, oldest first."""
    steps = set()
    for obj in store.list(CHECKPOINTS):
        parts = obj.key.split("/")
        # checkpoints/step-XXXXXXXX/MANIFEST.json
        if len(parts) == 3 and parts[0] == CHECKPOINTS and parts[2] == MANIFEST:
            m = _STEP_RE.match(parts[1])
            if m:
                steps.add(int(m.group(1)))
    return sorted(s for s in steps if read_manifest(store, checkpoint_prefix(s)) is not None)


def latest_checkpoint(store: Store) -> Optional[int]:
    steps = complete_checkpoints(store)
    return steps[-1] if steps else None


def prune_checkpoints(store: Store, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints (manifest first, so none is ever half-visible)."""
    steps = complete_checkpoints(store)
    removed = steps[:-keep] if keep > 0 else []
    for step in removed:
        prefix = checkpoint_prefix(step)
        store.delete(f"{prefix}/{MANIFEST}")
        for obj in store.list(prefix):
            store.delete(obj.key)
    return removed


# ---------------------------------------------------------------- the run a checkpoint belongs to
# Every checkpoint's manifest records the recipe fields that define the run (meta.config: the
# fields and their hash). A start that would resume from it compares them with its own config:
# resuming a rank-16 adapter into a rank-8 model crashed inside PEFT, and resuming under another
# dataset or schedule silently trains a mixture. A mismatch fails with the changed fields named;
# it never starts over by itself, because the old run's checkpoints and adapter share the prefix.

RUN_SECTIONS = ("baseModel", "dataset", "method", "training", "launch")
# Fields that change how a run goes (speed, memory, logging, what is kept) but not what it learns.
NOT_THE_RUN = ("baseModel.name", "training.logEvery", "training.checkpointEvery", "training.keepCheckpoints",
               "training.evalEvery", "training.gradientCheckpointing", "training.performance")


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def run_fields(cfg) -> dict[str, Any]:
    """Pure: {dotted camelCase field: value} of the recipe fields that define the run."""
    dumped = cfg.model_dump(by_alias=True, mode="json")
    fields: dict[str, Any] = {}
    for section in RUN_SECTIONS:
        _flatten(section, dumped.get(section, {}), fields)
    return {k: v for k, v in sorted(fields.items())
            if not any(k == n or k.startswith(n + ".") for n in NOT_THE_RUN)}


def run_record(cfg) -> dict[str, Any]:
    """What a checkpoint's manifest records about its run (meta.config)."""
    fields = run_fields(cfg)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return {"hash": digest, "fields": fields}


def config_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Pure: 'field: old -> new' for every field both records have and that differs. A field only one
    side has (added or removed by a kubetune upgrade) is not a change of the run."""
    return [f"{k}: {json.dumps(recorded[k])} -> {json.dumps(current[k])}"
            for k in sorted(recorded.keys() & current.keys()) if recorded[k] != current[k]]


def check_checkpoint_run(store: Store, step: int, cfg) -> Optional[str]:
    """Raise CheckpointMismatch if checkpoint `step` belongs to another run. Returns a line to print
    when the checkpoint cannot be checked (written before checkpoints recorded their run)."""
    prefix = checkpoint_prefix(step)
    manifest = read_manifest(store, prefix) or {}
    recorded = (manifest.get("meta") or {}).get("config")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("fields"), dict):
        return f"{prefix} records no config (written by an older kubetune): resuming without checking it"
    current = run_record(cfg)
    if recorded.get("hash") == current["hash"]:
        return None
    changes = config_changes(recorded["fields"], current["fields"])
    if not changes:
        return None  # only fields one side lacks differ (schema change), nothing of the run itself
    shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
    root = store.uri.rstrip("/")
    raise CheckpointMismatch(
        f"{root}/{prefix}/ was trained under another config ({shown}); resuming from it would mix two runs. "
        f"Put the changed run under another output.uri, or delete {root}/{CHECKPOINTS}/ to start it over here"
    )
