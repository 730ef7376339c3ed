"""A stand-in for vLLM's adapter routes: a real HTTP server speaking vLLM 0.33's documented load/unload
request bodies and answers (tests/unit/test_adapter_loader.py says which), shared by the loader's unit
tests and the adapter-mode cluster tests."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BASE = "s3://models/llama/"


class FakeVllm:
    def __init__(self):
        self.adapters: dict[str, str] = {}
        self.broken: set[str] = set()  # adapter names whose completions fail (a bad adapter that loads)
        self.fail_next = 0
        self.calls: list[tuple[str, str, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = (obj if isinstance(obj, str) else json.dumps(obj)).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _maybe_fail(self) -> bool:
                if outer.fail_next > 0:
                    outer.fail_next -= 1
                    self._send(503, {"error": "engine starting"})
                    return True
                return False

            def do_GET(self):
                outer.calls.append(("GET", self.path, {}))
                if self._maybe_fail():
                    return
                data = [{"id": BASE, "object": "model", "root": BASE, "parent": None}]
                data += [{"id": n, "object": "model", "root": p, "parent": BASE} for n, p in outer.adapters.items()]
                self._send(200, {"object": "list", "data": data})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls.append(("POST", self.path, body))
                if self._maybe_fail():
                    return
                name = body.get("lora_name")
                if self.path == "/v1/completions":
                    known = body.get("model") in outer.adapters or body.get("model") == BASE
                    if body.get("model") in outer.broken:
                        return self._send(500, {"error": {"message": "adapter produced NaNs", "code": 500}})
                    return self._send(200 if known else 404, {"choices": [{"text": "pong"}]} if known else
                                      {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                if self.path == "/v1/load_lora_adapter":
                    if name in outer.adapters and not body.get("load_inplace"):
                        return self._send(400, {"error": {"message": f"The lora adapter '{name}' has already been "
                                                                     "loaded. If you want to load the adapter in place, "
                                                                     "set 'load_inplace' to True.", "code": 400}})
                    config = Path(body["lora_path"]) / "adapter_config.json"
                    if not config.exists():
                        return self._send(404, {"error": {"message": f"No adapter found for {body['lora_path']}"}})
                    json.loads(config.read_text())
                    outer.adapters[name] = body["lora_path"]
                    return self._send(200, f"Success: LoRA adapter '{name}' added successfully.")
                if self.path == "/v1/unload_lora_adapter":
                    if name not in outer.adapters:
                        return self._send(404, {"error": {"message": f"The lora adapter '{name}' cannot be found."}})
                    del outer.adapters[name]
                    return self._send(200, f"Success: LoRA adapter '{name}' removed successfully.")
                self._send(404, {"error": "no route"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def swaps(self) -> list[tuple[str, str]]:
        """(route or model, adapter name) of the adapter calls and completions, in order."""
        out = []
        for _, path, body in self.calls:
            if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                out.append((path.rsplit("/", 1)[-1] + ("_inplace" if body.get("load_inplace") else ""),
                            body["lora_name"]))
            elif path == "/v1/completions":
                out.append(("completion", body["model"]))
        return out

    def loads(self) -> list[str]:
        return [b["lora_name"] for m, p, b in self.calls if p == "/v1/load_lora_adapter"]

    def stop(self) -> None:
        self.server.shutdown()
