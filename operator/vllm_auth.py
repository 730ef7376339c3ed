"""ASGI middleware that puts the API key in front of every path vLLM serves.

vLLM's own `--api-key`/VLLM_API_KEY check guards only the paths under /v1,
/v2, /inference and /cohere; /invocations, /tokenize, /detokenize, /pooling,
/classify, /score, /rerank, /metrics and the admin routes stay open. This
module is handed to vLLM with `--middleware kubetune_vllm_auth.RequireApiKey`
(the serving builder mounts this file from a ConfigMap and puts its folder on
PYTHONPATH): a request without `Authorization: Bearer <VLLM_API_KEY>` gets 401
on every path except the kubelet's probe path, which cannot carry a secret.
tests/vllm checks it against every route of vLLM's own app.

`LoopbackAdapterUpdates` guards a shared adapter server (adapter mode):
vLLM's runtime LoRA routes (`/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`, opened by VLLM_ALLOW_RUNTIME_LORA_UPDATING) would
let any client that reaches the port swap a tenant's model. Only the pod's own
loader sidecar may call them: requests from anywhere but loopback get 403,
with or without the API key.

Runs inside the vLLM image: standard library only, no kubetune import.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

# The kubelet's probes (startup, readiness, liveness) cannot send a secret header; /health says only
# whether the engine is alive.
OPEN_PATHS = frozenset({"/health"})
ENV_KEY = "VLLM_API_KEY"


class RequireApiKey:
    def __init__(self, app) -> None:
        key = os.environ.get(ENV_KEY, "")
        if not key:
            # Started without the key (a Secret without the key would not even start the pod): fail loudly
            # rather than serve every path unauthenticated.
            raise RuntimeError(f"{ENV_KEY} is empty: refusing to serve without the API key")
        self.app = app
        self._digest = hashlib.sha256(key.encode()).digest()

    def _authorized(self, headers) -> bool:
        for name, value in headers:
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    return hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), self._digest)
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)  # lifespan; CORS preflights carry no credentials
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path in OPEN_PATHS or self._authorized(scope.get("headers") or []):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        body = json.dumps({"error": "Unauthorized"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


# vLLM's runtime LoRA routes (api_server's lora router).
ADAPTER_UPDATE_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
LOOPBACK = frozenset({"127.0.0.1", "::1"})


async def _refuse(send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class LoopbackAdapterUpdates:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):] or "/"
            client = (scope.get("client") or ("", 0))[0]
            if path.rstrip("/") in ADAPTER_UPDATE_PATHS and client not in LOOPBACK:
                await _refuse(send, 403, "adapters are loaded by the server's own sidecar only")
                return
        await self.app(scope, receive, send)
