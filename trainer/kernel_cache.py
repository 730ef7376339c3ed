"""Keep the compiled GPU kernels of a job between its pods, in its own store.

Why: a fresh pod starts with an empty Triton cache, so its first training step
compiles every Triton kernel the step runs (the FP8 quantisers, the SwiGLU and
LoRA kernels, Liger's norm and RoPE; forward and backward): 7-14 s of the
29-37 s from start to the first optimizer step on 8B (bench/RESULTS.md, issue
16). Every later pod of the same job (a restart after preemption, a resume, a
retry, the next revision of a GitOps rollout) would compile the same kernels
again, and build the C modules Triton launches them with. So the trainer
packs the complete entries of its local Triton cache into one archive after
its first step and puts it beside the job's artifacts
(`<spec.output.uri>/kernel-cache/<key>.tar.gz`, or the job's
`spec.output.kernelCacheUri`); the next pod fetches that one object while its
data and model load, and its first step finds the kernels compiled.

The key names the GPU kind and the versions that decide what Triton compiles
(torch, triton, liger-kernel, kubetune): another GPU kind or an upgrade gets an
archive of its own, and old archives are never merged into new ones. Triton
checks each entry against its own hash of source, options and target, so an
entry that does not apply is simply not used.

The archive comes from the job's own store, written by its own pods or by the
jobs that name the same `kernelCacheUri` (a TenantPolicy keeps that within the
tenant's output prefixes: nothing crosses tenants). It is still read as untrusted:
only plain files in flat entry folders, no links, no paths out of the cache,
a size limit. A cache that cannot be read or written costs a slower first step,
never the run: every failure here is logged and ignored.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from kubetune.trainer.storage import Store

log = logging.getLogger(__name__)

SUFFIX = ".tar.gz"
MAX_ARCHIVE_BYTES = 256 << 20  # far above a job's kernels (a few MiB); a larger object is not read
MAX_FILE_BYTES = 64 << 20
GROUP_PREFIX = "__grp__"  # Triton's group file: the entry's files by absolute path, written last
# Triton's entry folders are base32 hashes; anything else in an archive is refused.
_ENTRY = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}$")  # never "." nor ".."
VERSIONED = ("torch", "triton", "liger-kernel", "kubetune")


def cache_key(device_name: str, capability: tuple[int, int], versions: Mapping[str, Optional[str]]) -> str:
    """The archive's name for one GPU kind and one set of library versions, e.g.
    `nvidia-h200-sm90-1a2b3c4d5e6f`."""
    kind = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "gpu"
    digest = hashlib.sha256(json.dumps(dict(sorted(versions.items())), sort_keys=True).encode()).hexdigest()[:12]
    return f"{kind}-sm{capability[0]}{capability[1]}-{digest}"


def installed_versions(names: tuple[str, ...] = VERSIONED) -> dict[str, Optional[str]]:
    import importlib.metadata as md

    out: dict[str, Optional[str]] = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out


def local_cache_dir() -> Path:
    """Where this process's Triton reads and writes its kernels (TRITON_CACHE_DIR, or Triton's default)."""
    explicit = os.environ.get("TRITON_CACHE_DIR")
    if explicit:
        return Path(explicit)
    try:
        from triton import knobs

        return Path(knobs.cache.dir)
    except Exception:  # an older Triton without knobs: its documented default
        return Path.home() / ".triton" / "cache"


def _is_module(name: str) -> bool:
    # the C modules Triton builds with the host compiler (its CUDA utilities, kernel launchers),
    # one shared object per entry, written whole (by rename) and found by name, with no group file
    return name.endswith(".so")


def complete_entries(root: Path) -> dict[str, list[str]]:
    """{entry folder: its file names} for the entries whose group file lists only files
    that are present in the entry itself (Triton writes the group last: an entry being
    written, or one whose files were moved, is left out), and the entries holding only
    a built C module."""
    out: dict[str, list[str]] = {}
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or not _ENTRY.match(entry.name):
            continue  # Triton's tmp.pid_* folders among them
        try:
            names = sorted(p.name for p in entry.iterdir() if p.is_file() and not p.is_symlink())
        except OSError:
            continue
        groups = [n for n in names if n.startswith(GROUP_PREFIX)]
        if groups and all(_group_children_here(entry, g, names) for g in groups):
            out[entry.name] = names
        elif not groups and names and all(_is_module(n) for n in names):
            out[entry.name] = names
    return out


def _group_children(text) -> Optional[dict]:
    """A group file's {file name: absolute path}; None when it is not one Triton wrote."""
    try:
        children = json.loads(text).get("child_paths")
    except (ValueError, AttributeError):
        return None
    return children if isinstance(children, dict) and children else None


def _group_children_here(entry: Path, group: str, names: list[str]) -> bool:
    try:
        children = _group_children((entry / group).read_text())
    except OSError:
        return False
    # by name: the cache folder may be reached by another path than the one Triton recorded
    return children is not None and all(isinstance(p, str) and Path(p).parent.name == entry.name
                                        and Path(p).name in names for p in children.values())


def pack(root: Path, entries: Mapping[str, list[str]]) -> bytes:
    """A gzip tar of `entries` (from complete_entries), each file at `<entry>/<name>`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for entry, names in sorted(entries.items()):
            for name in names:
                tar.add(str(root / entry / name), arcname=f"{entry}/{name}", recursive=False)
    return buf.getvalue()


class ArchiveError(ValueError):
    pass


def unpack(data: bytes, root: Path) -> tuple[list[str], list[str]]:
    """Adds the archive's entries that `root` lacks; returns (the names added, all
    the archive's entries).

    Each entry is written into a temporary folder beside it and renamed into place
    whole, its group file rewritten to name the files where they now are (Triton
    records absolute paths, and the archive may come from a pod whose cache sat
    elsewhere). Raises ArchiveError, having added nothing from it, when any
    member is not a plain file at `<entry>/<name>`."""
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ArchiveError(f"archive of {len(data)} bytes is over the {MAX_ARCHIVE_BYTES} limit")
    files: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for m in tar:
                parts = m.name.split("/")
                if not m.isreg() or len(parts) != 2 or not _ENTRY.match(parts[0]) or not _FILE.match(parts[1]):
                    raise ArchiveError(f"member {m.name!r} is not a plain file at <entry>/<name>")
                if m.size > MAX_FILE_BYTES:
                    raise ArchiveError(f"member {m.name!r} has {m.size} bytes, over the {MAX_FILE_BYTES} limit")
                files.setdefault(parts[0], {})[parts[1]] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(f"not a readable gzip tar: {e}") from e

    root.mkdir(parents=True, exist_ok=True)
    added = []
    for entry, content in sorted(files.items()):
        final = root / entry
        if final.exists():
            continue  # this pod has it already (compiled it, or an earlier restore)
        rewritten = _relocated(content, final)
        if rewritten is None:
            log.info("kernel cache: entry %s skipped (its group file does not name its own files)", entry)
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry}.", dir=root))
        try:
            for name, body in rewritten.items():
                (tmp / name).write_bytes(body)
            os.replace(tmp, final)
            added.append(entry)
        except OSError:  # another process put the same entry in place first
            shutil.rmtree(tmp, ignore_errors=True)
    return added, sorted(files)


def _relocated(content: dict[str, bytes], final: Path) -> Optional[dict[str, bytes]]:
    out = dict(content)
    groups = [n for n in content if n.startswith(GROUP_PREFIX)]
    if not groups:
        return out if all(_is_module(n) for n in content) else None
    for g in groups:
        children = _group_children(content[g])
        if children is None:
            return None
        moved = {}
        for child, path in children.items():
            name = Path(str(path)).name
            if name not in content or child != name:
                return None
            moved[child] = str(final / name)
        out[g] = json.dumps({"child_paths": moved}).encode()
    return out


@dataclass
class KernelCache:
    """One job's kernel archive: `restore` before training, `save` after the first step
    (and at the end, when later steps compiled more)."""

    store: Store
    key: str
    local: Path
    known: set[str] = field(default_factory=set)  # entries the archive in the store holds, as far as we know
    _saving: Optional[threading.Thread] = None

    @property
    def object_key(self) -> str:
        return f"{self.key}{SUFFIX}"

    @classmethod
    def for_this_gpu(cls, uri: str, storage, local: Optional[Path] = None) -> Optional["KernelCache"]:
        """The cache at `uri` (an s3:// prefix or a folder) for this process's GPU; None without one."""
        import torch

        if not torch.cuda.is_available():
            return None  # no Triton kernels are compiled for the CPU path
        from kubetune.trainer.storage import open_store

        key = cache_key(torch.cuda.get_device_name(), torch.cuda.get_device_capability(), installed_versions())
        store = open_store(uri, storage.endpoint_url, storage.region, storage.max_concurrency)
        return cls(store, key, local or local_cache_dir())

    def restore(self) -> int:
        """Fetches the archive into the local cache; the number of entries added."""
        start = time.monotonic()
        try:
            data = self.store.get_bytes(self.object_key)
            if data is None:
                print(f"kernel cache: none yet at {self._where()} (the first step compiles, then saves)", flush=True)
                return 0
            added, archived = unpack(data, self.local)
        except Exception as e:  # a slower first step, never a failed run
            print(f"kernel cache: not restored from {self._where()}: {e}", flush=True)
            return 0
        self.known = set(archived)
        print(f"kernel cache: {len(added)} kernels restored from {self._where()} ({len(data) / 2**20:.1f} MiB, "
              f"{time.monotonic() - start:.1f} s)", flush=True)
        return len(added)

    def save(self, wait: bool = True) -> None:
        """Uploads the local cache's complete entries when it holds any the store's archive
        lacks; in a background thread unless `wait` (a step need not wait for the upload)."""
        if self._saving is not None:
            self._saving.join()
            self._saving = None
        if wait:
            self._save()
        else:
            self._saving = threading.Thread(target=self._save, name="kubetune-kernel-cache", daemon=True)
            self._saving.start()

    def _save(self) -> None:
        try:
            entries = complete_entries(self.local)
            if not entries or set(entries) <= self.known:
                return
            data = pack(self.local, entries)
            if len(data) > MAX_ARCHIVE_BYTES:
                print(f"kernel cache: not saved ({len(data)} bytes, over {MAX_ARCHIVE_BYTES})", flush=True)
                return
            self.store.put_bytes(data, self.object_key)
            new = len(set(entries) - self.known)
            self.known = set(entries)
            print(f"kernel cache: {len(entries)} kernels ({new} new) saved to {self._where()} ({len(data) / 2**20:.1f} MiB)",
                  flush=True)
        except Exception as e:
            print(f"kernel cache: not saved to {self._where()}: {e}", flush=True)

    def _where(self) -> str:
        return f"{self.store.uri.rstrip('/')}/{self.object_key}"
