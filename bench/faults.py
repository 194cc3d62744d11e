"""Faults under load: nothing acknowledged is lost for clients that reconnect with ``since``.

Starts its own ``redis-server`` (append-only file, fsync always) and a
two-worker Herald, holds many subscriber connections, publishes continuously
over HTTP, and injects faults while it runs: Redis killed and restarted on
its AOF, one worker killed with SIGKILL, slow clients that stop reading for a
while, and fuzz connections sending bad frames and bytes. Every subscriber
that loses its socket reconnects with ``since`` (the last id it saw) and the
channel's ``epoch``. At the end every subscriber's messages are compared with
what the server acknowledged (``201``) and with the channel's history, and one
table is printed. Exit status 1 when any acknowledged message never reached a
subscriber (a loss), one reached it twice (a duplicate) or out of order.

Usage: python bench/faults.py [--clients 1000] [--seconds 45] [--rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import hashlib
import itertools
import os
import random
import secrets
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import uvloop

if __package__ in (None, ""):
    # Run as a script (python bench/faults.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.httpload import HttpConnection, build_request, fetch
from bench.httpload import connect as http_connect
from bench.loadgen import SUBPROTOCOL, client_frame
from bench.procs import (
    HOST,
    LOADGEN_CPU,
    RESULTS,
    Proc,
    can_pin,
    free_port,
    log_problems,
    raise_nofile,
    spawn,
    wait_port,
    worker_pids,
)

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA
SLOW_CHANNEL = "faults-slow"


# Processes -------------------------------------------------------------------------------


@dataclass
class Redis:
    """A ``redis-server`` with an append-only file that can be killed and started again."""

    port: int
    directory: Path
    log_path: Path
    pin: bool
    proc: Proc | None = None

    @property
    def url(self) -> str:
        """``redis://`` URL of database 0."""
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        """Start (or restart, on the same port and files) and wait until it answers PING."""
        command = ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", ""]
        command += ["--dir", str(self.directory), "--appendonly", "yes"]
        command += ["--appendfsync", "always", "--maxclients", "20000"]
        self.proc = spawn("redis-server", command, self.log_path, self.pin)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    # While it loads the AOF Redis answers -LOADING, not +PONG.
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or not self.proc.alive():
                raise RuntimeError(f"redis-server did not start; see {self.log_path}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: a crash, as far as Herald can tell."""
        if self.proc is not None and self.proc.alive():
            self.proc.popen.kill()
            self.proc.popen.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc is not None:
            self.proc.stop()


def start_herald(port: int, key: str, redis_url: str, log_path: Path, pin: bool) -> Proc:
    """``herald serve --redis URL --workers 2`` on ``port`` with admin key ``key``."""
    env = {**os.environ, "HERALD_ADMIN_KEY": key}
    command = [sys.executable, "-m", "herald", "serve", "--host", HOST, "--port", str(port)]
    command += ["--redis", redis_url, "--workers", "2"]
    return spawn("herald", command, log_path, pin, env)


# The counters of one run ----------------------------------------------------------------


@dataclass
class Stats:
    """Everything the table reports (one event loop, no locking)."""

    acked: dict[str, list[str]] = field(default_factory=dict)
    """Channel -> ids answered 201, in the order the answers came."""
    publish_failed: dict[str, int] = field(default_factory=dict)
    """Why publishes were not acknowledged (status or connection error) -> count."""
    faults: dict[str, int] = field(default_factory=dict)
    fuzz_unexpected: list[str] = field(default_factory=list)
    fuzz_skipped: int = 0
    """Fuzz connections whose ``connect`` was answered ``unavailable`` (Redis down)."""
    reconnects: int = 0
    failed_connects: int = 0
    recovered_false: int = 0
    closes: dict[str, int] = field(default_factory=dict)
    """How subscriber connections ended: close code, ``reset`` or ``eof`` -> count."""
    min_open: int = -1
    errors: list[str] = field(default_factory=list)

    def fault(self, kind: str, count: int = 1) -> None:
        """Count an injected fault."""
        self.faults[kind] = self.faults.get(kind, 0) + count

    def error(self, text: str) -> None:
        """Keep the first few unexpected things a client saw."""
        if len(self.errors) < 20:
            self.errors.append(text)


# A WebSocket link that hands whole frames to its owner --------------------------------


class Link(asyncio.Protocol):
    """A herald.json client connection: the upgrade, then the server's frames one by one.

    Frames are parsed from the raw bytes (server frames are unmasked and, from
    Herald, never fragmented); client frames are masked with `client_frame`.
    """

    def __init__(
        self,
        port: int,
        on_frame: Callable[[int, bytes], None],
        on_lost: Callable[[str], None],
    ) -> None:
        loop = asyncio.get_running_loop()
        self.port = port
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = loop.create_future()
        self.close_code = ""
        self.lost = False
        self._key = base64.b64encode(os.urandom(16))
        self._buffer = bytearray()
        self._upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the upgrade request."""
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(
            b"GET /v1/connect HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Protocol: %s\r\n\r\n"
            % (HOST.encode(), self.port, self._key, SUBPROTOCOL.encode())
        )

    def data_received(self, data: bytes) -> None:
        """Check the ``101``, then cut the stream into frames."""
        buffer = self._buffer
        buffer += data
        if not self._upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest())
            if not head.startswith(b"HTTP/1.1 101") or accept not in head:
                self._fail(f"upgrade refused: {head[:100]!r}")
                return
            self._upgraded = True
            self.opened.set_result(None)
        while len(buffer) >= 2:
            length = buffer[1] & 0x7F
            start = 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, start = struct.unpack_from("!H", buffer, 2)[0], 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, start = struct.unpack_from("!Q", buffer, 2)[0], 10
            end = start + length
            if len(buffer) < end:
                return
            opcode = buffer[0] & 0x0F
            payload = bytes(buffer[start:end])
            del buffer[:end]
            if opcode == _OP_PING:
                self.write(_OP_PONG, payload)
            elif opcode == _OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.close_code = str(code)
                self.write(_OP_CLOSE, payload[:2])
                if self.transport is not None:
                    self.transport.close()
                return
            elif opcode != _OP_PONG:
                self.on_frame(opcode, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        """Tell the owner why the link ended."""
        self.lost = True
        reason = self.close_code or ("eof" if exc is None else "reset")
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before the upgrade ({reason})"))
        self.on_lost(reason)

    def _fail(self, text: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(text))
        self.abort()

    def write(self, opcode: int, payload: bytes) -> None:
        """Send one masked frame."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(payload, opcode))

    def send(self, *frames: dict[str, Any]) -> None:
        """Send JSON frames."""
        for frame in frames:
            self.write(_OP_TEXT, orjson.dumps(frame))

    def abort(self) -> None:
        """Drop the TCP link at once."""
        if self.transport is not None:
            self.transport.abort()


async def open_link(
    port: int,
    on_frame: Callable[[int, bytes], None],
    on_lost: Callable[[str], None],
    rcvbuf: int = 0,
    mss: int = 0,
) -> Link:
    """Connect and upgrade; ``rcvbuf`` > 0 fixes a small receive buffer (slow clients),
    ``mss`` > 0 the segment size the client announces (as over Ethernet, not loopback)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            # Set before connecting, so the kernel neither autotunes it nor offers a
            # large window: a client that stops reading then backs up into the server.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if mss:
            # The server's kernel sizes its send buffer from cwnd x MSS: at loopback's
            # 64 KiB MSS that is megabytes, which hide a stalled reader for many seconds.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        sock.setblocking(False)
        await loop.sock_connect(sock, (HOST, port))
        _, link = await loop.create_connection(lambda: Link(port, on_frame, on_lost), sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        async with asyncio.timeout(10):
            await link.opened
    except BaseException:
        link.abort()
        raise
    return link


# Subscribers that recover ----------------------------------------------------------------


class Follower:
    """A subscriber of one channel that reconnects with ``since`` whenever its socket drops.

    ``ids`` keeps every message id it received, across all its connections
    (interned: every follower of a channel shares the same strings).
    """

    def __init__(self, stats: Stats, port: int, key: str, channel: str, rcvbuf: int = 0) -> None:
        self.stats = stats
        self.port = port
        self.key = key
        self.channel = channel
        self.rcvbuf = rcvbuf
        self.ids: list[str] = []
        self.start: str | None = None
        """The offset of the first subscribe: every message after it is this follower's."""
        self.last: str | None = None
        self.epoch: str | None = None
        self.worker = ""
        self.link: Link | None = None
        self.connected = False
        self.drops = 0
        self.closes: list[str] = []
        """Why each of its connections ended (close code, ``eof`` or ``reset``)."""
        self.stopping = False
        self._abandoned = False
        self._answer: asyncio.Future[dict[str, Any]] | None = None
        self._reconnecting: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Connect and subscribe (with ``since`` and ``epoch`` after the first time)."""
        loop = asyncio.get_running_loop()
        self._answer = loop.create_future()
        self._abandoned = False
        self.link = await open_link(self.port, self._on_frame, self._on_lost, self.rcvbuf)
        subscribe: dict[str, Any] = {"op": "subscribe", "id": 2, "channel": self.channel}
        if self.last is not None:
            subscribe.update(since=self.last, epoch=self.epoch)
        self.link.send({"op": "connect", "id": 1, "key": self.key}, subscribe)
        try:
            async with asyncio.timeout(15):
                answer = await self._answer
        except BaseException:
            self.link.abort()
            raise
        position = answer["position"]
        if self.last is None:
            self.start = self.last = position["offset"]
            self.epoch = position["epoch"]
        elif answer.get("recovered") is not True or position["epoch"] != self.epoch:
            self.stats.recovered_false += 1
            self.stats.error(f"{self.channel}: subscribe since {self.last} answered {answer}")
        if self.link.lost:
            # Dropped between the answer and now: _on_lost did not see a live
            # subscription, so the caller's retry is what reconnects.
            raise ConnectionError("lost right after subscribing")
        self.connected = True

    def _on_frame(self, opcode: int, payload: bytes) -> None:
        if self._abandoned:
            return  # the connect failed; connect() drops this link and retries
        if opcode != _OP_TEXT:
            self.stats.error(f"binary frame on herald.json: {payload[:80]!r}")
            return
        frame = orjson.loads(payload)
        op = frame.get("op")
        if op == "message":
            message_id = sys.intern(frame["id"])
            self.ids.append(message_id)
            self.last = message_id
        elif op == "connected":
            self.worker = frame["server"]
        elif op == "subscribed" and self._answer is not None and not self._answer.done():
            self._answer.set_result(frame)
        elif self._answer is not None and not self._answer.done():
            # Typically ``unavailable`` while Redis is down: the retry loop tries again.
            self._abandoned = True
            self._answer.set_exception(ConnectionError(f"answered {payload[:200]!r}"))
        else:
            self.stats.error(f"{self.channel}: unexpected {payload[:200]!r}")

    def _on_lost(self, reason: str) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(ConnectionError(f"lost before subscribed ({reason})"))
        if not self.connected or self.stopping:
            return  # connect() is still running and will see the failure
        self.connected = False
        self.drops += 1
        self.closes.append(reason)
        self.stats.closes[reason] = self.stats.closes.get(reason, 0) + 1
        if not self.stopping:
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Jittered exponential backoff, as a real client would, until subscribed again."""
        delay = 0.1
        while not self.stopping:
            try:
                await self.connect()
                self.stats.reconnects += 1
                return
            except (OSError, ConnectionError, TimeoutError):
                self.stats.failed_connects += 1
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 2.0)

    def pause(self) -> None:
        """Stop reading (a slow client): the server's backlog for it grows."""
        if self.link is not None and self.link.transport is not None:
            self.link.transport.pause_reading()

    def resume(self) -> None:
        """Read again."""
        if self.link is not None and self.link.transport is not None:
            with_transport = self.link.transport
            if not with_transport.is_closing():
                with_transport.resume_reading()

    def stop(self) -> None:
        """Close for good (the run is over)."""
        self.stopping = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self.link is not None:
            self.link.abort()


# Publishing over HTTP --------------------------------------------------------------------


class Publisher:
    """Publishes numbered messages over keep-alive HTTP connections at a paced rate.

    Only ``201`` answers are acknowledged. A connection that dies with a request
    in flight (its worker was killed) leaves that message unacknowledged; it may
    still have been stored, which the history check accounts for.
    """

    def __init__(
        self,
        stats: Stats,
        port: int,
        key: str,
        channels: list[str],
        rate: float,
        payload_bytes: int,
        connections: int,
    ) -> None:
        self.stats = stats
        self.port = port
        self.key = key
        self.channels = channels
        self.rate = rate
        self.payload = "p" * payload_bytes
        self.connections = connections
        self.running = True
        self._next = 0

    async def run(self) -> None:
        """Publish until ``running`` goes false."""
        await asyncio.gather(*(self._loop(i) for i in range(self.connections)))

    async def _loop(self, index: int) -> None:
        interval = self.connections / self.rate
        due = time.monotonic() + interval * index / self.connections
        conn: HttpConnection | None = None
        answers: dict[HttpConnection, asyncio.Future[tuple[int, bytes]]] = {}

        def answered(c: HttpConnection, status: int, body: bytes) -> None:
            future = answers.pop(c, None)
            if future is not None and not future.done():
                future.set_result((status, body))

        while self.running:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # Falling behind (an outage) does not turn into a burst afterwards.
            due = max(due + interval, time.monotonic() - 1.0)
            number = self._next
            self._next += 1
            channel = self.channels[number % len(self.channels)]
            body = orjson.dumps({"payload": {"n": number, "p": self.payload}})
            request = build_request(
                "POST", f"/v1/channels/{channel}/publish", self.port, self.key, body
            )
            try:
                if conn is None or conn.lost.done():
                    conn = await http_connect(self.port, answered)
                future: asyncio.Future[tuple[int, bytes]] = (
                    asyncio.get_running_loop().create_future()
                )
                answers[conn] = future
                conn.write(request)
                async with asyncio.timeout(15):
                    waiting: list[asyncio.Future[Any]] = [future, conn.lost]
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if not future.done():
                    raise ConnectionError("connection lost with the request in flight")
                status, answer = future.result()
            except (OSError, ConnectionError, TimeoutError) as exc:
                self._failed(type(exc).__name__)
                if conn is not None:
                    conn.close()
                conn = None
                continue
            if status == 201:
                self.stats.acked.setdefault(channel, []).append(
                    sys.intern(orjson.loads(answer)["data"]["id"])
                )
            else:
                self._failed(str(status))
        if conn is not None:
            conn.close()

    def _failed(self, why: str) -> None:
        self.stats.publish_failed[why] = self.stats.publish_failed.get(why, 0) + 1


# Fuzz ------------------------------------------------------------------------------------


async def _closed_within(link: Link, lost: asyncio.Event, seconds: float = 10.0) -> str:
    """Wait until the server ends the link; how it did (close code, reset, eof)."""
    try:
        async with asyncio.timeout(seconds):
            await lost.wait()
    except TimeoutError:
        link.abort()
        return "still open"
    return link.close_code or "dropped"


async def fuzz_once(stats: Stats, port: int, key: str, kind: str) -> None:
    """One connection that misbehaves in one way; check that the server copes as it says."""
    frames: list[bytes] = []
    lost = asyncio.Event()
    answered = asyncio.Event()

    def on_frame(opcode: int, payload: bytes) -> None:
        frames.append(payload)
        answered.set()

    def on_lost(reason: str) -> None:
        lost.set()

    if kind == "garbage before the handshake":
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(os.urandom(512) + b"\r\n\r\n")
        try:
            async with asyncio.timeout(10):
                answer = await reader.read(4096)
                while await reader.read(4096):
                    pass
        except (TimeoutError, OSError):
            answer = b"(no answer)"
        finally:
            writer.close()
        if answer and not answer.startswith(b"HTTP/1.1 4"):
            stats.fuzz_unexpected.append(f"{kind}: {answer[:60]!r}")
        return
    link = await open_link(port, on_frame, on_lost)
    link.send({"op": "connect", "id": 1, "key": key})
    # Misbehave only once connected, so that every kind is judged on the same footing.
    try:
        async with asyncio.timeout(10):
            await answered.wait()
    except TimeoutError:
        frames.append(b"(nothing)")
    if not frames[0].startswith(b'{"op":"connected"'):
        link.abort()
        if b'"code":"unavailable"' in frames[0]:
            stats.fuzz_skipped += 1  # Redis is down: the connect could not be checked
        else:
            stats.fuzz_unexpected.append(f"{kind}: connect answered {frames[0][:160]!r}")
        return
    expected = "4000"
    if kind == "three bad frames":
        link.write(_OP_TEXT, b"{not json")
        link.send({"op": "no-such-op", "id": 2})
        link.write(_OP_BINARY, os.urandom(64))
    elif kind == "random text frames":
        letters = "abcdefghijklmnopqrstuvwxyz{}[]:,\"' 0123456789"
        for _ in range(3):
            text = "".join(random.choices(letters, k=random.randint(1, 200)))
            link.write(_OP_TEXT, b"~" + text.encode())  # "~" first: never valid JSON
    elif kind == "invalid UTF-8 text frame":
        link.write(_OP_TEXT, b'{"op": "ping", "id": "\xff\xfe"}')
        expected = "1007"
    elif kind == "unmasked frame":
        # RFC 6455: a server must fail the connection on an unmasked client frame.
        if link.transport is not None:
            link.transport.write(b"\x81\x05hello")
        expected = "1002"
    elif kind == "oversized frame":
        link.write(_OP_TEXT, b"x" * (1024 * 1024 + 1))
        expected = "1009"
    elif kind == "truncated frame":
        if link.transport is not None:
            link.transport.write(b"\x81\xfe\x10\x00mask" + b"x" * 10)
        link.abort()
        lost.set()
        expected = "dropped"
    outcome = await _closed_within(link, lost)
    if outcome != expected:
        stats.fuzz_unexpected.append(f"{kind}: expected {expected}, got {outcome}")


FUZZ_KINDS = (
    "three bad frames",
    "random text frames",
    "invalid UTF-8 text frame",
    "unmasked frame",
    "oversized frame",
    "truncated frame",
    "garbage before the handshake",
)


# The run ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=1000, help="subscribers held (default 1000)")
    parser.add_argument(
        "--seconds", type=float, default=45.0, help="publishing time with faults (default 45)"
    )
    parser.add_argument("--channels", type=int, default=10, help="channels the clients share")
    parser.add_argument("--rate", type=float, default=200.0, help="publishes per second")
    parser.add_argument("--slow", type=int, default=4, help="clients that stop reading a while")
    parser.add_argument(
        "--slow-stall", type=float, default=10.0, help="seconds the slow clients stop reading"
    )
    parser.add_argument("--concurrency", type=int, default=200, help="connects in flight at once")
    parser.add_argument(
        "--pin", action="store_true", help="pin the servers to CPU 0 and this process to CPU 1"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (fuzz, jitter)")
    args = parser.parse_args(argv)
    if args.clients < 2 or args.seconds < 10 or args.channels < 1 or args.rate <= 0:
        parser.error("need --clients >= 2, --seconds >= 10, --channels >= 1 and --rate > 0")
    return args


@dataclass
class Run:
    """The processes and clients of one run."""

    args: argparse.Namespace
    redis: Redis
    herald: Proc
    port: int
    key: str
    stats: Stats = field(default_factory=Stats)
    followers: list[Follower] = field(default_factory=list)
    slow: list[Follower] = field(default_factory=list)


def progress(text: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def _api(run: Run, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    raw = None if body is None else orjson.dumps(body)
    status, answer = await fetch(run.port, method, path, run.key, raw)
    return status, orjson.loads(answer) if answer else None


async def wait_ready(run: Run, seconds: float = 30.0) -> None:
    """Until /readyz answers 200 (Redis reachable from the worker that answers)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if (await fetch(run.port, "GET", "/readyz"))[0] == 200:
                return
        except (OSError, ConnectionError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("Herald did not become ready")


async def history(run: Run, channel: str) -> list[str]:
    """Every id the channel's history holds, oldest first."""
    ids: list[str] = []
    while True:
        since = f"&since={ids[-1]}" if ids else ""
        status, answer = await _api(run, "GET", f"/v1/channels/{channel}/history?limit=1000{since}")
        if status != 200:
            raise RuntimeError(f"history of {channel}: {status} {answer}")
        page = [message["id"] for message in answer["data"]]
        if not page:
            return ids
        ids += page


async def open_all(run: Run, followers: list[Follower]) -> None:
    """Connect and subscribe everyone, ``--concurrency`` at a time."""
    gate = asyncio.Semaphore(run.args.concurrency)

    async def one(follower: Follower) -> None:
        async with gate:
            await follower.connect()

    await asyncio.gather(*(one(f) for f in followers))


async def at(start: float, offset: float) -> None:
    """Sleep until ``offset`` seconds after ``start``."""
    await asyncio.sleep(max(0.0, start + offset - time.monotonic()))


async def kill_redis(run: Run, start: float, offset: float, down: float) -> None:
    """SIGKILL Redis, keep it down ``down`` seconds, start it again on its AOF."""
    await at(start, offset)
    progress("fault: redis-server SIGKILL")
    run.redis.kill()
    run.stats.fault("Redis killed and restarted")
    await asyncio.sleep(down)
    await asyncio.to_thread(run.redis.start)
    progress("redis-server is back")


async def kill_worker(run: Run, start: float, offset: float) -> None:
    """SIGKILL the worker that holds the most subscribers (uvicorn starts another)."""
    await at(start, offset)
    workers = worker_pids(run.herald)
    held: dict[int, int] = {}
    for follower in run.followers:
        pid = int(follower.worker.rsplit(":", 1)[1]) if follower.worker else 0
        if pid in workers:
            held[pid] = held.get(pid, 0) + 1
    if not held:
        run.stats.error(f"no worker to kill among {workers}")
        return
    victim = max(held, key=lambda pid: held[pid])
    progress(f"fault: SIGKILL worker {victim} ({held[victim]} subscribers)")
    os.kill(victim, signal.SIGKILL)
    run.stats.fault("worker SIGKILL")


async def stall_slow(run: Run, start: float, offset: float) -> None:
    """The slow clients stop reading for ``--slow-stall`` seconds, then read again."""
    if not run.slow:
        return
    await at(start, offset)
    progress(f"fault: {len(run.slow)} slow clients stop reading")
    for follower in run.slow:
        follower.pause()
    run.stats.fault("slow client (stopped reading)", len(run.slow))
    await asyncio.sleep(run.args.slow_stall)
    for follower in run.slow:
        follower.resume()


async def fuzz(run: Run, start: float, seconds: float) -> None:
    """A fuzz connection every second, cycling through the kinds of bad input."""
    index = 0
    while time.monotonic() < start + seconds:
        kind = FUZZ_KINDS[index % len(FUZZ_KINDS)]
        index += 1
        try:
            await fuzz_once(run.stats, run.port, run.key, kind)
        except (OSError, ConnectionError, TimeoutError) as exc:
            run.stats.fuzz_unexpected.append(f"{kind}: {type(exc).__name__} {exc}")
        run.stats.fault(f"fuzz: {kind}")
        await asyncio.sleep(1.0)


async def watch_open(run: Run, until: Callable[[], bool]) -> None:
    """Sample how many subscribers hold a live subscription (the fewest during the run)."""
    everyone = run.followers + run.slow
    while not until():
        held = sum(1 for f in everyone if f.connected)
        if run.stats.min_open < 0 or held < run.stats.min_open:
            run.stats.min_open = held
        await asyncio.sleep(0.25)


async def drain(run: Run, due: dict[Follower, list[str]], seconds: float) -> float:
    """Wait until every subscriber has as many messages as it is due; seconds taken."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if all(f.connected and len(f.ids) >= len(ids) for f, ids in due.items()):
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)  # anything extra (a duplicate) arrives now
    return time.monotonic() - started


def _key(message_id: str) -> tuple[int, int]:
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq)


def _after(ids: list[str], start: str | None) -> list[str]:
    """The ids newer than ``start`` (``ids`` oldest first, as history answers)."""
    if start is None:
        return ids
    keys = [_key(i) for i in ids]
    return ids[bisect.bisect_right(keys, _key(start)) :]


async def exercise(run: Run) -> dict[str, Any]:
    """Connect, publish with faults, drain, and count; the table's figures."""
    args, stats = run.args, run.stats
    channels = [f"faults-{i}" for i in range(args.channels)]
    for name in [*channels, SLOW_CHANNEL]:
        status, answer = await _api(
            run, "POST", "/v1/channels", {"name": name, "history_size": 100_000}
        )
        if status != 201:
            raise RuntimeError(f"create {name}: {status} {answer}")
    run.followers = [
        Follower(stats, run.port, run.key, channels[i % len(channels)]) for i in range(args.clients)
    ]
    # Slow clients share a channel of their own with bigger messages, so that a
    # stall backs up megabytes within seconds; a few normal readers there witness
    # that the others are not held up.
    run.slow = [
        Follower(stats, run.port, run.key, SLOW_CHANNEL, rcvbuf=16 * 1024) for _ in range(args.slow)
    ]
    witnesses = [Follower(stats, run.port, run.key, SLOW_CHANNEL) for _ in range(4)]
    run.followers += witnesses
    progress(f"connecting {len(run.followers) + len(run.slow)} subscribers")
    opened = time.monotonic()
    await open_all(run, run.followers + run.slow)
    connect_seconds = time.monotonic() - opened
    progress(f"connected in {connect_seconds:.1f} s; publishing for {args.seconds:.0f} s")

    publisher = Publisher(stats, run.port, run.key, channels, args.rate, 64, connections=8)
    slow_rate = 30.0 if args.slow else 1.0
    slow_publisher = Publisher(
        stats, run.port, run.key, [SLOW_CHANNEL], slow_rate, 32 * 1024, connections=1
    )
    start = time.monotonic()
    done = False
    tasks = [
        asyncio.create_task(publisher.run()),
        asyncio.create_task(slow_publisher.run()),
        asyncio.create_task(watch_open(run, lambda: done)),
    ]
    faults: list[Awaitable[None]] = [
        stall_slow(run, start, 0.15 * args.seconds),
        kill_redis(run, start, 0.35 * args.seconds, down=3.0),
        kill_worker(run, start, 0.65 * args.seconds),
        fuzz(run, start, args.seconds),
    ]
    await asyncio.gather(*faults)
    await at(start, args.seconds)
    publisher.running = slow_publisher.running = False
    done = True
    await asyncio.gather(*tasks)
    progress("publishing stopped; waiting for every subscriber to catch up")

    await wait_ready(run)
    stored = {name: await history(run, name) for name in [*channels, SLOW_CHANNEL]}
    everyone = run.followers + run.slow
    # What each subscriber is due: everything stored after its first subscribe.
    due = {f: _after(stored[f.channel], f.start) for f in everyone}
    drain_seconds = await drain(run, due, 60.0)
    held_at_end = sum(1 for f in everyone if f.connected)
    for follower in everyone:
        follower.stop()

    losses = duplicates = disorder = stored_missing = 0
    acked_total = sum(len(ids) for ids in stats.acked.values())
    acked_sets = {name: set(ids) for name, ids in stats.acked.items()}
    not_stored = sum(len(acked_sets.get(name, set()) - set(stored[name])) for name in stored)
    positions = {name: {i: n for n, i in enumerate(ids)} for name, ids in stored.items()}
    for follower in everyone:
        got = set(follower.ids)
        duplicates += len(follower.ids) - len(got)
        # Received ids must climb through the history; an id not in it sorts first.
        where = positions[follower.channel]
        seen = [where.get(i, -1) for i in follower.ids]
        if any(b <= a for a, b in itertools.pairwise(seen)):
            disorder += 1
        acked = acked_sets.get(follower.channel, set())
        missing = [i for i in due[follower] if i not in got]
        losses += sum(1 for i in missing if i in acked)
        # Stored without a 201 (a worker died mid-request): recovered all the same.
        stored_missing += sum(1 for i in missing if i not in acked)
    return {
        "subscribers": len(everyone),
        "connect_seconds": connect_seconds,
        "min_open": stats.min_open,
        "held_at_end": held_at_end,
        "acked": acked_total,
        "unacked": sum(stats.publish_failed.values()),
        "not_stored": not_stored,
        "stored_unacked": sum(len(ids) for ids in stored.values()) - acked_total + not_stored,
        "delivered": sum(len(f.ids) for f in everyone),
        "losses": losses,
        "duplicates": duplicates,
        "disorder": disorder,
        "stored_missing": stored_missing,
        "drain_seconds": drain_seconds,
        "slow_dropped": sum(1 for f in run.slow if f.drops),
        "witnesses_4008": sum(f.closes.count("4008") for f in witnesses),
        "publish_rate": (acked_total + sum(stats.publish_failed.values())) / args.seconds,
    }


def table(run: Run, figures: dict[str, Any]) -> str:
    """The one table this runner prints."""
    stats = run.stats
    failed = ", ".join(f"{why} {n}" for why, n in sorted(stats.publish_failed.items()))
    closes = ", ".join(f"{why} {n}" for why, n in sorted(stats.closes.items()))
    rows: list[tuple[str, str]] = [
        ("subscribers (connections held)", f"{figures['subscribers']:,}"),
        ("  connected and subscribed in", f"{figures['connect_seconds']:.1f} s"),
        ("  fewest subscribed during the faults", f"{figures['min_open']:,}"),
        ("  subscribed at the end", f"{figures['held_at_end']:,}"),
        (
            "messages published (acknowledged 201)",
            f"{figures['acked']:,} ({figures['publish_rate']:.0f}/s attempted "
            f"for {run.args.seconds:.0f} s)",
        ),
        ("  publishes not acknowledged", f"{figures['unacked']:,} ({failed or '-'})"),
        ("  stored without a 201", f"{figures['stored_unacked']:,}"),
        ("  acknowledged but not in history", f"{figures['not_stored']:,}"),
        ("messages delivered (to subscribers)", f"{figures['delivered']:,}"),
    ]
    rows += [(f"fault: {kind}", f"{count:,}") for kind, count in sorted(stats.faults.items())]
    rows += [
        ("  fuzz answered otherwise than expected", f"{len(stats.fuzz_unexpected):,}"),
        ("  fuzz skipped (connect unavailable: Redis down)", f"{stats.fuzz_skipped:,}"),
        ("  slow clients dropped by the server", f"{figures['slow_dropped']:,}"),
        ("  normal readers of their channel closed 4008", f"{figures['witnesses_4008']:,}"),
        ("subscriber connections lost", f"{sum(stats.closes.values()):,} ({closes or '-'})"),
        ("reconnects with since", f"{stats.reconnects:,}"),
        ("  connect attempts refused or failed", f"{stats.failed_connects:,}"),
        ("  answered recovered: false", f"{stats.recovered_false:,}"),
        ("caught up after publishing stopped in", f"{figures['drain_seconds']:.1f} s"),
        ("LOSSES (acknowledged, never delivered)", f"{figures['losses']:,}"),
        ("DUPLICATES", f"{figures['duplicates']:,}"),
        ("  subscribers that got messages out of order", f"{figures['disorder']:,}"),
        ("  stored without a 201, never delivered", f"{figures['stored_missing']:,}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'what':<{width}}  value", f"{'-' * width}  {'-' * 24}"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run once; print the table; 1 if anything was lost, duplicated or reordered."""
    args = parse_args(argv)
    if args.seed is not None:
        random.seed(args.seed)
    needed = 2 * (args.clients + args.slow) + 512
    soft, _ = raise_nofile(needed)
    if soft < needed:
        print(f"open-files limit {soft} is too low for {args.clients} clients", file=sys.stderr)
        return 2
    pin = args.pin and can_pin()
    RESULTS.mkdir(parents=True, exist_ok=True)
    key = "faults-" + secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="herald-faults-") as directory:
        redis = Redis(free_port(), Path(directory), RESULTS / "faults-redis.log", pin)
        redis.start()
        port = free_port()
        herald = start_herald(port, key, redis.url, RESULTS / "faults-herald.log", pin)
        try:
            wait_port(herald, port)
            if pin:
                os.sched_setaffinity(0, {LOADGEN_CPU})
            run = Run(args, redis, herald, port, key)
            figures = uvloop.run(_exercise_when_ready(run))
        finally:
            herald.stop()
            redis.stop()
    print(table(run, figures))
    problems = log_problems(herald.log_path)
    tracebacks = [line for line in problems if "Traceback" in line]
    for text in run.stats.errors + run.stats.fuzz_unexpected:
        print(f"note: {text}")
    print(
        f"server log: {herald.log_path} ({len(problems)} warning/error lines, "
        f"{len(tracebacks)} tracebacks)"
    )
    bad = figures["losses"] + figures["duplicates"] + figures["disorder"]
    return 1 if bad or figures["stored_missing"] else 0


async def _exercise_when_ready(run: Run) -> dict[str, Any]:
    await wait_ready(run)
    return await exercise(run)


if __name__ == "__main__":
    sys.exit(main())
