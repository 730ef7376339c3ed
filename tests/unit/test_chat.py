"""`kubetune chat`: the request it sends, against a real local HTTP server speaking the OpenAI chat API."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kubetune.operator import chat


class FakeOpenAI:
    """/v1/chat/completions as vLLM answers it; 401 without the expected key."""

    def __init__(self, key: str | None):
        self.key = key
        self.requests: list[tuple[dict, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                if self.path != "/v1/chat/completions":
                    return self._reply(404, {"error": "not found"})
                if outer.key and self.headers.get("Authorization") != f"Bearer {outer.key}":
                    return self._reply(401, {"error": "Unauthorized"})
                text = f"echo: {body['messages'][-1]['content']}"
                self._reply(200, {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": text}}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

            def _reply(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def server():
    s = FakeOpenAI("sk-test")
    yield s
    s.close()


def serving_job(**serving) -> dict:
    return {"metadata": {"name": "bot"}, "spec": {"serving": serving},
            "status": {"phase": "Serving", "endpoint": {"service": "bot-serve", "url": "http://bot-serve.ns.svc:8000/v1",
                                                        "model": "support-v2"}}}


def test_the_target_comes_from_status_and_the_key_from_the_jobs_secret():
    seen = []
    t = chat.target_of(serving_job(apiKeySecretRef={"name": "vllm-key"}), "ns",
                       lambda name, key: seen.append((name, key)) or "sk-from-secret")
    assert (t.service, t.port, t.model, t.api_key) == ("bot-serve", 8000, "support-v2", "sk-from-secret")
    assert seen == [("vllm-key", "api-key")]
    assert chat.target_of(serving_job(), "ns", lambda *a: pytest.fail("no key to read")).api_key is None


def test_a_job_that_is_not_serving_says_why():
    ftj = {"metadata": {"name": "bot"}, "status": {"phase": "Deploying", "message": "serving.replicas is 0"}}
    with pytest.raises(chat.ChatError, match="not serving .phase Deploying: serving.replicas is 0"):
        chat.target_of(ftj, "ns")


def test_plain_http_sends_the_openai_body_with_the_key(server, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_openai(name, *args, **kwargs):  # the path without the openai package
        if name == "openai":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openai)
    body = chat.chat_body("support-v2", "my invoice is wrong", "be brief", 64, 0.0)
    assert chat.send(server.url, body, "sk-test") == "echo: my invoice is wrong"
    headers, sent = server.requests[-1]
    assert sent == {"model": "support-v2", "max_tokens": 64, "temperature": 0.0,
                    "messages": [{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": "my invoice is wrong"}]}
    assert headers["authorization"] == "Bearer sk-test"
    with pytest.raises(chat.ChatError, match="HTTP 401"):
        chat.send(server.url, body, "wrong")


def test_the_port_forward_runs_kubectl_and_reads_its_local_port(server, tmp_path):
    """kubectl's own output line ("Forwarding from 127.0.0.1:PORT -> 8000") gives the local port; the forward
    ends with the request. A stand-in kubectl records its arguments and prints that line for the fake server."""
    port = server.url.split(":")[2].split("/")[0]
    fake = tmp_path / "kubectl"
    args_file = tmp_path / "args"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {args_file}\necho 'Forwarding from 127.0.0.1:{port} -> 8000'\n"
                    "echo 'Forwarding from [::1]:0 -> 8000'\nexec sleep 60\n")
    fake.chmod(0o755)
    with chat.PortForward("tenant-a", "bot-serve", 8000, kubectl=str(fake), kubeconfig="/home/me/.kube/config") as pf:
        assert pf.local_port == int(port)
        body = chat.chat_body("bot", "hi", None, 8, 0.0)
        assert chat.send(f"http://127.0.0.1:{pf.local_port}/v1", body, "sk-test") == "echo: hi"
        proc = pf.proc
    assert proc.poll() is not None  # the forward is gone with the block
    assert args_file.read_text().split() == ["--kubeconfig", "/home/me/.kube/config", "port-forward", "--address",
                                             "127.0.0.1", "-n", "tenant-a", "service/bot-serve", ":8000"]


def test_a_port_forward_that_fails_says_what_kubectl_said(tmp_path):
    fake = tmp_path / "kubectl"
    fake.write_text("#!/bin/sh\necho 'error: services \"bot-serve\" is forbidden: User \"me\" cannot get'\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(chat.ChatError, match="forbidden"):
        with chat.PortForward("tenant-a", "bot-serve", 8000, kubectl=str(fake)):
            pass
