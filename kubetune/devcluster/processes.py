"""Starting, watching and stopping component processes.

Each component runs in its own session (process group), so stopping it also
stops anything it forked, and a Ctrl-C in the terminal (sent to the
foreground group) does not kill components before the harness can stop them
in order.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (held together, so no repeats)."""
    with ExitStack() as stack:
        sockets = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent dies, even by SIGKILL.

    Test runs start components in their own sessions (so Ctrl-C reaches the
    harness first); this makes sure a killed test run leaves nothing behind.
    SIGKILL, not SIGTERM: all components would get it at once, etcd would exit
    first and kube-apiserver's graceful shutdown would hang waiting for it;
    a test cluster's data is thrown away anyway.
    """
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(argv: list[str], log_path: Path, die_with_parent: bool = True) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )


def is_alive(pid: int) -> bool:
    """Whether any thread of process `pid` still runs.

    A zombie counts as dead, but only once every thread is gone: the leader of a
    multi-threaded Go program turns zombie while its other threads still exit,
    and its listening sockets close only after the last one.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return True
        except OSError:
            continue
    return False


def stop_group(pid: int, grace_seconds: float = 10.0) -> None:
    """SIGTERM the process group led by `pid`, then SIGKILL it if it outlives the
    grace period; a grace period of 0 kills at once, as a crash would."""
    try:
        os.killpg(pid, signal.SIGTERM if grace_seconds > 0 else signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while is_alive(pid):
        _reap(pid)
        time.sleep(0.05)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError as error:
        return f"<no log: {error}>"
    return "\n".join(text.splitlines()[-lines:])


def http_ok(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, context=context, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def wait_until(
    what: str, check: Callable[[], bool], timeout: float, alive: Callable[[], str | None], interval: float = 0.1
) -> None:
    """Poll `check` until it is true; fail early when `alive` reports a dead process."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        dead = alive()
        if dead:
            raise RuntimeError(f"{dead} exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
