"""The job's kernel cache (trainer/kernel_cache.py): Triton's real cache format,
compiled for a Hopper target on this CPU machine (Triton compiles without a GPU;
only launching needs one), packed, restored elsewhere, and found by Triton."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from kubetune.trainer import kernel_cache as kc
from kubetune.trainer.storage import LocalStore

# Compiles one kernel for sm_90 into TRITON_CACHE_DIR. With "nocompile", Triton's front
# end raises: the kernel must then come from the cache (a miss exits with "MISS").
KERNEL_SCRIPT = textwrap.dedent('''
    import sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compiler


    @triton.jit
    def add(x, y, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        tl.store(x + i, tl.load(x + i, mask=m) + tl.load(y + i, mask=m), mask=m)


    if sys.argv[1] == "nocompile":
        def miss(*a, **k):
            raise SystemExit("MISS")
        compiler.ASTSource.make_ir = miss
    src = ASTSource(fn=add, signature={"x": "*fp32", "y": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                    constexprs={"BLOCK": int(sys.argv[2])})
    print(triton.compile(src, target=GPUTarget("cuda", 90, 32)).metadata.name)
''')


def compile_kernel(script: Path, cache: Path, mode: str, block: int = 128) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache), TRITON_DEFAULT_FP_FUSION="1")
    return subprocess.run([sys.executable, str(script), mode, str(block)], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A Triton cache holding two real compiled kernels (two block sizes)."""
    pytest.importorskip("triton")
    root = tmp_path_factory.mktemp("triton")
    script = root / "kernel.py"
    script.write_text(KERNEL_SCRIPT)
    cache = root / "cache-a"
    for block in (128, 256):
        r = compile_kernel(script, cache, "compile", block)
        assert r.returncode == 0, r.stderr[-2000:]
    return script, cache


def test_key_names_the_gpu_kind_and_changes_with_any_version():
    versions = {"torch": "2.11.0", "triton": "3.6.0", "liger-kernel": "0.8.5", "kubetune": "0.1.0"}
    key = kc.cache_key("NVIDIA H200", (9, 0), versions)
    assert key.startswith("nvidia-h200-sm90-") and len(key.rsplit("-", 1)[1]) == 12
    assert kc.cache_key("NVIDIA H200", (9, 0), dict(reversed(list(versions.items())))) == key
    assert kc.cache_key("NVIDIA H100 80GB HBM3", (9, 0), versions) != key
    assert kc.cache_key("NVIDIA H200", (10, 0), versions) != key
    for name in versions:
        assert kc.cache_key("NVIDIA H200", (9, 0), {**versions, name: "9.9.9"}) != key, name


def test_restored_elsewhere_the_kernels_are_found_without_compiling(compiled, tmp_path):
    script, cache = compiled
    entries = kc.complete_entries(cache)
    assert len(entries) == 2
    for names in entries.values():
        assert any(n.endswith(".cubin") for n in names) and any(n.startswith(kc.GROUP_PREFIX) for n in names)

    # the detector: an empty cache with compiling forbidden misses
    miss = compile_kernel(script, tmp_path / "empty", "nocompile")
    assert miss.returncode != 0 and "MISS" in miss.stderr

    archive = kc.pack(cache, entries)
    other = tmp_path / "pod-2" / "triton"
    added, archived = kc.unpack(archive, other)
    assert sorted(added) == sorted(entries) == archived
    for block in (128, 256):
        hit = compile_kernel(script, other, "nocompile", block)
        assert hit.returncode == 0, hit.stderr[-2000:]
    # the group files now name the files where they are, not where the first pod had them
    for entry in entries:
        grp = next((other / entry).glob(f"{kc.GROUP_PREFIX}*"))
        paths = json.loads(grp.read_text())["child_paths"].values()
        assert all(Path(p).parent == other / entry and Path(p).is_file() for p in paths)


def test_unpack_adds_only_what_is_missing(compiled, tmp_path):
    _, cache = compiled
    entries = kc.complete_entries(cache)
    first = sorted(entries)[0]
    archive = kc.pack(cache, {first: entries[first]})
    target = tmp_path / "t"
    assert kc.unpack(archive, target)[0] == [first]
    before = {p: p.stat().st_mtime_ns for p in (target / first).iterdir()}
    assert kc.unpack(kc.pack(cache, entries), target)[0] == sorted(set(entries) - {first})
    assert {p: p.stat().st_mtime_ns for p in (target / first).iterdir()} == before


def test_entries_being_written_or_not_triton_are_left_out(compiled, tmp_path):
    _, cache = compiled
    entries = kc.complete_entries(cache)
    copy = tmp_path / "cache"
    import shutil

    shutil.copytree(cache, copy)
    one, two = sorted(entries)
    (copy / one / next(n for n in entries[one] if n.endswith(".cubin"))).unlink()  # a file the group names is gone
    (copy / f"tmp.pid_1_{'x' * 20}").mkdir()  # Triton's temporary folder
    (copy / "notes.txt").write_text("x")
    (copy / ("B" * 52)).mkdir()  # a folder without a group file: still being written
    (copy / ("B" * 52) / "k.cubin").write_bytes(b"x")
    module = "C" * 64  # a C module Triton built (one .so, no group file) is kept
    (copy / module).mkdir()
    (copy / module / "cuda_utils.cpython-312-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    (copy / ("D" * 64)).mkdir()  # but not a folder of other files without a group
    (copy / ("D" * 64) / "k.so").write_bytes(b"x")
    (copy / ("D" * 64) / "k.c").write_bytes(b"x")
    assert sorted(kc.complete_entries(copy)) == sorted([two, module])
    added, _ = kc.unpack(kc.pack(copy, kc.complete_entries(copy)), tmp_path / "pod2")
    assert sorted(added) == [two, module]
    assert (tmp_path / "pod2" / module / "cuda_utils.cpython-312-x86_64-linux-gnu.so").read_bytes() == b"\x7fELF"


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, body in members:
            info.size = len(body) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(body) if info.isreg() else None)
    return buf.getvalue()


ENTRY = "A" * 52


def _group(entry_dir: str, *names: str) -> bytes:
    return json.dumps({"child_paths": {n: f"{entry_dir}/{n}" for n in names}}).encode()


@pytest.mark.parametrize("name", ["../escape/k.cubin", "/abs/k.cubin", f"{ENTRY}/sub/k.cubin", "k.cubin",
                                  f"{ENTRY}/..", "bad entry/k.cubin"])
def test_an_archive_with_a_path_out_of_place_adds_nothing(tmp_path, name):
    good = [(tarfile.TarInfo(f"{ENTRY}/k.cubin"), b"x"), (tarfile.TarInfo(f"{ENTRY}/__grp__k.json"), _group("/x/" + ENTRY, "k.cubin"))]
    data = _tar(good + [(tarfile.TarInfo(name), b"evil")])
    with pytest.raises(kc.ArchiveError, match="not a plain file"):
        kc.unpack(data, tmp_path / "c")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    assert not (tmp_path / "escape").exists()


def test_links_and_oversized_archives_are_refused(tmp_path):
    link = tarfile.TarInfo(f"{ENTRY}/k.cubin")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(kc.ArchiveError, match="not a plain file"):
        kc.unpack(_tar([(link, b"")]), tmp_path / "c")
    with pytest.raises(kc.ArchiveError, match="over the"):
        kc.unpack(b"\0" * (kc.MAX_ARCHIVE_BYTES + 1), tmp_path / "c")
    with pytest.raises(kc.ArchiveError, match="readable gzip tar"):
        kc.unpack(b"not a tar", tmp_path / "c")


def test_an_entry_whose_group_names_other_files_is_skipped(tmp_path):
    data = _tar([(tarfile.TarInfo(f"{ENTRY}/k.cubin"), b"x"),
                 (tarfile.TarInfo(f"{ENTRY}/__grp__k.json"), _group("/x/" + ENTRY, "k.cubin", "missing.json"))])
    assert kc.unpack(data, tmp_path / "c") == ([], [ENTRY])
    assert not (tmp_path / "c" / ENTRY).exists()


class CountingStore(LocalStore):
    def __init__(self, root):
        super().__init__(root)
        self.puts = 0

    def put_bytes(self, data, key):
        self.puts += 1
        super().put_bytes(data, key)


def test_save_then_restore_through_the_store(compiled, tmp_path, capsys):
    import shutil

    _, cache = compiled
    store = CountingStore(tmp_path / "bucket")
    local1 = tmp_path / "pod1"
    first = kc.KernelCache(store, "nvidia-h200-sm90-abc", local1)
    assert first.restore() == 0
    assert "none yet" in capsys.readouterr().out
    first.save()  # nothing compiled yet: nothing to upload
    assert store.puts == 0

    shutil.copytree(cache, local1)  # the first step compiled
    first.save(wait=False)  # in the background, as after the first step
    first.save()  # waits for it, then finds nothing new
    assert store.puts == 1
    assert (tmp_path / "bucket" / "nvidia-h200-sm90-abc.tar.gz").is_file()
    assert "2 kernels (2 new) saved to" in capsys.readouterr().out

    second = kc.KernelCache(store, "nvidia-h200-sm90-abc", tmp_path / "pod2")
    assert second.restore() == 2
    assert "2 kernels restored from" in capsys.readouterr().out
    second.save()  # holds only what the archive has: not uploaded again
    assert store.puts == 1
    assert sorted(kc.complete_entries(tmp_path / "pod2")) == sorted(kc.complete_entries(cache))

    other_gpu = kc.KernelCache(store, "nvidia-h100-sm90-abc", tmp_path / "pod3")
    assert other_gpu.restore() == 0


def test_a_broken_archive_or_store_costs_the_cache_not_the_run(tmp_path, capsys):
    store = LocalStore(tmp_path / "bucket")
    store.put_bytes(b"garbage", "k.tar.gz")
    cache = kc.KernelCache(store, "k", tmp_path / "local")
    assert cache.restore() == 0
    assert "not restored from" in capsys.readouterr().out

    class Unwritable(LocalStore):
        def put_bytes(self, data, key):
            raise PermissionError("AccessDenied")

    local = tmp_path / "local2" / ENTRY
    local.mkdir(parents=True)
    (local / "k.cubin").write_bytes(b"x")
    (local / "__grp__k.json").write_bytes(_group(str(local), "k.cubin"))
    kc.KernelCache(Unwritable(tmp_path / "b2"), "k", tmp_path / "local2").save()
    out = capsys.readouterr().out
    assert "not saved to" in out and "AccessDenied" in out


def test_the_callback_saves_after_the_first_step_and_at_the_end():
    from kubetune.trainer.callbacks import SaveKernelCache

    calls = []

    class Cache:
        def save(self, wait=True):
            calls.append(wait)

    cb = SaveKernelCache(Cache())
    for _ in range(3):
        cb.on_step_end(None, None, None)
    cb.on_train_end(None, None, None)
    assert calls == [False, True]
