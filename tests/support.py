"""Helpers shared by the tests: free ports, timeouts, real server processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = ["ServerProcess", "free_port", "scaled", "start_server"]

TIMEOUT_SCALE = float(os.environ.get("HERALD_TEST_TIMEOUT_SCALE", "1"))
"""Multiplies every timeout in the tests; raise it on a slow machine."""


def scaled(seconds: float) -> float:
    """A timeout scaled by ``HERALD_TEST_TIMEOUT_SCALE``."""
    return seconds * TIMEOUT_SCALE


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """A ``herald serve`` subprocess and how to reach it."""

    proc: subprocess.Popen[bytes]
    port: int
    key: str
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Base HTTP URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """The WebSocket endpoint."""
        return f"ws://127.0.0.1:{self.port}/v1/connect"

    @property
    def headers(self) -> dict[str, str]:
        """Headers carrying the admin key."""
        return {"Authorization": f"Bearer {self.key}"}

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the process and wait for it; kill it if it lingers. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(scaled(timeout))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    tmp_path: Path,
    *extra: str,
    key: str = "test-admin-key-0123456789",
    env: Mapping[str, str] | None = None,
    wait: bool = True,
) -> ServerProcess:
    """Start ``python -m herald serve`` on a free port and wait until /healthz answers."""
    port = free_port()
    log_path = tmp_path / f"herald-{port}.log"
    environ = {**os.environ, "HERALD_ADMIN_KEY": key, **(env or {})}
    args = [
        sys.executable,
        "-m",
        "herald",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=environ)
    server = ServerProcess(proc, port, key, log_path, args)
    if wait:
        deadline = time.monotonic() + scaled(20)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"herald exited with {proc.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                server.stop(signal.SIGKILL)
                raise RuntimeError(f"herald did not become healthy:\n{server.log()}")
            time.sleep(0.05)
    return server
