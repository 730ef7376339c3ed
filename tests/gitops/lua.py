"""The real Lua interpreter for the Argo CD health check's tests: found (or
installed with apt-get when missing and running as root), never skipped; and
JSON objects handed to it as Lua table literals, the way Argo CD hands a live
object to a health script. Also Argo CD's own Lua, gopher-lua, built from
gopherlua/ with the machine's Go."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

HARNESS = Path(__file__).resolve().parent / "harness.lua"
LUA = "lua5.4"
MISSING = (f"{LUA} is needed to run the Argo CD health check under a real Lua interpreter and was not found; "
           f"install it (apt-get install -y {LUA}; .ci/run does) and run the tests again")


def ensure_lua() -> str:
    """Path of lua5.4; installs the distribution's package when missing and running as root.
    Raises RuntimeError (the tests fail, never skip) when it cannot be had."""
    found = shutil.which(LUA)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(MISSING + " (not root, or no apt-get: cannot install it here)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", LUA]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    found = shutil.which(LUA)
    if not found:
        raise RuntimeError(f"{MISSING}\napt-get said:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return found


def lua_string(text: str) -> str:
    """A Lua string literal (Lua 5.1 to 5.4): control characters and every non-ASCII byte as \\ddd."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def to_lua(value: Any) -> str:
    """A JSON value as a Lua table literal, as Argo CD converts a live object for a health script:
    objects and arrays are tables (arrays 1-based), null is absent, and every number is a float
    (Argo CD's Lua has one number type, float64)."""
    if value is None:
        raise ValueError("null has no Lua value: leave the key out")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"JSON has no {value}")
        return repr(number)
    if isinstance(value, str):
        return lua_string(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua_string(k)}] = {to_lua(v)}" for k, v in value.items() if v is not None) + "}"
    if isinstance(value, list):
        return "{" + ", ".join(to_lua(v) for v in value) + "}"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def run(lua: str, script: Path | None, cases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> {"status", "message"} (or {"error"}) of `script` over each object; with script None,
    name -> {"object"}: each object as Lua saw it, back in JSON."""
    body = "return {\n" + "".join(f"  {{name = {lua_string(name)}, obj = {to_lua(obj)}}},\n"
                                  for name, obj in cases.items()) + "}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cases.lua"
        path.write_text(body)
        argv = [lua, str(HARNESS), "--echo" if script is None else str(script), str(path)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {result.returncode}):\n{result.stderr}")
    out = {}
    for line in result.stdout.splitlines():
        entry = json.loads(line)
        out[entry.pop("name")] = entry
    return out


GOPHERLUA = Path(__file__).resolve().parent / "gopherlua"


def build_gopherlua(go: str, out: Path) -> Path:
    """gopherlua/ built into `out` (its module from the Go module proxy on first use, then Go's caches)."""
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOWORK": "off", "GOFLAGS": "-mod=readonly"}
    argv = [go, "build", "-trimpath", "-buildvcs=false", "-o", str(out), "."]
    result = subprocess.run(argv, cwd=GOPHERLUA, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed in {GOPHERLUA} (exit {result.returncode}):\n{result.stderr}")
    return out


def run_gopherlua(binary: Path, script: Path, cases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> {"status", "message"} (or {"error"}) of `script` over each object, under gopher-lua."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cases.json"
        path.write_text(json.dumps([{"name": name, "obj": obj} for name, obj in cases.items()]))
        result = subprocess.run([str(binary), str(script), str(path)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{binary} failed (exit {result.returncode}):\n{result.stderr}")
    out = {}
    for line in result.stdout.splitlines():
        entry = json.loads(line)
        out[entry.pop("name")] = entry
    return out
