"""Runs inside the cached vLLM environment (tests/vllm/env.py), never in the project's venv.

    python driver.py request.json answer.json

Each check uses vLLM's own code at the pinned version, no copy of its flag
lists: its CLI (the parser `vllm serve` builds, and the subcommand's own
validation), its engine-argument and loader-config construction, its config
and tokenizer loaders and chat-template resolution, its LoRA config checks,
its environment-variable table and its OpenAI server's FastAPI app.
Every check records an error instead of raising, so one answer file says
everything.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import sys
import traceback
import typing


def parse(argv: list[str]) -> dict:
    """`argv` (["vllm", "serve", ...]) through the real CLI entry point, stopped before it serves."""
    import vllm.entrypoints.cli.serve as serve_cli
    from vllm.entrypoints.cli.main import main

    seen = {}
    original = serve_cli.ServeSubcommand.cmd
    serve_cli.ServeSubcommand.cmd = staticmethod(lambda args: seen.setdefault("args", args))
    saved = sys.argv
    err = io.StringIO()
    try:
        sys.argv = list(argv)
        with contextlib.redirect_stderr(err):
            main()  # parse_args, then the subcommand's validate(args), then our stub instead of serving
    except SystemExit as e:
        return {"ok": False, "error": err.getvalue().strip()[-2000:] or f"exit {e.code}"}
    except Exception as e:  # the subcommand's validation
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    finally:
        sys.argv = saved
        serve_cli.ServeSubcommand.cmd = original
    args = seen["args"]
    # The first thing vLLM's own ServeSubcommand.cmd does (replaced above): the positional model wins.
    if getattr(args, "model_tag", None) is not None:
        args.model = args.model_tag
    out = {"ok": True, "args": {k: v for k, v in vars(args).items()
                                if isinstance(v, (str, int, float, bool, type(None), list, dict))
                                and k != "dispatch_function"}}
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.model_executor.model_loader import get_model_loader

        engine_args = AsyncEngineArgs.from_cli_args(args)
        # The loader checks its extra config (runai_streamer: its allowed keys and value types).
        loader = get_model_loader(engine_args.create_load_config())
        out["loader"] = type(loader).__name__
        out["engine"] = {"tensor_parallel_size": engine_args.tensor_parallel_size,
                         "load_format": str(engine_args.load_format),
                         "served_model_name": engine_args.served_model_name,
                         "max_model_len": engine_args.max_model_len,
                         "shutdown_timeout": getattr(engine_args, "shutdown_timeout", None),
                         "enable_lora": engine_args.enable_lora, "max_loras": engine_args.max_loras,
                         "max_cpu_loras": engine_args.max_cpu_loras, "max_lora_rank": engine_args.max_lora_rank}
    except Exception as e:
        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def env_names(names: list[str]) -> dict:
    import vllm.envs as envs

    return {"unknown": [n for n in names if n.startswith("VLLM_") and n not in envs.environment_variables]}


def merged(model_dir: str, messages: list[dict]) -> dict:
    """The folder through vLLM's config loader, tokenizer loader and chat-template resolution."""
    try:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.renderers.hf import resolve_chat_template
        from vllm.tokenizers import get_tokenizer

        model_config = EngineArgs(model=model_dir, tokenizer=model_dir, max_model_len=128).create_model_config()
        hf = model_config.hf_config
        tokenizer = get_tokenizer(model_dir)
        template = resolve_chat_template(tokenizer, None, None, model_config=model_config)
        rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        return {"ok": True, "architectures": list(hf.architectures or []),
                "rope_parameters": getattr(hf, "rope_parameters", None),
                "max_model_len": model_config.max_model_len,
                "tokenizer_class": type(tokenizer).__mro__[1].__name__,
                "eos_token": tokenizer.eos_token, "template": template, "rendered": rendered,
                "transformers": importlib.metadata.version("transformers")}
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}


def adapter(adapter_dir: str, max_lora_rank: int, max_position_embeddings: int) -> dict:
    """vLLM's own checks of a LoRA adapter before it loads one (PEFTHelper.validate_legal)."""
    try:
        from vllm.config.lora import LoRAConfig
        from vllm.lora.peft_helper import PEFTHelper

        helper = PEFTHelper.from_local_dir(adapter_dir, max_position_embeddings)
        helper.validate_legal(LoRAConfig(max_lora_rank=max_lora_rank))
        return {"ok": True, "r": helper.r, "alpha": helper.lora_alpha, "targets": sorted(helper.target_modules)
                if isinstance(helper.target_modules, list) else helper.target_modules}
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def lora_matrix(cases: dict, work: str) -> dict:
    """vLLM's verdict on adapter configs (adapter_config.json only: that is what its checks read)."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    out = {}
    for name, case in cases.items():
        folder = os.path.join(work, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(case["config"], f)
        try:
            PEFTHelper.from_local_dir(folder, 4096).validate_legal(LoRAConfig(max_lora_rank=case["max_lora_rank"]))
            out[name] = {"ok": True}
        except Exception as e:
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return out


def lora_ranks() -> dict:
    from vllm.config.lora import MaxLoRARanks

    return {"ranks": list(typing.get_args(MaxLoRARanks))}


def _literal_values(t) -> tuple[str, ...]:
    out: list[str] = []
    for arg in typing.get_args(t):
        out.extend([arg] if isinstance(arg, str) else _literal_values(arg))
    return tuple(out)


def _app(argv: list[str], module_dir: str, key: str):
    """vLLM's OpenAI server app as `argv` builds it, with every task's routes (the widest route set vLLM's
    app can have) and the middlewares of `module_dir` importable, as the pod mounts them."""
    import vllm.entrypoints.cli.serve as serve_cli
    from vllm.entrypoints.cli.main import main
    from vllm.entrypoints.launchers.app import build_app
    from vllm.tasks import SupportedTask

    os.environ["VLLM_API_KEY"] = key
    if module_dir not in sys.path:
        sys.path.insert(0, module_dir)
    seen = {}
    serve_cli.ServeSubcommand.cmd = staticmethod(lambda args: seen.setdefault("args", args))
    sys.argv = list(argv)
    main()
    seen["args"].model = seen["args"].model_tag
    return build_app(seen["args"], supported_tasks=_literal_values(SupportedTask))


def auth(argv: list[str], module_dir: str, key: str) -> dict:
    """vLLM's OpenAI server app as `argv` builds it (every task's routes), our middleware on: each route
    without the key, and with it."""
    parsed = parse(argv)
    if not parsed["ok"]:
        return parsed
    try:
        from fastapi.testclient import TestClient

        app = _app(argv, module_dir, key)
        client = TestClient(app, raise_server_exceptions=False)
        results = []
        for route in app.routes:
            path = getattr(route, "path", None)
            if not path:
                continue
            concrete = path
            for part in path.split("/"):
                if part.startswith("{") and part.endswith("}"):
                    concrete = concrete.replace(part, "x")
            methods = sorted(getattr(route, "methods", None) or ["GET"])
            for method in methods:
                if method in ("HEAD", "OPTIONS"):
                    continue
                if "WebSocket" in type(route).__name__:
                    continue  # checked below
                bare = client.request(method, concrete, json={})
                keyed = client.request(method, concrete, json={}, headers={"Authorization": f"Bearer {key}"})
                results.append({"path": path, "method": method, "bare": bare.status_code, "keyed": keyed.status_code})
        sockets = []
        for route in app.routes:
            if "WebSocket" in type(route).__name__:
                try:
                    with client.websocket_connect(route.path):
                        sockets.append({"path": route.path, "refused": False})
                except Exception:
                    sockets.append({"path": route.path, "refused": True})
        return {"ok": True, "routes": results, "websockets": sockets}
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}


def adapter_auth(argv: list[str], module_dir: str, key: str) -> dict:
    """A shared adapter server's app (runtime LoRA updating on, both middlewares): the load/unload routes
    from a client elsewhere (refused even with the key) and from the pod's loopback (the sidecar)."""
    parsed = parse(argv)
    if not parsed["ok"]:
        return parsed
    try:
        from fastapi.testclient import TestClient

        os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        import vllm.envs as envs

        if hasattr(envs, "__getattr__") and hasattr(envs, "disable_envs_cache"):
            envs.disable_envs_cache()
        app = _app(argv, module_dir, key)
        paths = sorted({getattr(r, "path", "") for r in app.routes})
        keyed = {"Authorization": f"Bearer {key}"}
        out = {"ok": True, "paths": paths, "remote": {}, "loopback": {}}
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/chat/completions"):
            body = {"lora_name": "x", "lora_path": "/nonexistent"}
            remote = TestClient(app, raise_server_exceptions=False, client=("10.1.2.3", 40000))
            local = TestClient(app, raise_server_exceptions=False, client=("127.0.0.1", 40000))
            out["remote"][path] = {"keyed": remote.post(path, json=body, headers=keyed).status_code,
                                   "bare": remote.post(path, json=body).status_code}
            out["loopback"][path] = {"keyed": local.post(path, json=body, headers=keyed).status_code,
                                     "bare": local.post(path, json=body).status_code}
        return out
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}


def package() -> dict:
    requires = importlib.metadata.requires("vllm") or []
    return {"version": importlib.metadata.version("vllm"),
            "transformers_requirement": next((r for r in requires if r.lower().startswith("transformers")), None),
            "transformers": importlib.metadata.version("transformers")}


def main() -> None:
    request_path, answer_path = sys.argv[1], sys.argv[2]  # the checks below replace sys.argv
    request = json.loads(open(request_path).read())
    answer: dict = {"package": package(), "lora_ranks": lora_ranks()}
    answer["parse"] = {k: parse(v) for k, v in request.get("parse", {}).items()}
    answer["env"] = env_names(request.get("env", []))
    answer["merged"] = {k: merged(v["dir"], v["messages"]) for k, v in request.get("merged", {}).items()}
    answer["adapters"] = {k: adapter(v["dir"], v["max_lora_rank"], v["max_position_embeddings"])
                          for k, v in request.get("adapters", {}).items()}
    if "lora_matrix" in request:
        answer["lora_matrix"] = lora_matrix(request["lora_matrix"]["cases"], request["lora_matrix"]["work"])
    if "auth" in request:
        a = request["auth"]
        answer["auth"] = auth(a["argv"], a["module_dir"], a["key"])
    if "adapter_auth" in request:
        a = request["adapter_auth"]
        answer["adapter_auth"] = adapter_auth(a["argv"], a["module_dir"], a["key"])
    with open(answer_path, "w") as f:
        json.dump(answer, f, indent=1, default=str)


if __name__ == "__main__":
    main()
