"""Read the trainer's libraries (and a local base model) into the page cache in
the background while the process imports them.

Why: on a node whose page cache does not hold the image yet (a fresh node, or
the first pod after an image pull) the trainer's imports are bound by the disk,
not the CPU: about 20 s of imports on a cold cache against 13 s on a warm one
(bench/RESULTS.md, 8B on one H200). Python imports one module at a time, and
each import reads a few small files, or pages of a large shared library as
they fault in: the disk sees one small request at a time. A few threads that
announce the same files to the kernel (POSIX_FADV_WILLNEED), largest libraries
first, keep many requests in flight, so the imports find their files in memory.
Threads, not processes: the calls release the GIL, and nothing is imported
twice. They run at a lower CPU priority, stop after a deadline, and a failure
only means a slower start. Off unless asked for (`wanted`).

Imports nothing outside the standard library, so it can start before torch.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

# What the train stage imports, roughly in the order it needs them. `nvidia` holds the
# CUDA libraries of PyTorch's wheels (cuBLAS, cuDNN, NCCL) where they are installed.
PACKAGES = ("torch", "nvidia", "numpy", "transformers", "safetensors", "tokenizers", "peft", "accelerate", "trl",
            "datasets", "pyarrow", "triton", "bitsandbytes", "liger_kernel", "sympy", "jinja2", "pydantic",
            "pydantic_core", "kubetune")
SUFFIXES = (".so", ".py", ".pyc", ".json", ".jinja")
_CHUNK = 4 << 20


def package_files(packages: Iterable[str] = PACKAGES, suffixes: tuple[str, ...] = SUFFIXES) -> list[Path]:
    """The files of the installed `packages` with these suffixes, shared libraries
    first and largest first (they are read as pages fault in, the slowest way),
    then the rest in path order. Packages not installed are skipped; finding a
    package does not import it."""
    libs: list[tuple[int, Path]] = []
    rest: list[Path] = []
    seen: set[str] = set()
    for name in packages:
        for root in _locations(name):
            for dirpath, _dirs, files in os.walk(root):
                for f in files:
                    if not f.endswith(suffixes) and ".so." not in f:
                        continue
                    p = os.path.join(dirpath, f)
                    if p in seen:
                        continue
                    seen.add(p)
                    if f.endswith(".so") or ".so." in f:
                        try:
                            libs.append((os.path.getsize(p), Path(p)))
                        except OSError:
                            continue
                    else:
                        rest.append(Path(p))
    libs.sort(key=lambda t: -t[0])
    return [p for _, p in libs] + sorted(rest)


def _locations(name: str) -> list[str]:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)
    return [os.path.dirname(spec.origin)] if spec.origin else []


def model_files(model_dir: Optional[str]) -> list[Path]:
    """The weight and tokenizer files of a base model on a local disk (not a URI)."""
    if not model_dir or "://" in model_dir:
        return []
    d = Path(model_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_file())


class Prefetch:
    """Background readers over a queue of files; `add` appends more.

    Each file is announced to the kernel with POSIX_FADV_WILLNEED, which starts
    its readahead and costs next to nothing for pages already cached (a warm node
    pays no copying); where the call is missing, the reader reads it whole."""

    def __init__(self, threads: int = 8, deadline_s: float = 120.0, nice: int = 10):
        self._q: "queue.Queue[Optional[Path]]" = queue.Queue()
        self._deadline = time.monotonic() + deadline_s
        self._nice = nice
        self.bytes_read = 0
        self.files_read = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"kubetune-prefetch-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def add(self, files: Iterable[Path]) -> "Prefetch":
        for f in files:
            self._q.put(f)
        return self

    def close(self) -> None:
        """No more files: each reader ends when the queue is empty."""
        for _ in self._threads:
            self._q.put(None)

    def join(self, timeout: Optional[float] = None) -> None:
        for t in self._threads:
            t.join(timeout)

    def _run(self) -> None:
        try:  # below the main thread, which does the real work
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        except (AttributeError, OSError):
            pass
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            f = self._q.get()
            if f is None or time.monotonic() > self._deadline:
                return
            n = _advise(f)
            if n < 0:
                n = _read_whole(f, view)
            with self._lock:
                self.bytes_read += n
                self.files_read += 1 if n else 0


def _advise(path: Path) -> int:
    """Ask the kernel to read the file ahead; its size, or -1 where the call is
    not available (then the caller reads it)."""
    if not hasattr(os, "posix_fadvise"):
        return -1
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        size = os.fstat(fd).st_size
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
        return size
    except OSError:
        return -1
    finally:
        os.close(fd)


def _read_whole(path: Path, view: memoryview) -> int:
    try:
        with open(path, "rb", buffering=0) as fh:
            total = 0
            while True:
                n = fh.readinto(view)
                if not n:
                    return total
                total += n
    except OSError:
        return 0


def wanted(env=os.environ, gpu_device: str = "/dev/nvidiactl") -> bool:
    """KUBETUNE_PREFETCH: "1" on where an NVIDIA GPU is visible, "force" on
    anywhere; unset or anything else: off. Off by default because it is not
    shown to pay: on a warm page cache the imports took 20.8 s with it against
    17.1 s without (the readers' Python loops hold the GIL the imports need), and
    its gain on a cold one is not measured apart (bench/RESULTS.md, issue 16)."""
    choice = env.get("KUBETUNE_PREFETCH", "0")
    return choice == "force" or (choice == "1" and os.path.exists(gpu_device))


def start(model_dir: Optional[str] = None, packages: Iterable[str] = PACKAGES, threads: int = 8) -> Optional[Prefetch]:
    """Prefetch the libraries, then the model, when `wanted`. Returns the
    running prefetcher (or None)."""
    if not wanted():
        return None
    p = Prefetch(threads=threads)

    def listing() -> None:  # walking the packages takes a while too: not on the main thread
        p.add(package_files(packages))
        p.add(model_files(model_dir))
        p.close()

    threading.Thread(target=listing, name="kubetune-prefetch-list", daemon=True).start()
    return p
