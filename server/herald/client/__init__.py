"""An asyncio client for Herald, for devices and backends.

Subscribe over WebSocket and iterate messages; the client reconnects by itself
and resumes every subscription from the last id it saw, so the iterator never
shows a gap or a duplicate (and says so when the server could not recover
everything)::

    from herald.client import Client, HttpApi

    async with Client("ws://127.0.0.1:8000/v1/connect", key=KEY) as client:
        news = await client.subscribe("news")
        async for message in news:
            print(message.id, message.payload)

A device connects with its ``connection_key``, is subscribed to its persistent
channels at once (``client.subscriptions``) and answers commands::

    async with Client(URL, connection_key=DEVICE_KEY, encoding="msgpack") as device:

        @device.on_command
        async def blink(command):
            return {"ok": True}

        await device.wait_closed()

Backends publish and manage channels and devices over HTTP with `HttpApi`.
"""

from __future__ import annotations

from herald.client.connection import Client, CommandHandler
from herald.client.errors import (
    ClientClosed,
    ClientError,
    ConnectionLost,
    FatalError,
    HeraldHTTPError,
    RequestError,
)
from herald.client.frames import Backoff, Command, Gap, Message, Position
from herald.client.http import ChannelPage, HttpApi
from herald.client.subscription import GapHandler, Subscription

__all__ = [
    "Backoff",
    "ChannelPage",
    "Client",
    "ClientClosed",
    "ClientError",
    "Command",
    "CommandHandler",
    "ConnectionLost",
    "FatalError",
    "Gap",
    "GapHandler",
    "HeraldHTTPError",
    "HttpApi",
    "Message",
    "Position",
    "RequestError",
    "Subscription",
]
