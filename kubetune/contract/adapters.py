"""Which adapters a shared adapter server carries: read the same way by the operator (which sizes the
server) and by the server's loader sidecar (which loads them), from the AdapterServer object alone.

An entry of `spec.adapters` counts while its job owns the server. A deleted job's owner reference is
removed by the garbage collector at once; its entry stays until the operator prunes it, and must not be
served meanwhile. Pure: dicts in, dicts out.
"""

from __future__ import annotations

from typing import Any

from .facts import KIND


def owners(server: dict[str, Any]) -> dict[str, str]:
    """FineTuneJobs owning the server: name -> uid."""
    return {r["name"]: r.get("uid", "") for r in (server.get("metadata") or {}).get("ownerReferences") or []
            if r.get("kind") == KIND}


def live_adapters(server: dict[str, Any]) -> list[dict[str, Any]]:
    """Entries of jobs that still own the server, in spec order."""
    alive = owners(server)
    return [a for a in (server.get("spec") or {}).get("adapters") or [] if a.get("job") in alive]


def stale_entries(server: dict[str, Any]) -> list[int]:
    """Indexes of entries whose job no longer owns the server."""
    alive = owners(server)
    return [i for i, a in enumerate((server.get("spec") or {}).get("adapters") or []) if a.get("job") not in alive]
