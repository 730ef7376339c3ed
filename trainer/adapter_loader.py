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


# Written into an adapter's local folder once every file matched the manifest: later passes (every few
# seconds) do not hash it again. The folder is the pod's own emptyDir, named by the manifest's hash.
VERIFIED = ".verified"


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

    def load(self, name: str, path: str, inplace: bool = False) -> None:
        """`inplace`: replace the weights of a loaded name (vLLM keeps its id; requests in flight finish
        on the old weights, later ones get the new)."""
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
        status, text = self._request("POST", "/v1/load_lora_adapter", body)
        if status == 200 or (status == 400 and "already been loaded" in text and not inplace):
            return
        raise VllmError(status, text[:500])

    def answers(self, name: str) -> bool:
        """A one-token completion through the adapter `name` succeeds."""
        status, _ = self._request("POST", "/v1/completions", {"model": name, "prompt": "ping", "max_tokens": 1})
        return status == 200

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
    done = dest / VERIFIED
    if done.exists():
        return dest  # verified on an earlier pass (the folder is named by this very manifest)
    fetch_dir(store, prefix, dest)  # exactly the manifested files, each sha256 checked
    done.write_text("")
    return dest


# The name a new version of an adapter is loaded and checked under before it replaces the served one.
STAGING_SUFFIX = "--staging"


def swap(client: VllmClient, name: str, path: str) -> None:
    """Blue/green for one model name on a shared server: the new version is loaded under a staging name
    and must answer a completion; only then is it loaded in place under the served name (clients never
    see the name missing), and the staging name goes. A version that does not answer never takes
    traffic: the old one keeps serving."""
    staging = f"{name}{STAGING_SUFFIX}"
    client.load(staging, path)
    try:
        if not client.answers(staging):
            raise VllmError(422, f"{path}: loaded as {staging} but did not answer a completion; {name} keeps "
                                 "its current version")
        client.load(name, path, inplace=True)
    finally:
        client.unload(staging)


def source_key(store: Store, prefix: str) -> str:
    """Which version a name serves: its adapter's URI (s3://bucket/prefix/, as the operator writes it)."""
    return f"{store.uri.rstrip('/')}/{prefix.strip('/')}/"


def sync(client: VllmClient, desired: dict[str, tuple[Store, str]], root: Path,
         served: Optional[dict[str, str]] = None) -> SyncResult:
    """Make the server's adapters equal `desired` ({name: (store, prefix)}); the adapters it loaded but
    that are not desired are unloaded.

    `served` ({name: source_key}, kept by the caller across passes) says which version each name
    serves: a new version (another prefix: a new revision) that is refused (tampered, incomplete,
    does not answer) leaves the served one in place; a refused version that is the served one is
    unloaded. Without it, every refused name is unloaded."""
    result = SyncResult()
    present = client.adapters()
    if served is not None:
        for name in [n for n in served if n not in present]:
            del served[name]  # vLLM restarted: nothing is served any more
    for name in sorted(set(present) - set(desired)):
        client.unload(name)
        result.unloaded.append(name)
        if served is not None:
            served.pop(name, None)
    for name, (store, prefix) in sorted(desired.items()):
        key = source_key(store, prefix)
        keeps_another = served is not None and name in present and served.get(name) not in (None, key)
        try:
            path = str(fetch_verified(store, prefix, root, name))
            if present.get(name) == path:
                continue  # idempotent: loaded from this very folder
            if name in present:
                swap(client, name, path)  # another version of it (a new revision): replaced without a gap
            else:
                client.load(name, path)
        except (IntegrityError, FileNotFoundError, VllmError) as e:
            if isinstance(e, VllmError) and e.status >= 500 and not keeps_another:
                raise  # the server is failing: the pass fails (the pod is not Ready), the next retries
            result.refused[name] = str(e)
            if name in present and not keeps_another:  # what it serves is no longer the published adapter
                client.unload(name)
                result.unloaded.append(name)
                if served is not None:
                    served.pop(name, None)
            continue
        result.loaded.append(name)
        if served is not None:
            served[name] = key
    result.present = client.adapters()
    return result


def ready(client: VllmClient, desired: dict[str, Any], refused: dict[str, str]) -> bool:
    """The readiness of a server pod: every desired adapter that is not refused is loaded."""
    try:
        present = client.adapters()
    except Exception:
        return False
    return all(name in present for name in desired if name not in refused)


# ---------------------------------------------------------------- the sidecar of a shared server


@dataclass
class Probe:
    """What the pod's probes answer: ready (every assigned adapter loaded) and alive (the loop turns)."""

    ready: bool = False
    last_pass: float = field(default_factory=time.monotonic)
    stall_after: float = 120.0

    def alive(self) -> bool:
        return time.monotonic() - self.last_pass < self.stall_after


def serve_probes(probe: Probe, port: int, host: str = "0.0.0.0"):
    """/ready and /healthz for the kubelet, in a daemon thread. Returns the server (`.shutdown()`)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            ok = probe.ready if self.path == "/ready" else probe.alive() if self.path == "/healthz" else None
            code = 404 if ok is None else 200 if ok else 503
            body = json.dumps({"ok": bool(ok)}).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()
    return server


def _custom_api():
    from kubetune.trainer.kubestatus import _default_api

    return _default_api()


class ServerObject:
    """The pod's AdapterServer: read (its assigned adapters) and status.adapters written (what this pod
    did with them). The sidecar's Role names this one object."""

    def __init__(self, name: str, namespace: str, api: Any = None):
        from kubetune.contract.facts import GROUP, VERSION

        self.name, self.namespace = name, namespace
        self._group, self._version, self._plural = GROUP, VERSION, "adapterservers"
        self._api = api
        self.reported: dict[str, tuple[str, str, Optional[str]]] = {}

    @property
    def api(self) -> Any:
        if self._api is None:
            self._api = _custom_api()
        return self._api

    def desired(self) -> dict[str, str]:
        """{served name: adapter URI} of the jobs that own the server now."""
        from kubetune.contract.adapters import live_adapters

        body = self.api.get_namespaced_custom_object(self._group, self._version, self.namespace, self._plural,
                                                     self.name, _request_timeout=10)
        return {a["name"]: a["uri"] for a in live_adapters(body)}

    def report(self, pod: str, desired: dict[str, str], result: SyncResult, served: dict[str, str]) -> bool:
        """Merge-patch status.adapters where this pass changed what was last reported. True when sent.
        Each line: the desired version (`uri`) Loaded or Refused, and `servedUri`, the version that
        answers under the name now (an earlier revision's, while a refused new one is held back)."""
        lines: dict[str, Any] = {}
        for name, uri in desired.items():
            refused = result.refused.get(name)
            if refused is None and name not in result.present:
                continue  # neither loaded nor refused (a load failed this pass): nothing to claim
            now_served = served.get(name) if name in result.present else None
            key = (uri, "Refused" if refused else "Loaded", refused, now_served)
            if self.reported.get(name) != key:
                line: dict[str, Any] = {"uri": uri, "state": key[1], "pod": pod, "servedUri": now_served,
                                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                if refused:
                    line["message"] = refused[:4000]
                lines[name] = line
                self.reported[name] = key
        if not lines:
            return False
        self.api.patch_namespaced_custom_object_status(
            self._group, self._version, self.namespace, self._plural, self.name, {"status": {"adapters": lines}},
            _request_timeout=10, _content_type="application/merge-patch+json",
        )
        return True


def open_desired(desired: dict[str, str], endpoint_url: Optional[str], region: Optional[str]) -> dict[str, tuple[Store, str]]:
    """{name: URI} -> {name: (store of the URI's bucket, prefix)}."""
    from kubetune.trainer.storage import open_store, split_s3

    out = {}
    for name, uri in desired.items():
        bucket, prefix = split_s3(uri)
        out[name] = (open_store(f"s3://{bucket}", endpoint_url=endpoint_url, region=region), prefix.rstrip("/"))
    return out


def run_sidecar(server: ServerObject, client: VllmClient, root: Path, probe: Probe, pod: str,
                endpoint_url: Optional[str] = None, region: Optional[str] = None, interval: float = 5.0,
                passes: Optional[int] = None, log: Callable[[str], None] = print) -> None:
    """The loop: read the assigned adapters, sync vLLM to them, report, set readiness; every `interval`
    seconds (a vLLM restart loses its adapters; the next pass loads them again while the pod is not
    Ready). `passes`: stop after that many (tests)."""
    done = 0
    served: dict[str, str] = {}  # name -> the version (source key) this pod's vLLM serves under it
    while passes is None or done < passes:
        try:
            desired = server.desired()
            result = sync(client, open_desired(desired, endpoint_url, region), root, served)
            if result.loaded or result.unloaded or result.refused:
                log(json.dumps({"loaded": result.loaded, "unloaded": result.unloaded, "refused": result.refused}))
            probe.ready = all(n in result.present for n in desired if n not in result.refused)
            server.report(pod, desired, result, served)  # source keys are the adapters' s3:// URIs
        except Exception as e:  # vLLM starting, the API server unreachable: not ready, try again
            probe.ready = False
            log(f"adapter sync: {type(e).__name__}: {e}")
        probe.last_pass = time.monotonic()
        done += 1
        if passes is None or done < passes:
            time.sleep(interval)
