"""Run the scoring service as a child process on loopback: start, wait until ready, stop.

Used by ``riskscore demo``, the server tests and the benchmarks (``riskscore serve`` runs in the foreground).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SERVICE = "serving.service:RiskScore"


class ServerStartError(RuntimeError):
    """The server exited or was not ready in time; the message ends with the tail of its log."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> str | None:
    """Why the server could not bind ``host:port`` (in use, no such address), or None when it can.

    Checked before starting BentoML, whose own bind error is a long traceback; another process may still take the
    port in between, and then that error stands.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        return f"cannot bind {host}:{port}: {err.strerror}"
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is not "in use"
        try:
            sock.bind(address)
        except OSError as err:
            return f"cannot bind {host}:{port}: {err.strerror}; choose another --port"
    return None


def launch(env: dict[str, str], log: Path, port: int, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``bentoml serve serving.service:RiskScore`` on 127.0.0.1:``port``, output appended to ``log``."""
    with Path(log).open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``/readyz`` until 200 (bounded by ``timeout`` seconds); raise :class:`ServerStartError` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerStartError(f"server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ServerStartError(f"server not ready after {timeout:.0f}s:\n{_tail(log)}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _tail(log: Path, chars: int = 4000) -> str:
    try:
        return Path(log).read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"
