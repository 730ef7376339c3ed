"""The Gateway API's CRDs for the test control plane, from the Go module (sigs.k8s.io/gateway-api).

`go mod download` fetches the module into Go's module cache once (a normal Go client, the same proxy the
control plane's build uses) and names its folder; the standard channel's CRDs are applied from there.
No Gateway controller runs: the tests read the HTTPRoute the operator writes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from . import build, versions

MODULE = "sigs.k8s.io/gateway-api"
# The kinds an HTTPRoute needs (its parents and cross-namespace grants); the channel's admission policy and
# the experimental kinds are left out.
CRDS = ("gatewayclasses", "gateways", "httproutes", "referencegrants")


def crd_files(version: str = versions.GATEWAY_API) -> list[Path]:
    result = subprocess.run([build.find_go(), "mod", "download", "-json", f"{MODULE}@{version}"],
                            capture_output=True, text=True, env=build._go_env(), cwd="/")
    if result.returncode != 0:
        raise build.BuildError(f"go mod download {MODULE}@{version} failed: {result.stderr[-2000:]}")
    root = Path(json.loads(result.stdout)["Dir"]) / "config" / "crd" / "standard"
    return [root / f"gateway.networking.k8s.io_{name}.yaml" for name in CRDS]
