"""The Redis engine: many workers and nodes share one Redis.

Layout (``T`` is the topic tag ``{app|channel|room}``, a Redis Cluster hash tag,
so a topic's keys and its pub/sub channel live on one shard):

- ``herald:T:s``  the history stream (XADD MAXLEN history_size + 1: once
  anything was trimmed, its oldest entry is the trim point, see `_PUBLISH_TOPIC`)
- ``herald:T:m``  hash: ``epoch`` of this incarnation of the stream, ``dropped``
  (the newest id of a stream that expired or was lost), ``last`` (the newest
  id, where the stream can expire), ``seen`` (the topic was published to)
- ``herald:T``    the pub/sub channel; each message is a MessagePack
  ``[ids, [body, ...]]``
- records (channels, keys, apps): see `herald.engines.redis_records`

Publishing is one Lua script: XADD (which trims), PUBLISH of the same
bodies, so the id exists before anyone receives the message. Pub/sub runs on
a connection of its own with no silent retries: when it drops, the engine
reconnects with backoff, resubscribes every wanted topic and replays from the
streams whatever was published meanwhile, so connected clients miss nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgpack
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from herald.codec import packb
from herald.engines.base import ControlHandler, Engine, MessageHandler, decide_recovery
from herald.engines.redis_batch import PublishBatcher, Submission, WirePublishBatcher
from herald.engines.redis_devices import RedisDevices
from herald.engines.redis_links import Links, PubSubLink
from herald.engines.redis_records import RedisRecords
from herald.engines.redis_wire import endpoint_from_url
from herald.errors import Unavailable
from herald.models import (
    Channel,
    Message,
    Recovery,
    StreamPosition,
    Topic,
    now_rfc3339,
    offset_key,
)

__all__ = ["RedisEngine", "publish_script"]

logger = logging.getLogger("herald.redis")

# One topic's publish: an XADD per body, trimmed as it goes, and one PUBLISH of them all.
# The topic's bodies are ARGV[first..last], in order.
#
# A stream keeps one entry more than the history it serves: once anything was trimmed
# from it (Redis counts `entries-added`), its oldest entry is the trim point, the newest
# id gone: recovery (`_TRIM_POINT`) answers from it without replaying it, and history
# reads given the channel's size leave it out. So a publish writes no bookkeeping of its
# own: the XADD trims and the trim point moves with it, where a separate XRANGE, XTRIM
# and HSET cost more than the XADD and the PUBLISH.
_PUBLISH_TOPIC = """
-- A MessagePack array header for n elements.
local function array(n)
  if n < 16 then return string.char(144 + n) end
  if n < 65536 then return string.char(220, math.floor(n / 256), n % 256) end
  return string.char(221, math.floor(n / 16777216), math.floor(n / 65536) % 256,
    math.floor(n / 256) % 256, n % 256)
end

local function publish(stream, meta, epoch, maxlen, ttl, channel, grace, first, last)
  local n = last - first + 1
  -- NOMKSTREAM: the first XADD tells whether the stream exists, and XLEN costs a call.
  local id = redis.call('XADD', stream, 'NOMKSTREAM', 'MAXLEN', maxlen + 1, '*', 'm', ARGV[first])
  local fresh = not id
  if fresh then id = redis.call('XADD', stream, 'MAXLEN', maxlen + 1, '*', 'm', ARGV[first]) end
  local ids = {id}
  for i = first + 1, last do
    ids[#ids + 1] = redis.call('XADD', stream, 'MAXLEN', maxlen + 1, '*', 'm', ARGV[i])
  end
  if fresh then
    -- The topic's first publish, or its stream expired (history_ttl) or was lost: then
    -- everything before this stream is gone, which 'seen' (or an older 'last') tells.
    -- Every publish writes 'last' while the channel has a history_ttl, so then it names
    -- the newest id that went; otherwise this stream's first id is the safe answer.
    redis.call('HSETNX', meta, 'epoch', epoch)
    local gone = redis.call('HGET', meta, 'last')
    if redis.call('HSETNX', meta, 'seen', 1) == 0 or gone then
      redis.call('HSET', meta, 'dropped', (ttl > 0 and gone) or ids[1])
    end
  end
  if ttl > 0 then
    redis.call('HSET', meta, 'last', ids[#ids])
    redis.call('EXPIRE', stream, ttl)
    redis.call('EXPIRE', meta, ttl + grace)
  end
  -- One PUBLISH for the whole group, one MessagePack document: [ids, [body, ...]]. The
  -- bodies are MessagePack already, so the array of them is their concatenation behind
  -- a header, and every worker unpacks the whole group in one call.
  redis.call('PUBLISH', channel,
    array(2) .. cmsgpack.pack(ids) .. array(n) .. table.concat(ARGV, '', first, last))
  return ids
end
"""

_PUBLISH = (
    _PUBLISH_TOPIC
    + """
-- KEYS: stream, meta. ARGV: epoch candidate, maxlen, ttl, pub/sub channel, meta grace,
-- then one message body per message, all for this one topic, in order.
return publish(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4],
  tonumber(ARGV[5]), 6, #ARGV)
"""
)

# Several topics in one call, for one Redis (a cluster's keys of one call must share a
# slot). Each call costs Redis some microseconds before the first command runs; with
# one message per topic that was most of a publish. Each topic's channel counter
# (`counts.messages`) goes up here too: a command of its own cost the worker more than
# the script.
_PUBLISH_MANY = (
    # The shebang makes Redis refuse the call before it runs when out of memory, rather
    # than fail its first write with some topics of the call published and the call
    # answered as failed (that would make retries publish them twice).
    "#!lua\n"
    + _PUBLISH_TOPIC
    + """
-- KEYS: stream, meta and counter hash of each topic. ARGV: epoch candidate, then per
-- topic: maxlen, ttl, pub/sub channel, meta grace, counter field, message count and
-- that many bodies. Answers each topic's ids, in order.
local results, at = {}, 2
for t = 1, #KEYS / 3 do
  local count = tonumber(ARGV[at + 5])
  results[t] = publish(KEYS[3 * t - 2], KEYS[3 * t - 1], ARGV[1], tonumber(ARGV[at]),
    tonumber(ARGV[at + 1]), ARGV[at + 2], tonumber(ARGV[at + 3]), at + 6, at + 5 + count)
  redis.call('HINCRBY', KEYS[3 * t], ARGV[at + 4], count)
  at = at + 6 + count
end
return results
"""
)

# The trim point of a stream (see `_PUBLISH_TOPIC`): its oldest entry's id once Redis
# trimmed anything from it, else nil. Recovery does not replay that entry.
_TRIM_POINT = """
local function trim_point(stream)
  if redis.call('EXISTS', stream) == 0 then return nil end
  local info = redis.call('XINFO', 'STREAM', stream)
  local length, added, first = 0, 0, nil
  for i = 1, #info, 2 do
    local name = info[i]
    if name == 'length' then length = info[i + 1]
    elseif name == 'entries-added' then added = info[i + 1]
    elseif name == 'first-entry' and info[i + 1] then first = info[i + 1][1]
    end
  end
  if added > length then return first end
  return nil
end
"""

# Reads everything recovery needs in one atomic step: epoch, trim point, newest id and
# the entries from `since` on (inclusive, so the caller can tell whether `since` exists).
_RECOVER = (
    _TRIM_POINT
    + """
redis.call('HSETNX', KEYS[2], 'epoch', ARGV[2])
local meta = redis.call('HMGET', KEYS[2], 'epoch', 'dropped', 'last')
local dropped = meta[2] or '0-0'
local last = dropped
local point = trim_point(KEYS[1])
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #newest > 0 then
  last = newest[1][1]
  if point then dropped = point end
elseif meta[3] then
  -- The stream expired: everything up to its newest id went with it.
  dropped, last = meta[3], meta[3]
end
local entries = {}
if ARGV[1] ~= '' then
  entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+')
  if point and #entries > 0 and entries[1][1] == point then table.remove(entries, 1) end
end
return {meta[1], dropped, last, entries}
"""
)

# History between exclusive bounds. ARGV: low, high, count, '1' for newest first, and
# the history size (0: unknown): a stream holds one entry more once it is full (the trim
# point), and more while a smaller history_size waits for the next publish to trim.
_HISTORY = """
local limit, size = tonumber(ARGV[3]), tonumber(ARGV[5])
local count, past = limit, 0
if size > 0 then past = redis.call('XLEN', KEYS[1]) - size end
local gone = {}
if past > 0 then
  for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', past)) do
    gone[entry[1]] = true
  end
  count = count + past
end
local entries
if ARGV[4] == '1' then
  entries = redis.call('XREVRANGE', KEYS[1], ARGV[2], ARGV[1], 'COUNT', count)
else
  entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', count)
end
local kept = {}
for _, entry in ipairs(entries) do
  if not gone[entry[1]] and #kept < limit then kept[#kept + 1] = entry end
end
return kept
"""

# The per-topic hash (epoch, trim point) outlives an expiring stream by this long, so
# that a client coming back within it is told its history expired.
_META_GRACE = 7 * 86400
_BACKOFF_MAX = 5.0
_CLOSE_TIMEOUT = 2.0
_MAX_TOPIC_NAMES = 100_000  # topics whose key names a worker keeps ready
_MAX_CONNECTIONS = 64  # command connections per worker (pub/sub has its own)
_CONFIRM_TIMEOUT = 5.0  # seconds Redis has to confirm a SUBSCRIBE
_CONTROL = b"herald:control"
_MESSAGE = (b"message", b"smessage")
_SUBSCRIBED = (b"subscribe", b"ssubscribe")
_UNSUBSCRIBED = (b"unsubscribe", b"sunsubscribe")


# A topic's stream and meta keys, pub/sub channel, and its channel's message counter.
_TopicNames = tuple[tuple[str, str], str, tuple[str, str]]


def _tag(topic: Topic) -> str:
    return f"herald:{{{topic.app}|{topic.channel}|{topic.room}}}"


def _body(message: Message) -> bytes:
    return packb(message.fields())


def _message(message_id: str, body: bytes) -> Message:
    app, channel, room, payload, author, created_at, metadata, audience = msgpack.unpackb(
        body, raw=False
    )
    return Message(message_id, app, channel, room, payload, author, created_at, metadata, audience)


def _entries(raw: list[Any]) -> list[Message]:
    return [
        _message(entry_id.decode(), fields[b"m"] if isinstance(fields, dict) else fields[1])
        for entry_id, fields in raw
    ]


@dataclass(slots=True)
class _Subscription:
    """A topic this worker listens to: the newest id delivered, and a buffer while catching up."""

    topic: Topic
    last: tuple[int, int] = (0, 0)
    catching_up: list[Message] | None = None


def publish_script(command: str = "PUBLISH") -> str:
    """The publish script; ``SPUBLISH`` makes it publish on the topic's shard only."""
    return _PUBLISH.replace("'PUBLISH'", f"'{command}'")


class RedisEngine(RedisRecords, RedisDevices, Engine):
    """Engine backed by one Redis server (Redis >= 7)."""

    def __init__(self, url: str) -> None:
        self.url = url
        # A bounded pool that makes callers wait for a connection rather than fail:
        # a burst of subscribes must not turn into "unavailable".
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=_MAX_CONNECTIONS,
            timeout=5,
            socket_connect_timeout=2,
            socket_timeout=5,
        )
        self.redis: Redis = Redis(connection_pool=pool)
        self._batcher: PublishBatcher = WirePublishBatcher(
            self.redis, _PUBLISH_MANY, endpoint_from_url(url)
        )
        self._setup()

    def _setup(self) -> None:
        # The part of construction both this engine and the cluster engine share.
        self._recover_script = self.redis.register_script(_RECOVER)
        self._history_script = self.redis.register_script(_HISTORY)
        self._on_message: MessageHandler | None = None
        self._on_control: ControlHandler | None = None
        self._subs: dict[bytes, _Subscription] = {}
        # A topic's key names, built once: four strings a message cost more than the
        # rest of queueing it. Cleared whole when full, like the channel cache.
        self._topic_names: dict[tuple[str, str, str], _TopicNames] = {}
        self._links: Links | None = None
        self._opening: Links | None = None
        self._listener: asyncio.Task[None] | None = None
        self._confirming: dict[bytes, asyncio.Future[None]] = {}
        self._leaving: Counter[bytes] = Counter()
        self._ever_connected = False
        self._connected = asyncio.Event()
        self._closed = False

    # Lifecycle

    async def start(
        self, on_message: MessageHandler, on_control: ControlHandler | None = None
    ) -> None:
        """Connect the pub/sub link, then keep it up (reconnecting) in the background.

        If Redis cannot be reached now, the worker still starts: it answers 503
        and reports not ready until the background reconnect succeeds.
        """
        self._on_message = on_message
        self._on_control = on_control
        try:
            await self._connect_pubsub()
        except Exception as exc:
            logger.warning("Redis is not reachable at start: %s", exc)
            await self._drop_pubsub()
        self._listener = asyncio.create_task(self._listen())

    async def close(self) -> None:
        """Stop listening and close both connections (bounded: never hangs a shutdown)."""
        self._closed = True
        self._on_message = None
        self._on_control = None
        if self._listener is not None:
            self._listener.cancel()
            # wait(), not await: the listener's own end (cancelled) must not look like ours.
            await asyncio.wait([self._listener], timeout=_CLOSE_TIMEOUT)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._drop_pubsub()
                await self._batcher.close()
                await self.redis.aclose()

    async def ping(self) -> None:
        """Ready when commands and the pub/sub link both work."""
        if not self._connected.is_set():
            raise Unavailable("the pub/sub link to Redis is down")
        async with self._guard():
            await self.redis.ping()

    # Messages

    async def publish(self, channel: Channel, message: Message) -> Message:
        """The publish script (XADD, trim bookkeeping, PUBLISH), pipelined with others.

        Queued synchronously, before the first await: publishes started in some
        order reach Redis in that order. Fills in the message's id and created_at.
        """
        [stored] = await self.publish_many([(channel, message)])
        return stored

    async def publish_many(self, items: list[tuple[Channel, Message]]) -> list[Message]:
        """Queue every publish at once: one script call per topic carries them all."""
        created_at = now_rfc3339()
        submissions = []
        known = self._topic_names
        for channel, message in items:
            message.created_at = created_at
            topic = (message.app, message.channel, message.room)
            names = known.get(topic)
            if names is None:
                if len(known) >= _MAX_TOPIC_NAMES:
                    known.clear()
                tag = _tag(message.topic)
                counter = (f"herald:{{{channel.app}}}:chn", channel.name)
                names = known[topic] = ((f"{tag}:s", f"{tag}:m"), tag, counter)
            keys, tag, counter = names
            submissions.append(
                Submission(
                    keys,
                    (channel.history_size, channel.history_ttl or 0, tag, _META_GRACE),
                    _body(message),
                    counter,
                )
            )
        await self._batcher.submit(submissions)
        for (_, message), submission in zip(items, submissions, strict=True):
            message.id = submission.id
        return [message for _, message in items]

    async def subscribe(self, topic: Topic) -> None:
        """SUBSCRIBE on the pub/sub link (or, while it is down, when it comes back)."""
        tag = _tag(topic).encode()
        if tag in self._subs:
            return
        sub = self._subs[tag] = _Subscription(topic)
        try:
            async with self._guard():
                links = self._links
                if links is not None:
                    # Redis confirms a SUBSCRIBE on the link once it is in force; reading
                    # the position before that could miss what is published meanwhile.
                    confirmed = self._confirming[tag] = asyncio.get_running_loop().create_future()
                    await links.subscribe([tag])
                    try:
                        async with asyncio.timeout(_CONFIRM_TIMEOUT):
                            await confirmed
                    except TimeoutError:
                        raise Unavailable("Redis did not confirm a subscription") from None
                # Only what comes after this point is new to this worker's subscribers;
                # a replay after a reconnect starts from here.
                position = await self.position(topic)
        except BaseException:
            self._subs.pop(tag, None)
            self._confirming.pop(tag, None)
            raise
        sub.last = max(sub.last, offset_key(position.offset))

    async def unsubscribe(self, topic: Topic) -> None:
        """UNSUBSCRIBE; the listener drops anything still in flight for it."""
        tag = _tag(topic).encode()
        if self._subs.pop(tag, None) is None:
            return
        if self._links is not None:
            self._leaving[tag] += 1
            with contextlib.suppress(RedisError, OSError):
                await self._links.unsubscribe(tag)

    async def history(
        self,
        topic: Topic,
        *,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
        reverse: bool = False,
        size: int | None = None,
    ) -> list[Message]:
        """XRANGE / XREVRANGE with exclusive bounds (and the oldest entries past ``size``)."""
        if limit <= 0:
            return []
        key = f"{_tag(topic)}:s"
        low = f"({since}" if since is not None else "-"
        high = f"({until}" if until is not None else "+"
        async with self._guard():
            raw = await self._history_script(
                keys=[key], args=[low, high, limit, "1" if reverse else "0", size or 0]
            )
        return _entries(raw)

    async def recover(self, topic: Topic, since: str, epoch: str | None = None) -> Recovery:
        """One script reads the epoch, trim point, newest id and the entries after ``since``."""
        tag = _tag(topic)
        async with self._guard():
            current, dropped, last, raw = await self._recover_script(
                keys=[f"{tag}:s", f"{tag}:m"], args=[since, secrets.token_hex(4)]
            )
        entries = _entries(raw)
        since_retained = bool(entries) and entries[0].id == since
        if since_retained:
            entries = entries[1:]
        position = StreamPosition(last.decode(), current.decode())
        recovered = decide_recovery(
            since, epoch, position, dropped=dropped.decode(), since_retained=since_retained
        )
        return Recovery(entries, recovered, position)

    async def position(self, topic: Topic) -> StreamPosition:
        """The newest id and the epoch (created here if the topic has none yet)."""
        tag = _tag(topic)
        async with self._guard():
            current, _, last, _ = await self._recover_script(
                keys=[f"{tag}:s", f"{tag}:m"], args=["", secrets.token_hex(4)]
            )
        return StreamPosition(last.decode(), current.decode())

    # Pub/sub listener

    async def _listen(self) -> None:
        backoff = 0.05
        while not self._closed:
            try:
                if self._links is None:
                    await self._connect_pubsub()
                backoff = 0.05
                assert self._links is not None
                while True:
                    for raw in await self._links.get():
                        self._handle(raw)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the link: reconnect from scratch
                if self._connected.is_set():
                    logger.warning("pub/sub link to Redis lost: %s", exc)
                self._connected.clear()
                await self._drop_pubsub()
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def _new_links(self) -> Links:
        """The pub/sub connections this engine listens on (one, to its one Redis)."""
        return PubSubLink(self.url)

    async def _connect_pubsub(self) -> None:
        links = self._opening = self._new_links()
        # Always subscribed to the control channel, so the link exists even with no topics.
        await links.open(_CONTROL)
        await self._confirmations(links, {_CONTROL})
        # Set first: a subscribe() from now on goes straight to the new link.
        self._links, self._opening = links, None
        done: set[bytes] = set()
        while batch := [tag for tag in self._subs if tag not in done]:
            for tag in batch:
                self._subs[tag].catching_up = []
            await links.subscribe(batch)
            # In force before the replay reads the streams: nothing falls in between.
            await self._confirmations(links, set(batch))
            done.update(batch)
        # Anything published while the link was down is in the streams: replay it.
        for tag in done:
            sub = self._subs.get(tag)
            if sub is not None:
                await self._catch_up(sub)
        if self._ever_connected and self._on_control is not None:
            # Control events published while the link was down are lost.
            self._on_control({"type": "resync"})
        self._ever_connected = True
        self._connected.set()
        logger.info("pub/sub link to Redis up (%d topics)", len(done))

    async def _confirmations(self, links: Links, tags: set[bytes]) -> None:
        """Read the links (the listener is not running) until Redis confirmed ``tags``."""
        async with asyncio.timeout(_CONFIRM_TIMEOUT):
            while tags:
                for raw in await links.get():
                    self._handle(raw)
                    if raw[0] in _SUBSCRIBED:
                        tags.discard(raw[1])

    def _handle(self, raw: list[Any]) -> None:
        # A RESP reply: [kind, channel, data or count].
        kind = raw[0]
        if kind in _MESSAGE:
            self._dispatch(raw[1], raw[2])
        elif kind in _SUBSCRIBED:
            confirmed = self._confirming.pop(raw[1], None)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
        elif kind in _UNSUBSCRIBED:
            tag = raw[1]
            if self._leaving[tag] > 0:
                self._leaving[tag] -= 1
                if not self._leaving[tag]:
                    del self._leaving[tag]
            elif kind == b"sunsubscribe" and tag in self._subs:
                # Redis Cluster ends a shard subscription itself when the slot moves to
                # another master: rebuild the links, which resubscribes on the new owner.
                raise ConnectionError("a shard channel's slot moved")

    async def _catch_up(self, sub: _Subscription) -> None:
        since = f"{sub.last[0]}-{sub.last[1]}"
        missed = await self.history(sub.topic, since=since, limit=1_000_000)
        buffered, sub.catching_up = sub.catching_up or [], None
        for message in missed + buffered:
            self._deliver(sub, message)

    async def _drop_pubsub(self) -> None:
        links, self._links = self._links or self._opening, None
        self._opening = None
        self._leaving.clear()
        confirming, self._confirming = self._confirming, {}
        for confirmed in confirming.values():
            if not confirmed.done():
                confirmed.set_exception(Unavailable("the pub/sub link to Redis is down"))
                confirmed.exception()  # retrieved, even if its subscriber gave up waiting
        if links is not None:
            await links.close()

    async def broadcast(self, event: dict[str, Any]) -> None:
        """PUBLISH on the control channel, which every worker's link listens to."""
        async with self._guard():
            await self.redis.publish(_CONTROL, msgpack.packb(event, use_bin_type=True))

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        sub = self._subs.get(channel)
        if sub is None:
            if channel == _CONTROL and self._on_control is not None:
                try:
                    event = msgpack.unpackb(data, raw=False)
                except Exception:  # not ours; never let it take the link down
                    logger.warning("ignored an unreadable control event")
                    return
                self._on_control(event)
            return
        # One document for the group ([ids, [body, ...]], each body a list of Message's
        # fields): one call unpacks it all. Unpacking each body apart cost a call, and
        # an Unpacker per message three times that (it allocates its own buffer).
        ids, bodies = msgpack.unpackb(data, raw=False)
        for message_id, body in zip(ids, bodies, strict=True):
            message = Message(message_id, *body)
            if sub.catching_up is not None:
                sub.catching_up.append(message)
            else:
                self._deliver(sub, message)

    def _deliver(self, sub: _Subscription, message: Message) -> None:
        key = offset_key(message.id)
        if key <= sub.last:
            return  # already delivered (a replay overlapping the live stream)
        sub.last = key
        if self._on_message is not None:
            self._on_message(message)
