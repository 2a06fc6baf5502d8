"""Starting, waiting for and stopping the processes a benchmark runs beside the project."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress


def dev_env(**settings: str) -> dict[str, str]:
    """This process's environment without its ``MAILER_*`` settings, plus ``settings``, in
    development mode: the built-in signing key, since what a benchmark sends stays here."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    return {**clean, "MAILER_ENV": "dev", **settings}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_for(ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:g}s")
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """TERM the process group (a worker's pool children too), KILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue
