"""The cached environment with the real `vllm` package at the pinned version, on CPU.

`ensure()` builds it once per lock (a venv under ~/.cache/kubetune, keyed by the
lock's hash) and returns its python. The lock (vllm-env.lock beside this file) is
what a resolver picks for `kubetune.contract.vllm.PACKAGE`: the full dependency
set of that release, CUDA torch included (its import needs the CUDA libraries;
no GPU is used: VLLM_TARGET_DEVICE=cpu). Regenerate it after a bump with

    .venv/bin/python tests/vllm/env.py lock

Measured on the 2-core CI machine (2026-12): a cold build (empty uv cache,
empty env dir) took 1 min 49 s and 60 s in two runs and 8.9 GB on disk
(a uv cache of 146 MB beside it: uv moves the wheels' files into the env);
importing vLLM in it takes 40-100 s, so the tests run everything in one driver
process per module (tests/vllm: 26 tests in 64-90 s once the env exists).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCK = HERE / "vllm-env.lock"
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"


def _contract():
    sys.path.insert(0, str(HERE.parents[1]))
    from kubetune.contract import vllm

    return vllm


def cache_root() -> Path:
    return Path(os.environ.get("KUBETUNE_VLLM_ENV_DIR") or Path.home() / ".cache" / "kubetune")


def env_dir() -> Path:
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]
    return cache_root() / f"vllm-{_contract().VERSION}-{digest}"


def _uv() -> list[str]:
    """uv as scripts/bootstrap.sh installs it (pip's `uv` package: a binary on PATH, or `python3 -m uv`)."""
    uv = shutil.which("uv")
    if uv is not None:
        return [uv]
    for python in ("python3", _base_python()):
        if subprocess.run([python, "-m", "uv", "--version"], capture_output=True).returncode == 0:
            return [python, "-m", "uv"]
    raise RuntimeError("uv is not installed (scripts/bootstrap.sh installs it)")


def _base_python() -> str:
    # The interpreter the project's venv was made from (the lock is resolved for its minor version).
    return os.environ.get("KUBETUNE_PYTHON") or shutil.which(f"python{PYTHON_VERSION}") or "python3"


def ensure() -> Path:
    """The env's python, building the env first if this lock has none yet."""
    target = env_dir()
    python = target / "bin" / "python"
    if (target / ".complete").exists():
        return python
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a second test process waits for the first build
        if (target / ".complete").exists():
            return python
        shutil.rmtree(target, ignore_errors=True)
        started = time.monotonic()
        subprocess.run([*_uv(), "venv", "-q", "--python", _base_python(), str(target)], check=True)
        # --no-deps: the lock is the whole resolution; nothing else is looked up.
        subprocess.run([*_uv(), "pip", "install", "-q", "--no-deps", "--python", str(python), "-r", str(LOCK)],
                       check=True)
        (target / ".complete").write_text(f"built in {time.monotonic() - started:.0f}s\n")
    return python


def lock() -> None:
    """Regenerate vllm-env.lock from the pinned package."""
    request = HERE / "vllm-env.in"
    request.write_text(_contract().PACKAGE + "\n")
    try:
        subprocess.run([*_uv(), "pip", "compile", "-q", str(request), "--python-version", PYTHON_VERSION,
                        "--python-platform", PLATFORM, "--no-header", "-o", str(LOCK)], check=True)
    finally:
        request.unlink()
    body = LOCK.read_text()
    LOCK.write_text(f"# vLLM {_contract().VERSION} and what a resolver picks for it (python {PYTHON_VERSION}, "
                    f"{PLATFORM}).\n# Generated: .venv/bin/python tests/vllm/env.py lock\n" + body)


if __name__ == "__main__":
    if sys.argv[1:] == ["lock"]:
        lock()
    elif sys.argv[1:] == ["ensure"]:
        print(ensure())
    else:
        sys.exit("usage: env.py lock|ensure")
