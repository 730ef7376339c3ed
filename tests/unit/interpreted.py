"""Run a check of a test module in Triton's interpreter (CPU): the interpreter
must be chosen before Triton is imported, so each check runs in a child
process as `python <module file> <check>` with TRITON_INTERPRET=1, and the
module's `__main__` block calls `check_<name>()`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_check(module_file: str, check: str) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, module_file, check], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"ok {check}" in done.stdout


def main(namespace: dict) -> None:
    """The `__main__` block of such a module."""
    name = sys.argv[1]
    assert os.environ.get("TRITON_INTERPRET") == "1"
    namespace[f"check_{name}"]()
    print(f"ok {name}")
