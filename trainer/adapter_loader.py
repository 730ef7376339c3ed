"""Adapters onto a running vLLM server: fetched from S3, verified, loaded through vLLM's runtime API.

The first piece of adapter mode (docs/serving.md, "Adapter mode"): the loop a
sidecar of the shared base-model server runs. It makes the server's adapter
set equal a desired set {served name: adapter URI}:

- each adapter prefix is downloaded with exactly its manifested files and
  every sha256 checked (`artifacts.fetch_dir`) into a folder named by the
  manifest's own hash, so a re-published adapter is a new path; a tampered or
  incomplete adapter is refused (and reported), never loaded;
- vLLM's documented requests (VLLM_ALLOW_RUNTIME_LORA_UPDATING):
  `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`,
  `POST /v1/unload_lora_adapter {"lora_name"}`, and `GET /v1/models` (adapters
  are the entries with a `parent`, their `root` is the path they came from);
- idempotent: an adapter already loaded from the same path is left alone
  (vLLM answers 400 "already been loaded" to a second load of a name, which
  is success for us); one loaded from another path is unloaded and loaded
  again; an unload of a name vLLM does not know (404) is success;
- 5xx answers and refused connections (vLLM restarting) are retried with
  backoff, a bounded number of times.

`ready()` is what the sidecar's readiness probe answers: every desired
adapter that was not refused is loaded. A restarted vLLM container comes back
without adapters, so the pod is not Ready until the loop has loaded them again.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from kubetune.trainer.artifacts import MANIFEST, IntegrityError, fetch_dir
from kubetune.trainer.storage import Store


class VllmError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class VllmClient:
    """vLLM's adapter endpoints, with retries of what a restarting server answers."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, attempts: int = 6, backoff: float = 0.5,
                 timeout: float = 120.0, sleep: Callable[[float], None] = time.sleep):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.attempts, self.backoff, self.timeout, self.sleep = attempts, backoff, timeout, sleep

    def _request(self, method: str, path: str, body: Optional[dict[str, Any]] = None) -> tuple[int, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        last: Exception = RuntimeError("no attempt")
        for attempt in range(self.attempts):
            request = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    return resp.status, resp.read().decode(errors="replace")
            except urllib.error.HTTPError as e:
                text = e.read().decode(errors="replace")
                if e.code < 500:
                    return e.code, text  # the server's answer: the caller decides
                last = VllmError(e.code, text[:500])
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                last = e
            if attempt + 1 < self.attempts:
                self.sleep(self.backoff * 2 ** attempt)
        raise last

    def adapters(self) -> dict[str, str]:
        """Loaded adapters: served name -> the path it was loaded from."""
        status, text = self._request("GET", "/v1/models")
        if status != 200:
            raise VllmError(status, text[:500])
        return {m["id"]: m.get("root") or "" for m in json.loads(text).get("data", []) if m.get("parent")}

    def load(self, name: str, path: str) -> None:
        status, text = self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if status == 200 or (status == 400 and "already been loaded" in text):
            return
        raise VllmError(status, text[:500])

    def unload(self, name: str) -> None:
        status, text = self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status in (200, 404):
            return
        raise VllmError(status, text[:500])


@dataclass
class SyncResult:
    loaded: list[str] = field(default_factory=list)  # loaded by this pass
    unloaded: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # name -> why (tampered, incomplete)
    present: dict[str, str] = field(default_factory=dict)  # the server's adapters after the pass


def local_path(root: Path, name: str, manifest: dict[str, Any]) -> Path:
    """Where a verified adapter lives: by name and manifest hash (a re-publish is another folder)."""
    digest = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / f"{name}-{digest}"


def fetch_verified(store: Store, prefix: str, root: Path, name: str) -> Path:
    """The adapter under `prefix`, downloaded and checked against its manifest. Raises IntegrityError."""
    from kubetune.trainer.artifacts import read_manifest

    manifest = read_manifest(store, prefix)
    if manifest is None:
        raise IntegrityError(f"{store.uri}/{prefix}: no {MANIFEST}: not a complete adapter")
    dest = local_path(root, name, manifest)
    fetch_dir(store, prefix, dest)  # exactly the manifested files, each sha256 checked
    return dest


def sync(client: VllmClient, desired: dict[str, tuple[Store, str]], root: Path) -> SyncResult:
    """Make the server's adapters equal `desired` ({name: (store, prefix)}); the adapters it loaded but
    that are not desired are unloaded."""
    result = SyncResult()
    present = client.adapters()
    for name in sorted(set(present) - set(desired)):
        client.unload(name)
        result.unloaded.append(name)
    for name, (store, prefix) in sorted(desired.items()):
        try:
            path = str(fetch_verified(store, prefix, root, name))
        except (IntegrityError, FileNotFoundError) as e:
            result.refused[name] = str(e)
            if name in present:  # what it serves is no longer the published adapter
                client.unload(name)
                result.unloaded.append(name)
            continue
        if present.get(name) == path:
            continue  # idempotent: loaded from this very folder
        if name in present:
            client.unload(name)  # another version of it: replaced, never two under one name
        client.load(name, path)
        result.loaded.append(name)
    result.present = client.adapters()
    return result


def ready(client: VllmClient, desired: dict[str, Any], refused: dict[str, str]) -> bool:
    """The readiness of a server pod: every desired adapter that is not refused is loaded."""
    try:
        present = client.adapters()
    except Exception:
        return False
    return all(name in present for name in desired if name not in refused)
