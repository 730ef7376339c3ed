"""`kubetune delete-artifacts`: what the cleanup Job runs when a FineTuneJob with
spec.output.deleteOnJobDeletion is deleted.

Manifests go first: a prefix without its MANIFEST.json is already "not there"
for every reader (docs/contracts.md), so a cleanup that dies half-way never
leaves something that looks complete."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from kubetune.trainer.artifacts import MANIFEST
from kubetune.trainer.config import load_config
from kubetune.trainer.storage import Store, open_store
from kubetune.trainer.termination import write_message

STAGE = "cleanup"


def delete_all(store: Store) -> int:
    """Delete every object of `store`, manifests first; returns how many."""
    objects = store.list("")
    ordered = sorted(objects, key=lambda o: (not o.key.endswith(MANIFEST), o.key))
    for obj in ordered:
        store.delete(obj.key)
    return len(ordered)


def run(config_path: Path, uri: Optional[str] = None) -> int:
    """`uri`: the prefix to empty (the job's whole output.uri); the config's output.uri otherwise."""
    cfg = load_config(config_path)
    if uri:
        cfg.output.uri = uri
    store = open_store(cfg.output.uri, cfg.storage.endpoint_url, cfg.storage.region, cfg.storage.max_concurrency)
    try:
        count = delete_all(store)
    except Exception as e:  # botocore errors, permissions: the message goes to the operator
        write_message(STAGE, False, "ArtifactCleanupFailed", f"{cfg.output.uri}: {e}")
        print(f"cleanup of {cfg.output.uri} failed: {e}")
        return 1
    write_message(STAGE, True, "ArtifactsDeleted", f"deleted {count} objects under {cfg.output.uri}", objects=count)
    print(f"deleted {count} objects under {cfg.output.uri}")
    return 0
