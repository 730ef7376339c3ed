"""`kubetune chat JOB "prompt"`: one chat request to a FineTuneJob's served model, from a laptop.

With the user's kubeconfig (their own permissions, nothing of the operator's):
the job's `status.endpoint` names the Service and the model; `kubectl
port-forward` to that Service gives a local URL (the Service is cluster-internal
and a NetworkPolicy admits the job's namespace only: a port-forward enters the
pod through the kubelet, not through the pod network); the API key, when the
job has one, is read from the Secret the job names (the user needs `get` on
it) or given with --api-key. The request goes through the `openai` package
when it is installed, else as plain HTTP with the same body: the endpoint is
OpenAI-compatible either way.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Optional


class ChatError(RuntimeError):
    """Something the user must fix; printed as one line."""


@dataclass
class Target:
    namespace: str
    service: str
    port: int
    model: str
    api_key: Optional[str]


def target_of(ftj: dict[str, Any], namespace: str, read_secret=None) -> Target:
    """Where to send a chat request for this FineTuneJob (pure but for `read_secret(name, key)`)."""
    status = ftj.get("status") or {}
    endpoint = status.get("endpoint") or {}
    name = (ftj.get("metadata") or {}).get("name", "?")
    if not endpoint.get("service"):
        raise ChatError(f"FineTuneJob {namespace}/{name} is not serving (phase {status.get('phase') or 'Pending'}"
                        + (f": {status['message']}" if status.get("message") else "") + ")")
    match = re.search(r":(\d+)(/|$)", endpoint.get("url") or "")
    port = int(match.group(1)) if match else 8000
    ref = ((ftj.get("spec") or {}).get("serving") or {}).get("apiKeySecretRef")
    key = read_secret(ref["name"], ref.get("key", "api-key")) if ref and read_secret else None
    return Target(namespace, endpoint["service"], port, endpoint.get("model") or name, key)


def chat_body(model: str, prompt: str, system: Optional[str], max_tokens: int, temperature: float) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}


def send(base_url: str, body: dict[str, Any], api_key: Optional[str], timeout: float = 300.0) -> str:
    """POST /chat/completions under `base_url` (ending in /v1); the reply's text."""
    try:
        import openai
    except ImportError:
        openai = None
    if openai is not None:
        client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=1)
        try:
            reply = client.chat.completions.create(**body)
        except openai.APIStatusError as e:
            raise ChatError(f"{base_url}/chat/completions: HTTP {e.status_code}: {e.message}") from None
        except openai.APIConnectionError as e:
            raise ChatError(f"{base_url}: {e}") from None
        return reply.choices[0].message.content or ""
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/chat/completions", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            reply = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:500]
        raise ChatError(f"{request.full_url}: HTTP {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        raise ChatError(f"{request.full_url}: {e.reason}") from None
    return reply["choices"][0]["message"]["content"] or ""


class PortForward:
    """`kubectl port-forward service/NAME :PORT` on 127.0.0.1, for the life of the `with` block."""

    def __init__(self, namespace: str, service: str, port: int, kubectl: Optional[str] = None,
                 kubeconfig: Optional[str] = None, context: Optional[str] = None):
        self.kubectl = kubectl or shutil.which("kubectl")
        if self.kubectl is None:
            raise ChatError("kubectl is not on PATH (it forwards the port; or pass --url to skip the forward)")
        self.cmd = [self.kubectl, "port-forward", "--address", "127.0.0.1", "-n", namespace, f"service/{service}",
                    f":{port}"]
        if kubeconfig:
            self.cmd[1:1] = ["--kubeconfig", kubeconfig]
        if context:
            self.cmd[1:1] = ["--context", context]
        self.proc: Optional[subprocess.Popen] = None
        self.local_port: Optional[int] = None

    def __enter__(self) -> "PortForward":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        seen = []
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            seen.append(line.strip())
            m = re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", line)
            if m:
                self.local_port = int(m.group(1))
                return self
        self.__exit__(None, None, None)
        raise ChatError("kubectl port-forward did not start: " + (" ".join(seen)[-500:] or "no output"))

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run_chat(name: str, prompt: str, namespace: Optional[str], url: Optional[str], api_key: Optional[str],
             system: Optional[str], max_tokens: int, temperature: float, kubeconfig: Optional[str],
             context: Optional[str]) -> str:
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    from kubetune.contract.facts import GROUP, PLURAL, VERSION

    config.load_kube_config(config_file=kubeconfig, context=context)
    if namespace is None:
        contexts, current = config.list_kube_config_contexts(config_file=kubeconfig)
        chosen = next((c for c in contexts if c["name"] == context), current) if context else current
        namespace = (chosen.get("context") or {}).get("namespace") or "default"
    try:
        ftj = client.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        raise ChatError(f"FineTuneJob {namespace}/{name}: {e.reason} ({e.status})") from None

    def read_secret(secret: str, key: str) -> Optional[str]:
        if api_key:
            return api_key
        try:
            data = client.CoreV1Api().read_namespaced_secret(secret, namespace).data or {}
        except ApiException as e:
            raise ChatError(f"the job's API key is in Secret {namespace}/{secret}, which you cannot read "
                            f"({e.reason}); pass --api-key") from None
        if key not in data:
            raise ChatError(f"Secret {namespace}/{secret} has no key {key!r}")
        return base64.b64decode(data[key]).decode()

    target = target_of(ftj, namespace, read_secret)
    key = api_key or target.api_key
    body = chat_body(target.model, prompt, system, max_tokens, temperature)
    if url:
        return send(url, body, key)
    with PortForward(namespace, target.service, target.port, kubeconfig=kubeconfig, context=context) as pf:
        return send(f"http://127.0.0.1:{pf.local_port}/v1", body, key)


def register(app) -> None:
    import typer

    @app.command("chat")
    def chat_cmd(
        name: str = typer.Argument(..., help="FineTuneJob name."),
        prompt: str = typer.Argument(..., help="The user message."),
        namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help="Namespace (default: the kubeconfig's)."),
        system: Optional[str] = typer.Option(None, "--system", help="A system message before the prompt."),
        max_tokens: int = typer.Option(256, "--max-tokens", help="Most tokens in the reply."),
        temperature: float = typer.Option(0.7, "--temperature"),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="KUBETUNE_API_KEY",
                                              help="API key (default: read from the job's apiKeySecretRef)."),
        url: Optional[str] = typer.Option(None, "--url", help="Base URL ending in /v1 instead of a port-forward."),
        kubeconfig: Optional[str] = typer.Option(None, "--kubeconfig", help="Kubeconfig file (default: KUBECONFIG)."),
        context: Optional[str] = typer.Option(None, "--context", help="Kubeconfig context."),
    ) -> None:
        """Send a chat request to a FineTuneJob's served model (port-forward with your kubeconfig) and print the reply."""
        try:
            typer.echo(run_chat(name, prompt, namespace, url, api_key, system, max_tokens, temperature, kubeconfig,
                                context))
        except ChatError as e:
            typer.echo(f"chat: {e}", err=True)
            raise typer.Exit(1)
