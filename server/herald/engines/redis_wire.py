"""Raw pub/sub connections to Redis, read with hiredis a chunk at a time.

A worker on many topics receives one pub/sub message per published group:
tens of thousands a second. Read through redis-py, each one costs a parse
call, a timeout scope and a dict; here `data_received` parses everything a
read brought in one loop of ``hiredis.Reader.gets`` and the engine takes the
whole batch at once. Commands are packed with ``hiredis.pack_command``.

The publish pipeline of the single-Redis engine runs on one such connection
too (`RespConnection.call`): its commands go out in one write and their
replies come back parsed in bulk, where redis-py spends more per command than
the publish script costs Redis.

Only what these two need is here: connect (TCP, TLS or a Unix socket), AUTH,
SELECT, PING, writing commands and reading RESP2 replies, such as
``[b"message", channel, data]`` on a pub/sub connection.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import KW_ONLY, dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

__all__ = ["Endpoint", "Inbox", "RespConnection", "connect", "endpoint_from_url"]

# Replies an inbox holds before its connections stop reading: past this the
# engine is behind, and Redis should buffer (and, past its own limit, drop the
# link, which the engine recovers from) rather than this process's memory.
_HIGH_WATER = 50_000


@dataclass(slots=True)
class Endpoint:
    """Where a Redis listens and how to log in."""

    host: str = "127.0.0.1"
    port: int = 6379
    _: KW_ONLY
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    path: str | None = None
    """A Unix socket, instead of host and port."""
    db: int = 0


def endpoint_from_url(url: str) -> Endpoint:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS) or ``unix://path``.

    As in redis-py's URLs, ``?db=N`` also names the database and
    ``rediss://...?ssl_cert_reqs=none`` skips certificate checks.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"not a Redis URL: {url!r}")
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    path = unquote(parts.path)
    if scheme == "unix":
        db = int(query.get("db", 0))
        return Endpoint(path=path, username=username, password=password, db=db)
    db = int(query.get("db") or path.strip("/") or 0)
    tls = None
    if scheme == "rediss":
        tls = ssl.create_default_context()
        if query.get("ssl_cert_reqs", "").lower() in ("none", "optional"):
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
    return Endpoint(
        parts.hostname or "127.0.0.1",
        parts.port or 6379,
        username=username,
        password=password,
        tls=tls,
        db=db,
    )


class Inbox:
    """Replies from one or more connections, taken by one reader in batches.

    The first failure of any connection (lost, or an error reply) is raised
    from `take`, after the replies that came before it.
    """

    def __init__(self) -> None:
        self._replies: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None
        self._connections: list[RespConnection] = []
        self._paused = False

    def attach(self, connection: RespConnection) -> None:
        """Deliver this connection's replies here from now on."""
        previous = getattr(connection, "inbox", None)
        if previous is not None and previous is not self:
            previous._connections.remove(connection)
        self._connections.append(connection)
        connection.inbox = self
        if self._paused:
            connection.pause()

    def put(self, replies: list[Any]) -> None:
        """Called by a connection with what one read brought."""
        self._replies.extend(replies)
        if len(self._replies) > _HIGH_WATER and not self._paused:
            self._paused = True
            for connection in self._connections:
                connection.pause()
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """Called by a connection that can no longer be used."""
        if self._failure is None:
            self._failure = exc
        self._wake()

    async def take(self, *, errors: bool = False) -> list[Any]:
        """Every reply received so far (waits for at least one); raises once one failed.

        An error reply fails the connection too, unless ``errors`` is true: then
        it comes back as a `hiredis.ReplyError` in its place.
        """
        while not self._replies:
            if self._failure is not None:
                raise self._failure
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        replies, self._replies = self._replies, []
        if self._paused:
            self._paused = False
            for connection in self._connections:
                connection.resume()
        for reply in () if errors else replies:
            if isinstance(reply, Exception):
                # A refused AUTH or (S)SUBSCRIBE: the link is not what the engine thinks.
                self._failure = ConnectionError(f"Redis answered with an error: {reply}")
                raise self._failure
        return replies

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class RespConnection(asyncio.Protocol):
    """One connection: parses every reply a read brings and hands them to its inbox."""

    inbox: Inbox

    def __init__(self) -> None:
        Inbox().attach(self)
        self._parser = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport to write commands on."""
        # A stream transport (uvloop's are not asyncio.Transport subclasses).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Parse every complete reply and pass them on in one batch."""
        parser = self._parser
        parser.feed(data)
        replies = []
        try:
            while (reply := parser.gets()) is not False:
                replies.append(reply)
        except hiredis.ProtocolError as exc:
            self.inbox.fail(ConnectionError(f"unreadable reply from Redis: {exc}"))
            self.close()
            return
        if replies:
            self.inbox.put(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        """Tell the inbox: the link is gone."""
        self._closed = True
        self.inbox.fail(exc or ConnectionError("Redis closed the pub/sub connection"))

    def send(self, *args: bytes | str | int) -> None:
        """Write one command (never waits; the reply arrives through the inbox)."""
        if self._transport is None or self._closed:
            raise ConnectionError("the pub/sub connection is closed")
        # hiredis's stub types the argument as a 1-tuple; any tuple of these works.
        self._transport.write(hiredis.pack_command(args))  # type: ignore[arg-type,unused-ignore]

    async def call(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write; their replies in order, error replies as values.

        One call at a time on a connection. If it fails or is cancelled half-way,
        replies may still be on their way: close the connection.
        """
        if self._transport is None or self._closed:
            raise ConnectionError("the connection to Redis is closed")
        pack = hiredis.pack_command
        self._transport.write(b"".join([pack(command) for command in commands]))
        replies: list[Any] = []
        while len(replies) < len(commands):
            replies += await self.inbox.take(errors=True)
        return replies

    @property
    def closed(self) -> bool:
        """Whether the connection is gone (closed here or lost)."""
        return self._closed

    def pause(self) -> None:
        """Stop reading the socket."""
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def resume(self) -> None:
        """Read the socket again."""
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def close(self) -> None:
        """Close the socket (never raises)."""
        self._closed = True
        if self._transport is not None:
            self._transport.close()


async def connect(endpoint: Endpoint) -> RespConnection:
    """Open a connection, log in and check it answers (PING); the caller bounds the time."""
    loop = asyncio.get_running_loop()
    connection = RespConnection()
    if endpoint.path is not None:
        await loop.create_unix_connection(lambda: connection, endpoint.path)
    else:
        await loop.create_connection(
            lambda: connection,
            endpoint.host,
            endpoint.port,
            ssl=endpoint.tls,
            server_hostname=endpoint.host if endpoint.tls else None,
        )
    try:
        expected = 1
        if endpoint.password is not None:
            expected += 1
            login = (endpoint.username, endpoint.password) if endpoint.username else ()
            connection.send("AUTH", *(login or (endpoint.password,)))
        if endpoint.db:
            expected += 1
            connection.send("SELECT", endpoint.db)
        connection.send("PING")
        replies: list[Any] = []
        while len(replies) < expected:
            replies += await connection.inbox.take()
        if replies[-1] != b"PONG":
            raise ConnectionError(f"unexpected answer from Redis: {replies!r}")
    except BaseException:
        connection.close()
        raise
    return connection
