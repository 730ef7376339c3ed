"""The adapter loader against a real HTTP server speaking vLLM's documented load/unload requests.

The server keeps vLLM's behaviour as vLLM 0.33's handlers have it: a second load of a loaded name is 400
"has already been loaded", an unload of an unknown name 404, /v1/models lists adapters with `parent` and
`root`; a load reads the folder's adapter_config.json (vLLM does). It can answer 503 for a while (a server
restarting) and lose every adapter (a restarted container).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.trainer import adapter_loader as loader
from kubetune.trainer import artifacts
from kubetune.trainer.storage import LocalStore

from ..vllm_standin import BASE, FakeVllm


@pytest.fixture
def vllm():
    server = FakeVllm()
    yield server
    server.server.shutdown()


def publish(root: Path, name: str, content: bytes = b"weights", rev: str = "") -> str:
    """`rev`: a revision's own prefix (<name>/<rev>/adapter), as the operator's layout has it."""
    src = root / "src" / name / rev
    src.mkdir(parents=True, exist_ok=True)
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "base_model_name_or_path": BASE}))
    (src / "adapter_model.safetensors").write_bytes(content)
    prefix = f"{name}/{rev}/adapter" if rev else f"{name}/adapter"
    artifacts.publish_dir(LocalStore(root / "bucket"), src, prefix)
    return prefix


def client(vllm: FakeVllm, **kw) -> loader.VllmClient:
    return loader.VllmClient(vllm.url, attempts=kw.pop("attempts", 5), backoff=0.0, **kw)


def test_loads_verified_adapters_and_a_second_pass_changes_nothing(vllm, tmp_path):
    store = LocalStore(tmp_path / "bucket")
    desired = {n: (store, publish(tmp_path, n)) for n in ("alpha", "beta", "gamma")}
    c = client(vllm)
    result = loader.sync(c, desired, tmp_path / "cache")
    assert result.loaded == ["alpha", "beta", "gamma"] and not result.refused
    assert set(vllm.adapters) == {"alpha", "beta", "gamma"}
    for name, path in vllm.adapters.items():
        assert (Path(path) / "adapter_config.json").exists() and Path(path).name.startswith(f"{name}-")
    assert loader.ready(c, desired, result.refused)
    again = loader.sync(c, desired, tmp_path / "cache")
    assert again.loaded == [] and again.unloaded == [] and vllm.loads() == ["alpha", "beta", "gamma"]
    # A second load of the same name is idempotent (vLLM's 400 "already been loaded" is success).
    c.load("alpha", vllm.adapters["alpha"])
    assert vllm.adapters["alpha"] == again.present["alpha"]


def test_a_tampered_adapter_is_refused_and_never_loaded(vllm, tmp_path):
    store = LocalStore(tmp_path / "bucket")
    desired = {n: (store, publish(tmp_path, n)) for n in ("alpha", "beta")}
    c = client(vllm)
    loader.sync(c, desired, tmp_path / "cache")
    # beta's weights change in the bucket after its manifest was written.
    (tmp_path / "bucket" / "beta" / "adapter" / "adapter_model.safetensors").write_bytes(b"poisoned")
    result = loader.sync(c, desired, tmp_path / "cache2")  # a new pod: nothing cached yet
    assert set(result.refused) == {"beta"} and "sha256 mismatch" in result.refused["beta"]
    assert "beta" not in vllm.adapters and "alpha" in vllm.adapters  # the one it served is unloaded too
    assert result.unloaded == ["beta"]
    assert loader.ready(c, desired, result.refused)  # the others serve; the job of beta says why
    # No manifest at all: refused as incomplete.
    result = loader.sync(c, {"ghost": (store, "ghost/adapter")}, tmp_path / "cache2")
    assert "no MANIFEST.json" in result.refused["ghost"] and "alpha" not in vllm.adapters


def test_5xx_and_refused_connections_are_retried_then_given_up(vllm, tmp_path):
    store = LocalStore(tmp_path / "bucket")
    desired = {"alpha": (store, publish(tmp_path, "alpha"))}
    vllm.fail_next = 3
    result = loader.sync(client(vllm), desired, tmp_path / "cache")
    assert result.loaded == ["alpha"] and vllm.fail_next == 0
    vllm.fail_next = 100
    with pytest.raises(loader.VllmError, match="503"):
        loader.sync(client(vllm, attempts=3), desired, tmp_path / "cache")
    dead = loader.VllmClient("http://127.0.0.1:1", attempts=2, backoff=0.0)
    with pytest.raises(OSError):
        dead.adapters()
    assert not loader.ready(dead, desired, {})


def test_removed_and_republished_adapters(vllm, tmp_path):
    store = LocalStore(tmp_path / "bucket")
    desired = {n: (store, publish(tmp_path, n)) for n in ("alpha", "beta", "gamma")}
    c = client(vllm)
    loader.sync(c, desired, tmp_path / "cache")
    del desired["beta"], desired["gamma"]
    result = loader.sync(c, desired, tmp_path / "cache")
    assert result.unloaded == ["beta", "gamma"] and set(vllm.adapters) == {"alpha"}
    old = vllm.adapters["alpha"]
    publish(tmp_path, "alpha", b"retrained")  # a new revision's adapter under the same name
    result = loader.sync(c, desired, tmp_path / "cache")
    assert result.loaded == ["alpha"] and vllm.adapters["alpha"] != old
    assert (Path(vllm.adapters["alpha"]) / "adapter_model.safetensors").read_bytes() == b"retrained"


def test_a_restarted_server_is_not_ready_until_its_adapters_are_back(vllm, tmp_path):
    store = LocalStore(tmp_path / "bucket")
    desired = {n: (store, publish(tmp_path, n)) for n in ("alpha", "beta")}
    c = client(vllm)
    loader.sync(c, desired, tmp_path / "cache")
    vllm.adapters.clear()  # the vLLM container restarted: its adapters are gone
    assert not loader.ready(c, desired, {})
    result = loader.sync(c, desired, tmp_path / "cache")
    assert result.loaded == ["alpha", "beta"] and loader.ready(c, desired, result.refused)


def test_a_new_version_is_loaded_beside_checked_then_swapped_in_before_the_old_goes(vllm, tmp_path):
    """Blue/green on a shared server: load under a staging name, a completion through it, the in-place
    load under the served name, then the staging name goes. The name never disappears."""
    store = LocalStore(tmp_path / "bucket")
    served: dict[str, str] = {}
    c = client(vllm)
    loader.sync(c, {"alpha": (store, publish(tmp_path, "alpha", b"rev-1", rev="r1"))}, tmp_path / "cache", served)
    old = vllm.adapters["alpha"]
    vllm.calls.clear()
    result = loader.sync(c, {"alpha": (store, publish(tmp_path, "alpha", b"rev-2", rev="r2"))}, tmp_path / "cache",
                         served)
    assert result.loaded == ["alpha"] and vllm.adapters["alpha"] != old
    assert vllm.swaps() == [("load_lora_adapter", "alpha--staging"), ("completion", "alpha--staging"),
                            ("load_lora_adapter_inplace", "alpha"), ("unload_lora_adapter", "alpha--staging")]
    assert set(vllm.adapters) == {"alpha"} and served["alpha"].endswith("alpha/r2/adapter/")


def test_a_new_version_that_fails_is_held_back_and_the_old_keeps_serving(vllm, tmp_path):
    store = LocalStore(tmp_path / "bucket")
    served: dict[str, str] = {}
    c = client(vllm, attempts=2)
    loader.sync(c, {"alpha": (store, publish(tmp_path, "alpha", b"rev-1", rev="r1"))}, tmp_path / "cache", served)
    old, old_key = vllm.adapters["alpha"], served["alpha"]
    # Loads, but its completions fail: never swapped in.
    vllm.broken.add("alpha--staging")
    broken = {"alpha": (store, publish(tmp_path, "alpha", b"rev-2", rev="r2"))}
    result = loader.sync(c, broken, tmp_path / "cache", served)
    assert "alpha" in result.refused and vllm.adapters == {"alpha": old} and served["alpha"] == old_key
    assert ("load_lora_adapter_inplace", "alpha") not in vllm.swaps()
    assert loader.ready(c, broken, result.refused)  # the pod still serves the old version
    # Tampered: refused before any load; the old version still answers.
    vllm.broken.clear()
    tampered = {"alpha": (store, publish(tmp_path, "alpha", b"rev-3", rev="r3"))}
    (tmp_path / "bucket" / "alpha" / "r3" / "adapter" / "adapter_model.safetensors").write_bytes(b"poisoned")
    result = loader.sync(c, tampered, tmp_path / "cache", served)
    assert "sha256 mismatch" in result.refused["alpha"] and vllm.adapters == {"alpha": old}
