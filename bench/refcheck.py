"""Smoke check of the reference servers (bench/ref_websockets.py, ref_starlette.py, ref_floor.py).

For each server: start a throwaway ``redis-server`` (no persistence) and the
server on free ports of 127.0.0.1, connect three clients with the
``websockets`` client library (subprotocol ``herald.json``), ``connect``,
``subscribe`` (all three at once, so two of them join a channel whose Redis
``SUBSCRIBE`` is still in flight) and ``ping``; PUBLISH 100 messages with
redis-py, and check that every client got all 100, in order, unchanged, and
that each PUBLISH reached exactly one Redis subscriber (the server's one
reference-counted subscription). Then close the clients, check that the
server UNSUBSCRIBEs, stop it with SIGTERM and check that it exits 0.

Prints ``refcheck: ok`` and exits 0 when everything holds; exits 1 otherwise
(with the server's output).

Usage: python bench/refcheck.py
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

HOST = "127.0.0.1"
BENCH = Path(__file__).resolve().parent
SERVERS = ["ref_websockets.py", "ref_starlette.py", "ref_floor.py"]
CLIENTS = 3
MESSAGES = 100
CHANNEL = "refcheck"
SUBPROTOCOL = Subprotocol("herald.json")
TIMEOUT = 10.0


class CheckFailed(Exception):
    """A check did not hold."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(proc: subprocess.Popen[bytes], port: int, what: str) -> None:
    """Wait until something accepts TCP connections on ``port``, or fail."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            pass
        if proc.poll() is not None:
            raise CheckFailed(f"{what} exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what} not listening after {TIMEOUT:.0f} s")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL if it lingers; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


async def request(ws: ClientConnection, frame: dict[str, Any]) -> dict[str, Any]:
    """Send a request frame and return the decoded answer."""
    await ws.send(json.dumps(frame))
    async with asyncio.timeout(TIMEOUT):
        answer: dict[str, Any] = json.loads(await ws.recv())
    return answer


async def open_subscriber(port: int, index: int) -> ClientConnection:
    """Connect, upgrade with ``herald.json``, ``connect``, ``subscribe``, ``ping``."""
    ws = await connect(
        f"ws://{HOST}:{port}/v1/connect",
        subprotocols=[SUBPROTOCOL],
        compression=None,
        open_timeout=TIMEOUT,
    )
    expected = [
        ({"op": "connect", "id": 1, "key": "unused"}, {"op": "connected", "id": 1}),
        (
            {"op": "subscribe", "id": 2, "channel": CHANNEL},
            {"op": "subscribed", "id": 2, "channel": CHANNEL},
        ),
        ({"op": "ping", "id": 3}, {"op": "pong", "id": 3}),
    ]
    if ws.subprotocol != SUBPROTOCOL:
        raise CheckFailed(f"client {index}: subprotocol {ws.subprotocol!r}")
    for frame, answer in expected:
        got = await request(ws, frame)
        if got != answer:
            raise CheckFailed(f"client {index}: {frame} answered {got}, expected {answer}")
    return ws


async def receive_all(ws: ClientConnection, expected: list[str], index: int) -> None:
    """Every expected frame, in order, unchanged."""
    for n, want in enumerate(expected):
        async with asyncio.timeout(TIMEOUT):
            got = await ws.recv()
        if got != want:
            raise CheckFailed(f"client {index}: message {n} was {got!r}, expected {want!r}")


async def numsub(redis: Redis) -> int:
    """Redis subscribers of the channel (the server's subscription, if any)."""
    reply = await redis.pubsub_numsub(CHANNEL)
    return int(reply[0][1])


async def exercise(port: int, redis_url: str) -> None:
    """Subscribe three clients, publish, check deliveries, unsubscribe."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    clients: list[ClientConnection] = []
    try:
        clients = list(await asyncio.gather(*(open_subscriber(port, i) for i in range(CLIENTS))))
        if (count := await numsub(redis)) != 1:
            raise CheckFailed(f"{count} Redis subscriptions to the channel, expected 1")
        messages = [
            json.dumps(
                {"op": "message", "channel": CHANNEL, "id": f"{i + 1}-0", "payload": f"m{i:04d}"},
                separators=(",", ":"),
            )
            for i in range(MESSAGES)
        ]
        receivers = [
            asyncio.create_task(receive_all(ws, messages, i)) for i, ws in enumerate(clients)
        ]
        for message in messages:
            if (reached := await redis.publish(CHANNEL, message)) != 1:
                raise CheckFailed(f"PUBLISH reached {reached} Redis subscribers, expected 1")
        await asyncio.gather(*receivers)
        for ws in clients:
            await ws.close()
        deadline = time.monotonic() + TIMEOUT
        while (count := await numsub(redis)) != 0:
            if time.monotonic() > deadline:
                raise CheckFailed(f"still {count} Redis subscriptions after every client left")
            await asyncio.sleep(0.05)
    finally:
        for ws in clients:
            await ws.close()
        await redis.aclose()


def check_server(script: str, redis_url: str, log: IO[bytes]) -> None:
    """Run one reference server through `exercise` and stop it; it must exit 0."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / script), "--port", str(port), "--redis", redis_url],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_listening(proc, port, script)
        asyncio.run(exercise(port, redis_url))
    finally:
        code = stop(proc)
    if code != 0:
        raise CheckFailed(f"{script} exited with {code} on SIGTERM")


def main() -> int:
    """Check every reference server against one throwaway redis-server."""
    redis_port = free_port()
    redis_proc = subprocess.Popen(
        [
            "redis-server",
            *("--port", str(redis_port), "--bind", HOST),
            *("--save", "", "--appendonly", "no"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    redis_url = f"redis://{HOST}:{redis_port}/0"
    try:
        wait_listening(redis_proc, redis_port, "redis-server")
        for script in SERVERS:
            with tempfile.TemporaryFile() as log:
                try:
                    check_server(script, redis_url, log)
                except Exception as exc:
                    log.seek(0)
                    output = log.read().decode(errors="replace").strip()
                    print(f"refcheck: {script}: FAILED: {exc!r}", file=sys.stderr)
                    if output:
                        print(f"--- {script} output ---\n{output}", file=sys.stderr)
                    return 1
            print(f"refcheck: {script}: {CLIENTS} clients x {MESSAGES} messages, in order")
    finally:
        stop(redis_proc)
    print("refcheck: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
