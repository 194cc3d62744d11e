"""`Client`: one logical connection to Herald that survives the physical ones.

A background task owns the socket. Each connection (a `Link`) connects,
naming in ``connect`` the cursor of every subscription (so the server recovers
the persistent ones it subscribes a device or user to by itself), waits until
the server has done that (a ``ping`` after ``connect`` is answered only then,
since the server handles a connection's frames in order), then subscribes
every other topic again with ``since`` = its cursor and the epoch it read.
When the socket drops it waits a jittered, growing delay and starts over; only
credentials that are refused (4001, 4003, or a 4xx to the upgrade) end it for
good.

Every frame is read by one reader that decides, before it reads the next,
whether a subscription is live on this connection: replayed messages follow
their ``subscribed`` answer at once, so that decision cannot wait for the
task that asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Literal, TypeVar

from websockets.exceptions import WebSocketException

from herald.client.errors import (
    ClientClosed,
    ClientError,
    ConnectionLost,
    FatalError,
    RequestError,
)
from herald.client.frames import Backoff, Command, EncodingName, Frame, Message, subprotocol
from herald.client.link import Link, SocketOptions
from herald.client.subscription import GapHandler, Subscription
from herald.client.topics import Topics

__all__ = ["Client", "CommandHandler"]

logger = logging.getLogger("herald.client")

CommandHandler = Callable[[Command], Awaitable[Any]]
"""``async def handler(command) -> reply_payload``."""

_H = TypeVar("_H", bound=CommandHandler)


class Client:
    """An asyncio client for Herald's WebSocket protocol, for devices and backends.

    ``async with Client(url, key=...) as client`` connects (retrying with
    backoff until the first connection succeeds; bound it with
    ``asyncio.timeout``) and closes on exit. Exactly one credential: an app or
    channel ``key``, a user ``token``, or a device's ``connection_key``.

    Reconnects are automatic: after a drop (1006, 1012 restart, 4008 slow
    consumer, network errors) it waits ``min_backoff``, doubling up to
    ``max_backoff``, with jitter, and resubscribes every topic from the last id
    it saw, so `Subscription` iterators see neither gap nor duplicate. A
    refusal (4001, 4003) ends the client: iterators and calls raise
    `FatalError`, as does `wait_closed`.

    Requests (`subscribe`, `publish`, `ping`, ...) wait for a connection and
    fail after ``request_timeout`` seconds (None: never).
    """

    def __init__(
        self,
        url: str,
        *,
        key: str | None = None,
        token: str | None = None,
        connection_key: str | None = None,
        encoding: EncodingName = "json",
        name: str | None = None,
        min_backoff: float = 0.1,
        max_backoff: float = 10.0,
        request_timeout: float | None = 10.0,
        open_timeout: float = 10.0,
        max_buffer: int = 10_000,
        max_frame_bytes: int | None = 16 * 1024 * 1024,
        ping_interval: float | None = 20.0,
        proxy: str | Literal[True] | None = True,
    ) -> None:
        credentials = {"key": key, "token": token, "connection_key": connection_key}
        given = {field: value for field, value in credentials.items() if value is not None}
        if len(given) != 1:
            raise ValueError("give exactly one of key, token, connection_key")
        subprotocol(encoding)  # refuse an unknown encoding now, not at the first connect
        self.url = url
        self.encoding: EncodingName = encoding
        self._credential = given
        self._name = name
        self._socket = SocketOptions(
            url, encoding, open_timeout, ping_interval, max_frame_bytes, proxy
        )
        self._backoff = Backoff(min_backoff, max_backoff)
        self._request_timeout = request_timeout
        self._max_buffer = max_buffer
        self._topics = Topics(self, lambda: self._link, self._spawn, max_buffer)
        self._link: Link | None = None
        self._generation = 0
        self._online = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._closing = False
        self._fatal: FatalError | None = None
        self._handler: CommandHandler | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.connections = 0
        """How many connections were established (1 + the reconnects)."""
        self.client_id: str | None = None
        """The current connection's ``client_id`` (from ``connected``)."""
        self.server: str | None = None
        """The worker that holds the current connection (``host:pid``)."""
        self.device_id: str | None = None
        """Set when connected with a device's ``connection_key``."""

    # Lifecycle

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Start the client and wait until it is connected (retrying on network errors).

        Raises `FatalError` if the server refuses the credentials.
        """
        if self._runner is not None:
            raise RuntimeError("the client was started already")
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._runner = loop.create_task(self._run(), name=f"herald-client {self.url}")
        try:
            await asyncio.shield(self._first)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the socket (1000) and end every subscription; idempotent."""
        if self._closing:
            return
        self._closing = True
        link = self._link
        if link is not None:
            with contextlib.suppress(Exception):
                await link.ws.close()
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            await asyncio.wait({self._runner})
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._topics.end_all("client closed", None)
        self._online.set()  # wake requests waiting for a connection: they raise now
        self._settle_first(ClientClosed("the client was closed"))

    async def wait_closed(self) -> None:
        """Wait until the client ends; raises `FatalError` if the server refused it."""
        if self._runner is not None:
            await asyncio.wait({self._runner})
        if self._fatal is not None:
            raise self._fatal

    @property
    def connected(self) -> bool:
        """Whether it is connected right now."""
        return self._link is not None and self._link.ready

    @property
    def fatal_error(self) -> FatalError | None:
        """The refusal that ended the client, if one did."""
        return self._fatal

    # Subscriptions

    @property
    def subscriptions(self) -> list[Subscription]:
        """Every subscription, the server's persistent ones included."""
        return list(self._topics)

    def subscription(self, channel: str, room: str | None = None) -> Subscription | None:
        """The subscription to ``channel`` (and ``room``), if there is one."""
        return self._topics.get((channel, room or ""))

    async def subscribe(
        self,
        channel: str,
        room: str | None = None,
        since: str | None = None,
        *,
        epoch: str | None = None,
        subscriber_key: str | None = None,
        persist: bool = False,
        on_gap: GapHandler | None = None,
    ) -> Subscription:
        """Subscribe and return the `Subscription` once the server accepts it.

        With ``since`` (a message id; ``"0-0"`` for everything retained) the
        retained messages after it come first. A topic the client already
        follows (a persistent one the server subscribed it to, say) answers that
        subscription; asking it for ``since`` then restarts it from there,
        provided the application has taken nothing from it yet. Raises
        `RequestError` when the server refuses (``not_found``, ``forbidden``, ...).
        """
        self._check_usable()
        key = (channel, room or "")
        sub = self._topics.get(key)
        if sub is not None:
            if on_gap is not None:
                sub.on_gap = on_gap
            if since is not None and since != sub.last_id:
                if sub.taken:
                    raise ValueError(f"already subscribed to {channel!r} and reading it")
                sub.reset(since, epoch)
                self._topics.subscribe_now(sub, unsubscribe_first=True)
        else:
            sub = Subscription(
                self,
                key[0],
                key[1],
                since=since,
                epoch=epoch,
                subscriber_key=subscriber_key,
                max_buffer=self._max_buffer,
                on_gap=on_gap,
            )
            sub.persist_pending = persist
            self._topics.add(sub)
        try:
            async with asyncio.timeout(self._request_timeout):
                await asyncio.shield(sub.wait_ready())
        except TimeoutError:
            self._topics.forget(sub, "subscribe timed out")
            raise
        return sub

    async def unsubscribe(
        self, target: Subscription | str, room: str | None = None, *, persist: bool = False
    ) -> None:
        """Stop a subscription (by object, or channel and room); its iterator ends.

        ``persist=True`` also removes a persistent subscription, so the server
        does not subscribe the next connection again.
        """
        sub: Subscription | None
        if isinstance(target, Subscription):
            key, sub = target.key, target
        else:
            key = (target, room or "")
            sub = self._topics.get(key)
        link = self._link
        sent = sub is not None and link is not None and sub.generation == link.generation
        if sub is not None:
            self._topics.forget(sub, "unsubscribed", notify=False)
        frame: Frame = {"op": "unsubscribe", "channel": key[0]}
        if key[1]:
            frame["room"] = key[1]
        if persist:
            frame["persist"] = True
        elif not sent:
            return  # nothing subscribed on the current link, and the next won't be
        try:
            await self._request(frame)
        except RequestError as exc:
            if exc.code != "not_found":
                raise

    # Requests

    async def publish(
        self,
        channel: str,
        payload: Any,
        room: str | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        audience: dict[str, Any] | None = None,
    ) -> str:
        """Publish over the socket; the message id once it is stored. An ``audience``
        (``{"tag": ...}``, ``{"and": [...]}``, ...) limits it to the device
        subscribers it selects.

        `ConnectionLost` means the answer never came: the message may or may
        not be stored (publish over HTTP with an ``Idempotency-Key`` to retry
        safely).
        """
        frame: Frame = {"op": "publish", "channel": channel, "payload": payload}
        if room:
            frame["room"] = room
        if metadata is not None:
            frame["metadata"] = metadata
        if audience is not None:
            frame["audience"] = audience
        answer = await self._request(frame)
        return str(answer["message_id"])

    async def ping(self) -> float:
        """A protocol round trip; its duration in seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._request({"op": "ping"})
        return loop.time() - start

    def on_command(self, handler: _H) -> _H:
        """Answer commands with ``handler`` (usable as a decorator).

        Each command runs in its own task; what the handler returns is sent back
        as the ``reply`` payload. Multicast commands (``command.channel`` set) get
        no reply: nobody waits for one. A handler that raises sends no reply (the
        sender sees a timeout), and the error is logged. Set it before connecting:
        a command that comes while no handler is set is dropped.
        """
        self._handler = handler
        return handler

    # Internals: requests and subscriptions

    def _check_usable(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closing:
            raise ClientClosed("the client is closed")
        if self._runner is None:
            raise ClientError("not started: use `async with Client(...)` or `await connect()`")

    async def _request(self, frame: Frame) -> Frame:
        async with asyncio.timeout(self._request_timeout):
            while True:
                self._check_usable()
                link = self._link
                if link is not None and link.ready:
                    return await link.request(frame)
                await self._online.wait()

    def _spawn(self, coroutine: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _settle_first(self, error: BaseException | None) -> None:
        first = self._first
        if first is None or first.done():
            return
        if error is None:
            first.set_result(None)
        else:
            first.set_exception(error)
            first.exception()  # nobody may be waiting any more; that is fine

    # Internals: links

    def _refused(self, error: FatalError) -> None:
        self._fatal = error
        self._topics.end_all(str(error), error)
        self._online.set()  # wake requests waiting for a connection: they raise now
        self._settle_first(error)

    async def _run(self) -> None:
        try:
            while not self._closing:
                try:
                    await self._connection()
                except FatalError as exc:
                    logger.error("herald refused the client: %s", exc)
                    self._refused(exc)
                    return
                except (ClientError, OSError, TimeoutError, WebSocketException) as exc:
                    logger.info("connection to %s lost: %r", self.url, exc)
                if self._closing:
                    return
                delay = self._backoff.next()
                logger.info("reconnecting to %s in %.2fs", self.url, delay)
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: end the client loudly rather than hang its users
            logger.exception("herald client failed")
            self._refused(FatalError(f"client failure: {exc!r}"))

    async def _connection(self) -> None:
        """One link, from the upgrade to the close."""
        self._generation += 1
        link = await Link.open(self._socket, self._generation)
        self._link = link
        reader = asyncio.create_task(link.read(self._dispatch))
        try:
            hello: Frame = {"op": "connect", **self._credential}
            if self._name is not None:
                hello["client"] = self._name
            if "key" not in self._credential:
                # Only devices and users have subscriptions the server resumes itself.
                points = self._topics.resume_points(link)
                if points:
                    hello["resume"] = points
            try:
                async with asyncio.timeout(self._socket.open_timeout):
                    connected = await link.request(hello)
                    # The server answers this only after it has subscribed a device or
                    # user to its persistent topics: they are all known then.
                    await link.request({"op": "ping"})
            except RequestError as exc:
                if exc.code in ("unauthorized", "forbidden"):
                    close_code = 4001 if exc.code == "unauthorized" else 4003
                    raise FatalError(exc.detail, close_code=close_code, code=exc.code) from None
                raise ConnectionLost(f"connect failed: {exc}") from None
            self.client_id = connected.get("client_id")
            self.server = connected.get("server")
            self.device_id = connected.get("device_id")
            self.connections += 1
            link.ready = True
            self._online.set()
            await self._topics.resume(link)
            # Only a link that got this far resets the delays: one refused at once
            # (4009, too many connections) must not reconnect in a tight loop.
            self._backoff.reset()
            self._settle_first(None)
            await reader
            logger.info("connection to %s closed (%s)", self.url, link.close_code)
        finally:
            self._online.clear()
            if self._link is link:
                self._link = None
            link.lost(ConnectionLost("the connection closed"))
            if not reader.done():
                reader.cancel()
            await asyncio.wait({reader})
            if not reader.cancelled():
                reader.exception()  # retrieved; a fatal one is raised below
            with contextlib.suppress(Exception):
                await link.ws.close()
        if link.fatal is not None:
            raise link.fatal

    async def _dispatch(self, link: Link, frame: Frame) -> None:
        op = frame.get("op")
        if op == "message":
            sub = self._topics.live(link, (str(frame.get("channel")), frame.get("room") or ""))
            if sub is not None:
                await sub.offer(Message.from_frame(frame))
        elif op == "command":
            self._command(link, frame)
        elif frame.get("id") is not None:
            # An answer; one to a request nobody waits for any more changes nothing.
            if not link.answer(frame) and op == "error":
                logger.info("late error: %s: %s", frame.get("code"), frame.get("detail"))
        elif op == "subscribed":
            self._topics.server_subscribed(link, frame)
        elif op in ("closed", "unsubscribed"):
            sub = self._topics.get((str(frame.get("channel")), str(frame.get("room") or "")))
            if sub is not None:
                reason = "closed" if op == "closed" else "removed"
                self._topics.forget(sub, reason, notify=False)
        elif op == "error":
            link.last_error = frame
            logger.warning("herald error: %s: %s", frame.get("code"), frame.get("detail"))

    def _command(self, link: Link, frame: Frame) -> None:
        command_id = frame.get("command_id")
        if not isinstance(command_id, str):
            return
        command = Command(command_id, frame.get("payload"), frame.get("channel"))
        handler = self._handler
        if handler is None:
            logger.warning("command %s received, but no handler is set", command_id)
            return
        self._spawn(self._answer(link, handler, command))

    async def _answer(self, link: Link, handler: CommandHandler, command: Command) -> None:
        try:
            payload = await handler(command)
        except Exception:
            logger.exception("command handler failed on %s", command.id)
            return
        if command.channel is not None:
            return  # multicast: nobody waits for replies
        try:
            # On the link the command came on: a reply on another one would not count.
            await link.send({"op": "reply", "command_id": command.id, "payload": payload})
        except ConnectionLost:
            logger.info("reply to %s not sent: the connection closed", command.id)
