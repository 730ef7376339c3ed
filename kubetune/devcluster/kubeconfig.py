"""Pure builder of a kubeconfig that authenticates with a client certificate."""

from __future__ import annotations

from pathlib import Path

import yaml


def kubeconfig(server: str, ca_cert: Path, client_cert: Path, client_key: Path, name: str = "kubetune-dev") -> dict:
    """A one-cluster, one-user kubeconfig; paths are absolute so the file can move."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority": str(ca_cert.resolve())}}],
        "users": [
            {
                "name": name,
                "user": {
                    "client-certificate": str(client_cert.resolve()),
                    "client-key": str(client_key.resolve()),
                },
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }


def write_kubeconfig(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
