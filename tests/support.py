"""Helpers shared by the tests: free ports, timeouts, real server processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = [
    "RedisProcess",
    "ServerProcess",
    "free_port",
    "redis_cli",
    "scaled",
    "start_redis",
    "start_server",
    "wait_until",
]

TIMEOUT_SCALE = float(os.environ.get("HERALD_TEST_TIMEOUT_SCALE", "1"))
"""Multiplies every timeout in the tests; raise it on a slow machine."""


def scaled(seconds: float) -> float:
    """A timeout scaled by ``HERALD_TEST_TIMEOUT_SCALE``."""
    return seconds * TIMEOUT_SCALE


async def wait_until(
    check: Callable[[], Awaitable[bool]], seconds: float = 10.0, interval: float = 0.05
) -> None:
    """Poll ``check`` until it is true; for states a server reports but does not announce."""
    async with asyncio.timeout(scaled(seconds)):
        while True:
            if await check():
                return
            await asyncio.sleep(interval)


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


async def redis_cli(port: int, *args: str) -> str:
    """Run one ``redis-cli`` command against the server on ``port``; its output.

    redis-cli prints an error reply (``MOVED ...``, ``ERR ...``) and exits 0, so
    such replies come back as output; a failure to run or connect raises.
    """
    proc = await asyncio.create_subprocess_exec(
        "redis-cli",
        "-p",
        str(port),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"redis-cli -p {port} {' '.join(args)} failed: {out!r}")
    return out.decode(errors="replace")


@dataclass
class RedisProcess:
    """A ``redis-server`` the tests started on a free port; it can be killed and restarted."""

    port: int
    directory: Path
    appendonly: bool = False
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://`` URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        """Start (or restart) the server on the same port and wait until it answers PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: run scripts/test.sh, which installs it"
            )
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--protected-mode",
            "no",
        ]
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + scaled(10)
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    async def cli(self, *args: str) -> str:
        """Run one ``redis-cli`` command against this server; its output."""
        return await redis_cli(self.port, *args)

    def kill(self) -> None:
        """SIGKILL the server (a crash, as far as clients can tell) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """Stop the server by PID (SIGTERM, then SIGKILL if it lingers)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(scaled(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_redis(directory: Path, *, appendonly: bool = False) -> RedisProcess:
    """A fresh ``redis-server`` on a free port, storing its files in ``directory``."""
    return RedisProcess(free_port(), directory, appendonly).start()
