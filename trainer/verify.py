"""`kubetune verify-artifact URI`: a published artifact checked before anything serves it.

The serving pod's init container runs this against merged/ before vLLM
streams it from S3 (operator/serving.py):

- MANIFEST.json must be there (a prefix without one is not an artifact);
- every manifested file is read back in full and must have the manifest's
  size and sha256: a tampered or torn shard stops the pod, with the file
  named in the termination message the operator puts in the job's condition;
- no file may lie under the prefix that the manifest does not list: vLLM
  streams every *.safetensors it finds there, so a stale shard of an earlier
  publish (or a planted one) would be loaded beside the verified ones;
- with --tensor-parallel-size, config.json's head counts must split evenly
  over that many GPUs (kubetune.contract.vllm.tensor_parallel_problem).

What vLLM reads afterwards is what was verified unless the objects change in
between; the artifact prefix is written only by the job's own stages.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, Optional

from kubetune.contract.vllm import ARTIFACT_REFUSALS, tensor_parallel_problem
from kubetune.trainer.artifacts import MANIFEST, IntegrityError
from kubetune.trainer.storage import LocalStore, S3Store, Store, open_store

STAGE = "verify-artifact"
CHUNK = 8 << 20


class ArtifactRefused(IntegrityError):
    """The artifact must not be served; `reason` is the condition reason the operator shows."""

    def __init__(self, reason: str, message: str):
        assert reason in ARTIFACT_REFUSALS, reason  # the operator fails the serve stage at once on these
        super().__init__(message)
        self.reason = reason


def _chunks(store: Store, key: str) -> Iterator[bytes]:
    """The object's bytes in chunks, never the whole shard in memory."""
    if isinstance(store, S3Store):
        body = store.client.get_object(Bucket=store.bucket, Key=store._key(key))["Body"]
        yield from body.iter_chunks(CHUNK)
    elif isinstance(store, LocalStore):
        with open(store._path(key), "rb") as f:
            yield from iter(lambda: f.read(CHUNK), b"")
    else:
        data = store.get_bytes(key)
        if data is not None:
            yield data


def verify_artifact(store: Store, tensor_parallel_size: Optional[int] = None) -> dict[str, Any]:
    """Check the artifact at the store's root; returns the manifest. Raises ArtifactRefused."""
    try:
        manifest = json.loads(store.get_bytes(MANIFEST) or b"null")
    except ValueError:
        manifest = None  # a torn or foreign manifest is no manifest
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ArtifactRefused("ArtifactIncomplete", f"{store.uri}: no readable {MANIFEST}: not a complete artifact")
    files: dict[str, dict[str, Any]] = manifest["files"]
    present = {o.key: o.size for o in store.list("")}
    extra = sorted(k for k in present if k != MANIFEST and k not in files)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ArtifactRefused("UnmanifestedFiles", f"{store.uri}: {len(extra)} file(s) not in {MANIFEST} would be "
                              f"loaded too: {shown}; publish the artifact again (or remove them)")
    for name, entry in sorted(files.items()):
        if name not in present:
            raise ArtifactRefused("ArtifactCorrupted", f"{store.uri}/{name}: listed in {MANIFEST} but missing")
        h, size = hashlib.sha256(), 0
        for chunk in _chunks(store, name):
            h.update(chunk)
            size += len(chunk)
        if size != entry.get("size") or h.hexdigest() != entry.get("sha256"):
            raise ArtifactRefused("ArtifactCorrupted", f"{store.uri}/{name}: content does not match {MANIFEST} "
                                  f"(size {size}, expected {entry.get('size')}; sha256 differs: "
                                  f"{h.hexdigest() != entry.get('sha256')})")
    if tensor_parallel_size and "config.json" in files:
        config = json.loads(b"".join(_chunks(store, "config.json")))
        problem = tensor_parallel_problem(config, tensor_parallel_size)
        if problem:
            raise ArtifactRefused("TensorParallelMismatch", f"serving.gpus {tensor_parallel_size}: {problem}")
    return manifest


def run_verify(uri: str, tensor_parallel_size: Optional[int] = None) -> int:
    from kubetune.trainer.termination import write_message

    store = open_store(uri)
    try:
        manifest = verify_artifact(store, tensor_parallel_size)
    except ArtifactRefused as e:
        write_message(STAGE, False, e.reason, str(e))
        print(f"{STAGE}: {e.reason}: {e}")
        return 1
    size = sum(f.get("size", 0) for f in manifest["files"].values())
    write_message(STAGE, True, "Verified", f"{len(manifest['files'])} files, {size} bytes match {MANIFEST}")
    print(f"{STAGE}: {uri}: {len(manifest['files'])} files ({size / 1e6:.1f} MB) match {MANIFEST}")
    return 0
