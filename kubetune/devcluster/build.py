"""Build the control-plane binaries with the machine's Go, once per version.

A binary is reused when `<bin_dir>/<name>-<version>` exists and its `.stamp`
names the same version and Go wrapper module; otherwise the wrapper module is
generated (see gomodules), `go mod tidy` resolves it and `go build` writes the
binary to a temporary name that is renamed into place, so an interrupted build
never leaves a binary that looks finished. A file lock keeps test runs started
at the same time from building the same thing twice.

Add-ons (Kueue) are built the same way but only when something asks for them
(`ensure_built(wanted=[KUEUE])`): a unit-test run never pays for them. An
add-on's install manifests (CRDs, webhook configurations, RBAC) are copied
from its module source into `<bin_dir>/<name>-<version>.assets/` beside the
binary, before the stamp is written, so a cached add-on needs neither Go nor
the Go module cache to be installed again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kubetune.devcluster import gomodules, paths, versions


class GoMissingError(RuntimeError):
    """Raised when a binary must be built and no Go toolchain is on PATH."""


class BuildError(RuntimeError):
    """A `go` command failed; the message has the command and its stderr."""


GO_MISSING_MESSAGE = (
    "The test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok) "
    "is built from Go modules on first use, and no `go` command was found. Install Go >= 1.26 "
    "(the official linux-amd64 tarball unpacked to /usr/local/go) and put /usr/local/go/bin on PATH, "
    "or point KUBETUNE_GO at the go binary. Built binaries are cached under {bin_dir}."
)


@dataclass(frozen=True)
class Target:
    """A binary and the Go wrapper module that builds it."""

    name: str
    version: str
    family: str  # names the wrapper module; targets of one family build together
    module: str  # the upstream module the wrapper requires
    package: str  # the main package to build
    # Folders of the module source copied beside the binary (install manifests).
    assets: tuple[str, ...] = ()

    @property
    def module_dir_name(self) -> str:
        return f"{self.family}-{self.version}"


def targets() -> list[Target]:
    k8s = [
        Target(cmd, versions.KUBERNETES, "kubernetes", "k8s.io/kubernetes", f"k8s.io/kubernetes/cmd/{cmd}")
        for cmd in versions.KUBERNETES_COMMANDS
    ]
    return [
        Target("etcd", versions.ETCD, "etcd", "go.etcd.io/etcd/server/v3", "go.etcd.io/etcd/server/v3"),
        Target("kwok", versions.KWOK, "kwok", "sigs.k8s.io/kwok", "sigs.k8s.io/kwok/cmd/kwok"),
        *k8s,
    ]


# Kueue's controller manager. A cold build (empty Go build cache, modules partly
# downloaded) measured 562 CPU-seconds and 1.8 GB peak memory: about 4.5 min
# on the idle 2-core machine, 12 min 39 s while other builds and tests ran on
# it. So it is built only for runs that start Kueue, and then cached.
KUEUE = Target(
    "kueue", versions.KUEUE, "kueue", "sigs.k8s.io/kueue", "sigs.k8s.io/kueue/cmd/kueue",
    assets=("config/components/crd/bases", "config/components/webhook", "config/components/rbac"),
)


# Helm, for the chart's tests (`helm lint`, `helm template`, `helm install` into the
# test control plane); built only for runs that ask for it, then cached.
HELM = Target("helm", versions.HELM, "helm", "helm.sh/helm/v3", "helm.sh/helm/v3/cmd/helm")


def _unpublished(go: str, modules: list[str], version: str, log: Callable[[str], None]) -> frozenset[str]:
    """The modules among `modules` that the module proxy cannot serve at `version`."""
    result = subprocess.run(
        [go, "mod", "download", "-json", *(f"{m}@{version}" for m in modules)],
        cwd=paths.gomod_dir(), env=_go_env(), capture_output=True, text=True,
    )
    missing = frozenset(info["Path"] for info in _json_stream(result.stdout) if info.get("Error"))
    if missing:
        log(f"not on the module proxy, replaced by empty stubs: {', '.join(sorted(missing))}")
    return missing


def _json_stream(text: str) -> list[dict]:
    decoder, index, found = json.JSONDecoder(), 0, []
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return found
        value, index = decoder.raw_decode(text, index)
        found.append(value)


def _wrapper_gomod(go: str, target: Target, upstream_gomod: str, directory: Path, log: Callable[[str], None]) -> str:
    if target.family == "kubernetes":
        staging = gomodules.staging_modules(upstream_gomod)
        unpublished = _unpublished(go, staging, versions.staging_version(target.version), log)
        for module in unpublished:
            stub = directory / gomodules.stub_dir(module)
            stub.mkdir(parents=True, exist_ok=True)
            (stub / "go.mod").write_text(gomodules.stub_gomod(module))
        return gomodules.kubernetes_wrapper(target.version, upstream_gomod, versions.KUBERNETES_COMMANDS, unpublished)
    if target.family == "etcd":
        return gomodules.etcd_wrapper(target.version, upstream_gomod)
    return gomodules.plain_wrapper(target.family, target.module, target.version, upstream_gomod, target.package)


def binary_path(target: Target) -> Path:
    return paths.bin_dir() / f"{target.name}-{target.version}"


def _stamp_path(target: Target) -> Path:
    return binary_path(target).with_name(binary_path(target).name + ".stamp")


def assets_path(target: Target) -> Path:
    """Where `target.assets` were copied (same relative paths as in the module)."""
    return binary_path(target).with_name(binary_path(target).name + ".assets")


def version_ldflags(target: Target) -> list[str]:
    """Linker flags that stamp the release into the binary.

    A plain `go build` of k8s.io/kubernetes reports `v0.0.0-master+$Format:%H$`:
    kubectl then refuses to parse the server version and tools that check
    `kubeVersion` (Helm charts) fail. The variables are the ones
    hack/lib/version.sh sets for release builds.
    """
    if target.family == "kueue":
        # Kueue logs it at start-up ("Initializing", gitVersion); its Makefile sets the same variable.
        return [f"-X 'sigs.k8s.io/kueue/pkg/version.GitVersion={target.version}'"]
    if target.family == "helm":
        # What helm's Makefile sets for a release: the version (else `v3.22` plus no
        # patch), and the Kubernetes version that `helm template` and `helm lint`
        # assume without a cluster (else 1.20, and a chart's `kubeVersion: >=1.30`
        # fails). Helm's release takes it from its client-go; here it is the
        # Kubernetes the harness runs, so offline rendering sees the tested server.
        major, minor = versions.KUBERNETES.lstrip("v").split(".")[:2]
        return [f"-X 'helm.sh/helm/v3/internal/version.version={target.version}'",
                "-X 'helm.sh/helm/v3/internal/version.gitTreeState=clean'",
                *(f"-X 'helm.sh/helm/v3/pkg/{package}.k8sVersion{key}={value}'"
                  for package in ("chartutil", "lint/rules") for key, value in (("Major", major), ("Minor", minor)))]
    if target.family != "kubernetes":
        return []
    major, minor = target.version.lstrip("v").split(".")[:2]
    values = {"gitVersion": target.version, "gitMajor": major, "gitMinor": minor,
              "gitTreeState": "clean", "gitCommit": "", "buildDate": "1970-01-01T00:00:00Z"}
    return [
        f"-X '{package}.{key}={value}'"
        for package in ("k8s.io/client-go/pkg/version", "k8s.io/component-base/version")
        for key, value in values.items()
    ]


def _ldflags(target: Target) -> str:
    # -s -w: no symbol table or DWARF; the link step is the slow part of a rebuild.
    return " ".join(["-s", "-w", *version_ldflags(target)])


def _stamp(target: Target) -> dict:
    stamp = {
        "name": target.name, "version": target.version, "module": target.module,
        "package": target.package, "ldflags": _ldflags(target),
    }
    if target.assets:
        stamp["assets"] = list(target.assets)
    return stamp


def is_built(target: Target) -> bool:
    try:
        stamp = json.loads(_stamp_path(target).read_text())
    except (OSError, ValueError):
        return False
    assets_ok = not target.assets or all((assets_path(target) / a).is_dir() for a in target.assets)
    return binary_path(target).is_file() and stamp == _stamp(target) and assets_ok


def find_go() -> str:
    go = os.environ.get("KUBETUNE_GO") or shutil.which("go")
    if not go:
        raise GoMissingError(GO_MISSING_MESSAGE.format(bin_dir=paths.bin_dir()))
    return go


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # -trimpath and no VCS stamping keep builds reproducible and the link step short.
    env["GOFLAGS"] = " ".join(filter(None, [env.get("GOFLAGS", ""), "-trimpath", "-buildvcs=false"]))
    # The wrapper's `go` line must be honoured by the Go on this machine, not a downloaded toolchain.
    env.setdefault("GOTOOLCHAIN", "local")
    return env


def _run(argv: list[str], cwd: Path) -> str:
    # nice: the build shares the machine with whatever else runs (tests, editors).
    result = subprocess.run(["nice", "-n", "10", *argv], cwd=cwd, env=_go_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(
            f"`{' '.join(argv)}` failed in {cwd} (exit {result.returncode}); the control plane needs "
            f"Go >= 1.26 and access to the Go module proxy for its first build:\n{result.stderr[-4000:]}"
        )
    return result.stdout


@contextmanager
def _build_lock():
    paths.cache_root().mkdir(parents=True, exist_ok=True)
    with open(paths.cache_root() / "build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare_module(go: str, target: Target, log: Callable[[str], None]) -> tuple[Path, Path]:
    """Write the wrapper module for `target` (if its go.mod changed) and resolve it.

    Returns the wrapper directory and the upstream module's source directory
    (in the Go module cache)."""
    directory = paths.gomod_dir() / target.module_dir_name
    directory.mkdir(parents=True, exist_ok=True)
    # Run from outside any module, so that nothing around the caller's cwd interferes.
    info = json.loads(_run([go, "mod", "download", "-json", f"{target.module}@{target.version}"], paths.gomod_dir()))
    source = Path(info["Dir"])
    gomod = _wrapper_gomod(go, target, Path(info["GoMod"]).read_text(), directory, log)
    digest = hashlib.sha256(gomod.encode()).hexdigest()
    marker = directory / ".tidy"
    if (directory / "go.mod").is_file() and marker.is_file() and marker.read_text() == digest:
        return directory, source
    (directory / "go.mod").write_text(gomod)
    log(f"resolving Go module {target.module}@{target.version} in {directory}")
    _run([go, "mod", "tidy"], directory)
    marker.write_text(digest)
    return directory, source


def _copy_assets(target: Target, source: Path) -> None:
    """Copy `target.assets` from the module source (read-only in the module cache)."""
    destination = assets_path(target)
    shutil.rmtree(destination, ignore_errors=True)
    staging = destination.with_name(destination.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for relative in target.assets:
        # copyfile, not copy2: files in the module cache are read-only, copies need not be.
        shutil.copytree(source / relative, staging / relative, copy_function=shutil.copyfile)
    os.replace(staging, destination)


def ensure_built(
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr), wanted: list[Target] | None = None
) -> dict[str, Path]:
    """Component name -> binary path, building what is missing.

    `wanted` defaults to the control plane (`targets()`); add-ons such as
    `KUEUE` are built only when named."""
    wanted = targets() if wanted is None else wanted
    missing = [t for t in wanted if not is_built(t)]
    if missing:
        go = find_go()
        with _build_lock():
            # Another process may have built them while this one waited for the lock.
            missing = [t for t in missing if not is_built(t)]
            _build(go, missing, log)
    return {t.name: binary_path(t) for t in wanted}


def _build(go: str, missing: list[Target], log: Callable[[str], None]) -> None:
    # Targets of one wrapper module build in one `go build` so shared packages compile once.
    by_module: dict[str, list[Target]] = {}
    for target in missing:
        by_module.setdefault(target.module_dir_name, []).append(target)
    paths.bin_dir().mkdir(parents=True, exist_ok=True)
    for group in by_module.values():
        directory, source = _prepare_module(go, group[0], log)
        out = directory / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        started = time.monotonic()
        log(f"building {', '.join(t.name + ' ' + t.version for t in group)} (only when missing or out of date; a cold build takes minutes)")
        argv = [go, "build", f"-ldflags={_ldflags(group[0])}", "-o"]
        argv += [str(out / group[0].name), group[0].package] if len(group) == 1 else [str(out) + "/", *(t.package for t in group)]
        _run(argv, directory)
        for target in group:
            built = out / target.package.rstrip("/").split("/")[-1] if len(group) > 1 else out / target.name
            os.replace(built, binary_path(target))
            if target.assets:
                _copy_assets(target, source)
            _stamp_path(target).write_text(json.dumps(_stamp(target)))
        log(f"built {', '.join(t.name for t in group)} in {time.monotonic() - started:.0f}s")
