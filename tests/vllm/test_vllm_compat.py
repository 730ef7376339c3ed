"""kubetune's serving against the real `vllm` package at the pinned version (CPU, no GPU).

The cached environment (env.py: the lock of `kubetune.contract.vllm.PACKAGE`)
runs driver.py once for this module; every check there is vLLM's own code:

- every argument list the merged-mode builder generates, over a matrix of
  specs, goes through `vllm serve`'s real parser and validation, then engine
  arguments and the model loader (runai_streamer's extra-config check);
- every VLLM_* variable the builder sets is one vLLM knows;
- a merged folder written by the trainer's own merge (transformers of
  requirements.lock) from a base whose config.json is in the classic Llama 3.1
  form loads through vLLM's config and tokenizer loaders under vLLM's
  transformers, with rope_theta 500000 and llama3 scaling intact and the chat
  template rendering exactly as the trainer's does;
- adapters the trainer's LoRA config publishes pass vLLM's LoRA checks (and
  the ones vLLM refuses are refused for the reason it gives);
- the API-key middleware answers 401 on every route of vLLM's server app
  without the key, and lets each through with it.

No flag or route list is copied from vLLM: the parser and the app are its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from kubetune.contract import vllm as pin
from kubetune.operator import adapter_servers, serving
from kubetune.operator.api import FineTuneJob
from kubetune.operator.settings import OperatorSettings

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import env as vllm_env  # noqa: E402

SETTINGS = OperatorSettings()
KEY = "s3cret-test-key"
MESSAGES = [{"role": "system", "content": "You answer support tickets."},
            {"role": "user", "content": "My invoice is wrong."}]

SPECS = {
    "defaults": {},
    "tp2-len": {"gpus": 2, "maxModelLen": 4096, "servedModelName": "support-v2"},
    "tp4-key": {"gpus": 4, "apiKeySecretRef": {"name": "k"}, "memory": "24Gi"},
    "tp8-autoscaled": {"gpus": 8, "autoscaling": {"maxReplicas": 4}, "cpu": "16", "memory": "1Ti"},
}


# Shared adapter servers (adapter mode): {name: (ranks of the jobs on it, serving settings)}.
SERVERS = {
    "one-adapter": ([16], {}),
    "five-adapters-key": ([8, 16, 64, 64, 300], {"apiKeySecretRef": {"name": "k"}, "gpus": 2}),
    "eleven-adapters": ([16] * 11, {"maxModelLen": 8192}),
}


def adapter_server(name: str) -> dict:
    """The AdapterServer the jobs of SERVERS[name] would feed, as the API server stores it."""
    ranks, serving_spec = SERVERS[name]
    jobs = [job({"mode": "adapter", **serving_spec}, method={"r": r}).model_copy(deep=True) for r in ranks]
    server = None
    for i, j in enumerate(jobs):
        j.metadata.name, j.metadata.uid = f"job-{i}", f"uid-{i}"
        mine = adapter_servers.intent(j)
        if server is None:
            server = mine
            server["metadata"]["uid"] = "server-uid"
        else:
            server["metadata"]["ownerReferences"] += mine["metadata"]["ownerReferences"]
            server["spec"]["adapters"] += mine["spec"]["adapters"]
    return server


def server_container(name: str) -> dict:
    dep = next(o for o in adapter_servers.server_objects(adapter_server(name), SETTINGS) if o["kind"] == "Deployment")
    return next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm")


def job(serving_spec: dict, **spec) -> FineTuneJob:
    return FineTuneJob.from_body({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "support-bot", "namespace": "tenant-a", "uid": "u-1", "generation": 1},
        "spec": {"baseModel": {"uri": "s3://models/llama/"}, "dataset": {"uri": "s3://data/train.jsonl"},
                 "output": {"uri": "s3://artifacts/support-bot/"}, "serving": serving_spec, **spec},
    })


def _container(objs: list[dict]) -> dict:
    dep = next(o for o in objs if o["kind"] == "Deployment")
    return dep["spec"]["template"]["spec"]["containers"][0]


def _base_model(path: Path) -> Path:
    """A tiny Llama whose config.json is in the classic form of a Llama 3.1 snapshot (rope_theta 500000,
    llama3 rope_scaling), with the Llama 3 chat template: what the trainer starts from."""
    from kubetune.trainer.tinymodel import write_tiny_model

    write_tiny_model(path, ["how do I reset my password", "your invoice is corrected"] * 20, family="llama",
                     heads=4, kv_heads=2, max_positions=1024)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = 500000.0
    config["rope_scaling"] = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 256, "rope_type": "llama3"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def _publish_adapter(base: Path, out: Path, **method) -> Path:
    """An adapter as the trainer configures it (trainer.train.lora_config of the recipe's MethodSpec)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from kubetune.contract.recipe import MethodSpec
    from kubetune.trainer.train import lora_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, lora_config(types.SimpleNamespace(method=MethodSpec(type="lora", **method))))
    with torch.no_grad():  # a trained-looking adapter: B != 0, so the merge really changes weights
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(str(out))
    return out


ADAPTERS = {
    "default": {},
    "r64-rslora": {"r": 64, "alpha": 128, "use_rslora": True},
    "r512": {"r": 512, "alpha": 512},
    "dora": {"use_dora": True},
}


def _lora_case(r=16, use_dora=False, bias="none", modules_to_save=None, rank_pattern=None) -> dict:
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "use_dora": use_dora,
              "bias": bias, "modules_to_save": modules_to_save, "rank_pattern": rank_pattern or {},
              "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "s3://models/llama/"}
    top = max([r, *(rank_pattern or {}).values()])
    # The server kubetune would start: the smallest --max-lora-rank choice that fits (512 at most).
    return {"config": config, "max_lora_rank": pin.max_lora_rank_for(min(top, pin.MAX_LORA_RANK)),
            "recipe": {"r": r, "use_dora": use_dora, "bias": bias, "modules_to_save": modules_to_save or [],
                       "rank_pattern": rank_pattern}}


LORA_CASES = {
    "r8": _lora_case(8), "r16": _lora_case(16), "r320": _lora_case(320), "r512": _lora_case(512),
    "r1024": _lora_case(1024), "pattern-over": _lora_case(16, rank_pattern={"q_proj": 1024}),
    "dora": _lora_case(use_dora=True), "bias-all": _lora_case(bias="all"), "bias-lora-only": _lora_case(bias="lora_only"),
    "save-lm-head": _lora_case(modules_to_save=["lm_head", "embed_tokens"]), "save-score": _lora_case(modules_to_save=["score"]),
    "dora-r1024": _lora_case(1024, use_dora=True),
}


@pytest.fixture(scope="module")
def answer(tmp_path_factory):
    python = vllm_env.ensure()  # builds the env on a machine without it (minutes), then cached
    work = tmp_path_factory.mktemp("vllm")
    from kubetune.trainer.merge import merge_adapter

    base = _base_model(work / "base")
    adapters = {name: _publish_adapter(base, work / f"adapter-{name}", **m) for name, m in ADAPTERS.items()}
    merged = merge_adapter(base, adapters["default"], work / "merged")

    parse = {}
    env_names: set[str] = set()
    for name, spec in SPECS.items():
        objs = serving.merged_objects(job(spec), SETTINGS)
        container = _container(objs)
        parse[name] = container["command"]
        env_names |= {e["name"] for e in container["env"]}
    for name in SERVERS:
        container = server_container(name)
        parse[f"server-{name}"] = container["command"]
        env_names |= {e["name"] for e in container["env"]}
    # Negative controls: the parser really refuses what it does not know.
    good = parse["defaults"]
    parse["control-unknown-flag"] = good + ["--no-such-flag-kubetune", "1"]
    parse["control-bad-load-format"] = [a if a != "runai_streamer" else "no_such_format" for a in good]

    keyed = serving.merged_objects(job(SPECS["tp4-key"]), SETTINGS)
    config_map = next(o for o in keyed if o["kind"] == "ConfigMap")
    module_dir = work / "auth"
    module_dir.mkdir()
    for filename, text in config_map["data"].items():  # what the pod mounts at serving.AUTH_DIR
        (module_dir / filename).write_text(text)

    request = {
        "lora_matrix": {"cases": LORA_CASES, "work": str(work / "lora-matrix")},
        "parse": parse,
        "env": sorted(env_names),
        "merged": {"trainer": {"dir": str(merged), "messages": MESSAGES}},
        "adapters": {name: {"dir": str(path), "max_lora_rank": _rank_choice(ADAPTERS[name].get("r", 16)),
                            "max_position_embeddings": 1024} for name, path in adapters.items()},
        "auth": {"argv": _container(keyed)["command"], "module_dir": str(module_dir), "key": KEY},
        "adapter_auth": {"argv": server_container("five-adapters-key")["command"], "module_dir": str(module_dir),
                         "key": KEY},
    }
    (work / "request.json").write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    # A cache of its own: vLLM's model-info cache from an earlier run would skip the inspection
    # subprocess below and hide how it runs.
    env.update({"VLLM_TARGET_DEVICE": "cpu", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "VLLM_CACHE_ROOT": str(work / "vllm-cache")})
    # cwd: not the repository root. vLLM inspects a model's architecture in a `python -m`
    # subprocess (unless its model-info cache already holds the answer), which puts the cwd
    # first on sys.path, where this repository's operator/ would shadow the standard library's.
    proc = subprocess.run([str(python), str(HERE / "driver.py"), str(work / "request.json"), str(work / "answer.json")],
                          env=env, capture_output=True, text=True, timeout=840, cwd=str(work))
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads((work / "answer.json").read_text())
    out["_trainer_merged"] = merged
    return out


def _rank_choice(r: int) -> int:
    """The --max-lora-rank a server needs for rank r: the smallest of vLLM's choices at or above it."""
    return min(c for c in (1, 8, 16, 32, 64, 128, 256, 320, 512) if c >= r) if r <= pin.MAX_LORA_RANK else r


def test_the_installed_vllm_is_the_pinned_one_with_the_pinned_transformers_range(answer):
    pkg = answer["package"]
    assert pkg["version"] == pin.VERSION
    assert SETTINGS.vllm_image == pin.IMAGE and pin.IMAGE.endswith(f":v{pkg['version']}")
    low, high = pin.TRANSFORMERS
    # The requirement vLLM's own metadata states, e.g. "transformers<5.21.0,>=5.16.1".
    clauses = set(pkg["transformers_requirement"].replace("transformers", "").replace(" ", "").split(","))
    assert clauses == {f">={low}", f"<{high}"}, pkg["transformers_requirement"]
    # The lock's max rank matches vLLM's own choices (rank_choice above uses the same list).
    assert max(answer["lora_ranks"]["ranks"]) == pin.MAX_LORA_RANK
    assert answer["lora_ranks"]["ranks"] == [1, 8, 16, 32, 64, 128, 256, 320, 512]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_generated_argument_list_parses_with_vllms_own_cli(answer, name):
    result = answer["parse"][name]
    assert result["ok"], result.get("error")
    j, spec = job(SPECS[name]), SPECS[name]
    args, engine = result["args"], result["engine"]
    assert args["model_tag"] == serving.merged_model_uri(j)
    assert engine["tensor_parallel_size"] == spec.get("gpus", 1)
    assert engine["load_format"] == "runai_streamer" and result["loader"] == "RunaiModelStreamerLoader"
    assert engine["served_model_name"] == [serving.served_model_name(j)]
    assert engine["max_model_len"] == spec.get("maxModelLen")
    assert engine["shutdown_timeout"] == SETTINGS.serving_drain_seconds
    assert args["port"] == serving.PORT and args["host"] == "0.0.0.0"
    assert args["model_loader_extra_config"] == {"memory_limit": serving.streamer_memory_limit(j)}
    if "apiKeySecretRef" in spec:
        assert args["middleware"] == [f"{serving.AUTH_MODULE}.RequireApiKey"]
    else:
        assert not args["middleware"]
    assert not args.get("api_key"), "the key travels in VLLM_API_KEY, never on the command line"


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_every_shared_adapter_server_parses_with_vllms_own_cli(answer, name):
    result = answer["parse"][f"server-{name}"]
    assert result["ok"], result.get("error")
    ranks, spec = SERVERS[name]
    engine, args = result["engine"], result["args"]
    assert args["model_tag"] == "s3://models/llama/" and engine["load_format"] == "runai_streamer"
    assert engine["enable_lora"] is True
    # --max-loras follows the adapters (powers of two, capped by the installation's GPU slots), the CPU
    # cache holds them all, and the rank is vLLM's smallest choice that fits the largest adapter.
    slots = 1 << (len(ranks) - 1).bit_length()
    assert engine["max_loras"] == min(slots, SETTINGS.adapter_max_gpu_loras)
    assert engine["max_cpu_loras"] == slots and engine["max_cpu_loras"] >= len(ranks)
    assert engine["max_lora_rank"] == _rank_choice(max(ranks))
    assert engine["tensor_parallel_size"] == spec.get("gpus", 1)
    assert engine["max_model_len"] == spec.get("maxModelLen")
    expected = [adapter_servers.LOOPBACK_MIDDLEWARE]
    if "apiKeySecretRef" in spec:
        expected.insert(0, f"{serving.AUTH_MODULE}.RequireApiKey")
    assert args["middleware"] == expected


def test_only_the_pods_own_sidecar_may_load_or_unload_adapters(answer):
    result = answer["adapter_auth"]
    assert result["ok"], result.get("trace") or result.get("error")
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING (set on the server's vLLM container) opens the routes.
    assert {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"} <= set(result["paths"])
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        remote, local = result["remote"][path], result["loopback"][path]
        assert remote["keyed"] == 403 and remote["bare"] in (401, 403), (path, remote)  # the key is not enough
        assert local["bare"] == 401, (path, local)  # the sidecar sends the key too
        assert local["keyed"] not in (401, 403), (path, local)  # reached vLLM's handler
    chat = result["remote"]["/v1/chat/completions"]
    assert chat["bare"] == 401 and chat["keyed"] not in (401, 403), chat  # tenants' inference is unaffected


def test_the_parser_refuses_what_it_does_not_know(answer):
    unknown = answer["parse"]["control-unknown-flag"]
    assert not unknown["ok"] and "--no-such-flag-kubetune" in unknown["error"]
    bad = answer["parse"]["control-bad-load-format"]
    assert not bad["ok"] and "no_such_format" in bad["error"]


def test_every_vllm_environment_variable_set_is_one_vllm_reads(answer):
    assert answer["env"]["unknown"] == []


def test_the_trainers_merged_folder_loads_through_vllms_loaders(answer):
    from transformers import AutoTokenizer

    result = answer["merged"]["trainer"]
    assert result["ok"], result.get("trace") or result.get("error")
    low, high = pin.TRANSFORMERS
    version = tuple(int(x) for x in result["transformers"].split(".")[:3])
    assert tuple(int(x) for x in low.split(".")) <= version < tuple(int(x) for x in high.split("."))
    rope = result["rope_parameters"]
    # Not silently rope_theta 10000 without scaling: the base's values reach vLLM's config.
    assert rope["rope_theta"] == 500000.0 and rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 256
    assert result["architectures"] == ["LlamaForCausalLM"]
    # The chat template the trainer kept renders the same under vLLM as under the trainer's transformers.
    trainer_tok = AutoTokenizer.from_pretrained(str(answer["_trainer_merged"]))
    assert result["template"] == trainer_tok.chat_template
    assert result["rendered"] == trainer_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert result["eos_token"] == trainer_tok.eos_token == "<|eot_id|>"


@pytest.mark.parametrize("name", ["default", "r64-rslora", "r512"])
def test_adapters_the_trainer_publishes_pass_vllms_lora_checks(answer, name):
    result = answer["adapters"][name]
    assert result["ok"], result.get("error")
    assert result["r"] == ADAPTERS[name].get("r", 16)


def test_vllm_refuses_a_dora_adapter_so_adapter_serving_must_refuse_dora_at_admission(answer):
    result = answer["adapters"]["dora"]
    assert not result["ok"] and "DoRA" in result["error"]


def test_the_api_key_covers_every_route_of_vllms_server(answer):
    result = answer["auth"]
    assert result["ok"], result.get("trace") or result.get("error")
    routes = result["routes"]
    paths = {r["path"] for r in routes}
    # The enumeration reaches the paths vLLM's own check leaves open.
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/invocations", "/metrics", "/health",
                 "/scale_elastic_ep", "/inference/v1/generate"):
        assert path in paths, sorted(paths)
    for r in routes:
        if r["path"] in ("/health",):
            assert r["bare"] != 401, r
        else:
            assert r["bare"] == 401, r
            assert r["keyed"] != 401, r
    assert [s["path"] for s in result["websockets"]] == ["/v1/realtime"]
    assert all(s["refused"] for s in result["websockets"]), result["websockets"]


def test_kubetune_chat_through_the_real_openai_package():
    """`kubetune chat`'s openai path (the project's venv has no openai; the vLLM env has vLLM's own pin of it),
    against a local server speaking the chat API: the endpoint in status works with the OpenAI client."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("test_chat_fake", HERE.parent / "unit" / "test_chat.py")
    fake = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fake  # its dataclasses look their module up
    spec.loader.exec_module(fake)
    server = fake.FakeOpenAI("sk-test")
    try:
        chat_py = Path(serving.__file__).with_name("chat.py")
        script = (
            "import importlib.util, json, sys\n"
            f"spec = importlib.util.spec_from_file_location('chat', {str(chat_py)!r})\n"
            "chat = importlib.util.module_from_spec(spec); sys.modules['chat'] = chat; spec.loader.exec_module(chat)\n"
            "import openai; print(openai.__version__)\n"
            f"print(chat.send({server.url!r}, chat.chat_body('support-v2', 'hello there', None, 16, 0.0), 'sk-test'))\n"
            f"try:\n    chat.send({server.url!r}, chat.chat_body('m', 'x', None, 1, 0.0), 'bad')\n"
            "except chat.ChatError as e:\n    print('refused:', e)\n"
        )
        # cwd: not the repository root, whose operator/ folder would shadow the standard library's operator.
        proc = subprocess.run([str(vllm_env.ensure()), "-c", script], capture_output=True, text=True, timeout=120,
                              cwd=str(HERE))
        assert proc.returncode == 0, proc.stderr[-3000:]
        version, reply, refused = proc.stdout.strip().splitlines()[-3:]
        assert reply == "echo: hello there"
        assert refused.startswith("refused:") and "401" in refused
        headers, body = server.requests[0]
        assert headers["authorization"] == "Bearer sk-test" and body["model"] == "support-v2"
        assert "OpenAI" in headers.get("user-agent", "")  # it really went through the openai client
    finally:
        server.close()


@pytest.mark.parametrize("name", sorted(LORA_CASES))
def test_the_adapter_serving_predicate_agrees_with_vllms_lora_checks(answer, name):
    """kubetune.contract.vllm.lora_problems (what adapter-mode admission will refuse) says no exactly when
    vLLM's own checks refuse the adapter."""
    case = LORA_CASES[name]
    verdict = answer["lora_matrix"][name]
    problems = pin.lora_problems(**case["recipe"])
    assert verdict["ok"] == (problems == []), (problems, verdict)
    assert list(pin.LORA_RANKS) == answer["lora_ranks"]["ranks"]
