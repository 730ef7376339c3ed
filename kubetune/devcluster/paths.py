"""Where built binaries, Go wrapper modules and run directories live.

Everything is outside the repository, under one cache root:
`$KUBETUNE_CACHE`, else `$XDG_CACHE_HOME/kubetune`, else `~/.cache/kubetune`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("KUBETUNE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kubetune"


def bin_dir() -> Path:
    """Built binaries, named `<component>-<version>` (with a `.stamp` beside each)."""
    return cache_root() / "bin"


def gomod_dir() -> Path:
    """Generated Go wrapper modules, one per component and version."""
    return cache_root() / "gomod"


def run_root() -> Path:
    """Run directories of started control planes (certs, kubeconfigs, logs, etcd data).

    `$KUBETUNE_RUN_ROOT` moves them (and with them the `kubetune dev cluster`
    state) elsewhere while binaries stay shared.
    """
    explicit = os.environ.get("KUBETUNE_RUN_ROOT")
    return Path(explicit).expanduser() if explicit else cache_root() / "run"
