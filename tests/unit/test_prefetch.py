"""The background reader of the trainer's libraries (trainer/prefetch.py)."""

from __future__ import annotations

import sys

from kubetune.trainer import prefetch


def _fake_package(root, name="fakepkg"):
    pkg = root / name
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "sub" / "mod.py").write_text("y = 2\n" * 100)
    (pkg / "small.so").write_bytes(b"\0" * 1000)
    (pkg / "big.so.1").write_bytes(b"\1" * 50_000)
    (pkg / "data.bin").write_bytes(b"\2" * 10)  # not a suffix the imports read
    return pkg


def test_package_files_lists_shared_libraries_largest_first(tmp_path, monkeypatch):
    pkg = _fake_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    files = prefetch.package_files(["fakepkg", "no_such_package_here"])
    assert files[:2] == [pkg / "big.so.1", pkg / "small.so"]
    assert set(files[2:]) == {pkg / "__init__.py", pkg / "sub" / "mod.py"}
    assert "fakepkg" not in sys.modules  # found, not imported


def test_without_fadvise_the_readers_read_every_byte_and_stop(tmp_path, monkeypatch):
    pkg = _fake_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\3" * (9 << 20))  # more than one read chunk
    files = prefetch.package_files(["fakepkg"]) + prefetch.model_files(str(model))
    monkeypatch.delattr(prefetch.os, "posix_fadvise")  # a platform without the call: files are read whole
    p = prefetch.Prefetch(threads=3).add(files + [tmp_path / "vanished.so"])
    p.close()
    p.join(timeout=30)
    assert p.bytes_read == sum(f.stat().st_size for f in files)
    assert p.files_read == len(files)  # the missing file is skipped, not fatal
    assert pkg.exists()


def test_model_files_only_for_a_local_folder(tmp_path):
    assert prefetch.model_files("s3://bucket/models/llama") == []
    assert prefetch.model_files(str(tmp_path / "absent")) == []
    assert prefetch.model_files(None) == []


def test_off_unless_asked_for_and_then_only_where_a_gpu_is_visible(tmp_path):
    gpu = tmp_path / "nvidiactl"
    gpu.write_text("")
    assert not prefetch.wanted({}, str(gpu))  # not shown to pay: off by default
    assert not prefetch.wanted({"KUBETUNE_PREFETCH": "0"}, str(gpu))
    assert prefetch.wanted({"KUBETUNE_PREFETCH": "1"}, str(gpu))
    assert not prefetch.wanted({"KUBETUNE_PREFETCH": "1"}, str(tmp_path / "absent"))
    assert prefetch.wanted({"KUBETUNE_PREFETCH": "force"}, str(tmp_path / "absent"))


def test_advice_alone_counts_the_bytes_it_announced(tmp_path):
    f = tmp_path / "lib.so"
    f.write_bytes(b"\4" * 12345)
    p = prefetch.Prefetch(threads=1).add([f, tmp_path / "absent.so"])
    p.close()
    p.join(timeout=30)
    assert p.bytes_read == 12345 and p.files_read == 1


def test_start_lists_in_the_background_and_finishes(tmp_path, monkeypatch):
    _fake_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("KUBETUNE_PREFETCH", "force")
    p = prefetch.start(None, packages=["fakepkg"], threads=2)
    p.join(timeout=30)
    assert p.files_read == 4
