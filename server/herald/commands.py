"""Commands to devices, and their replies, across workers.

A command to one device goes to the worker whose connection holds it (found
in the engine) as a control event; the device's ``reply`` comes back the
same way to the worker whose HTTP caller waits for it. Each connection
remembers the commands it was sent and not yet answered, so a reply to a
command it never got, or a second reply, goes nowhere; the waiting side
also checks the replying device, and drops replies that come too late.
A command to ``chref:<ref>`` goes to every connected device subscriber of
that channel, and nobody waits for replies.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from herald.auth import Principal, hash_key, require_scope
from herald.channels import payload_size
from herald.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    GatewayTimeout,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
)
from herald.protocol import Reply
from herald.subscriptions import Client

if TYPE_CHECKING:
    from herald.node import Node

__all__ = ["Commands"]

logger = logging.getLogger("herald.commands")

_DEFAULT_TIMEOUT_MS = 5000
_MAX_TIMEOUT_MS = 60_000
CHREF = "chref:"


@dataclass(slots=True)
class _Waiting:
    app: str
    device_id: str
    reply: asyncio.Future[Any]


def _parse(body: object, max_payload: int) -> tuple[Any, float]:
    if not isinstance(body, dict):
        raise BadRequest("the body must be {payload, timeout_ms?}")
    unknown = sorted(set(body) - {"payload", "timeout_ms"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", path=unknown[0])
    if "payload" not in body:
        raise BadRequest("payload is required", path="payload")
    if payload_size(body["payload"], "payload") > max_payload:
        raise PayloadTooLarge(f"payload is larger than {max_payload} bytes", path="payload")
    timeout = body.get("timeout_ms", _DEFAULT_TIMEOUT_MS)
    if isinstance(timeout, bool) or not isinstance(timeout, int):
        raise BadRequest("timeout_ms must be an integer", path="timeout_ms")
    if not 1 <= timeout <= _MAX_TIMEOUT_MS:
        raise BadRequest(f"timeout_ms must be from 1 to {_MAX_TIMEOUT_MS}", path="timeout_ms")
    return body["payload"], timeout / 1000


class Commands:
    """The commands this worker sends, delivers and waits on."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.engine = node.engine
        self._waiting: dict[str, _Waiting] = {}

    async def send(self, principal: Principal, target: str, body: object) -> dict[str, Any]:
        """``POST /v1/devices/{target}/commands``: the device's reply, or for
        ``chref:<ref>`` the multicast's acceptance."""
        if principal.is_user or principal.is_device:
            raise Forbidden("commands are sent with a server key")
        payload, timeout = _parse(body, self.node.settings.max_payload_bytes)
        command_id = f"cmd_{secrets.token_hex(8)}"
        if target.startswith(CHREF):
            channel = await self._channel_of_ref(principal, target[len(CHREF) :])
            await self.engine.broadcast(
                {
                    "type": "command",
                    "app": principal.app,
                    "channel": channel,
                    "command_id": command_id,
                    "payload": payload,
                }
            )
            return {"command_id": command_id, "delivered": "accepted"}
        require_scope(principal, "publish")
        device = await self.engine.get_device(principal.app, target)
        if device is None:
            raise NotFound("Not found")
        client_id = (await self.engine.connections(device.app, [device.id])).get(device.id)
        if client_id is None:
            raise Conflict(f"device {device.id!r} is not connected", code="not_connected")
        if not device.opt_in:
            raise Conflict(f"device {device.id!r} has opted out", code="opted_out")
        waiting = _Waiting(device.app, device.id, asyncio.get_running_loop().create_future())
        self._waiting[command_id] = waiting
        try:
            await self.engine.broadcast(
                {
                    "type": "command",
                    "app": device.app,
                    "device_id": device.id,
                    "client_id": client_id,
                    "command_id": command_id,
                    "payload": payload,
                    "origin": self.node.name,
                    "timeout": timeout,
                }
            )
            async with asyncio.timeout(timeout):
                reply = await waiting.reply
        except TimeoutError:
            raise GatewayTimeout(
                f"device {device.id!r} did not reply within {int(timeout * 1000)} ms"
            ) from None
        finally:
            del self._waiting[command_id]
        return {"command_id": command_id, "device_id": device.id, "reply": reply}

    async def _channel_of_ref(self, principal: Principal, ref: str) -> str:
        record = await self.engine.find_key(hash_key(ref)) if ref else None
        if record is None or record.scopes[0] != "ref" or record.app != principal.app:
            raise NotFound("Not found")
        return record.name

    def on_control(self, event: dict[str, Any]) -> None:
        """Deliver commands to the device connections held here; settle replies
        to the commands sent from here."""
        kind = event.get("type")
        if kind == "command":
            if "channel" in event:
                self._multicast(event)
            else:
                self._deliver(event)
        elif kind == "reply" and event.get("origin") == self.node.name:
            if event.get("refused"):
                self._refuse(event["command_id"])
            else:
                self._settle(
                    event["command_id"], event["app"], event["device_id"], event["payload"]
                )

    def _deliver(self, event: dict[str, Any]) -> None:
        client = self.node.devices.connected.get((event["app"], event["device_id"]))
        if client is None or client.client_id != event["client_id"]:
            return  # not here (or no longer): the caller times out
        now = asyncio.get_running_loop().time()
        commands = client.state.commands
        for command_id in [c for c, (_, until) in commands.items() if until <= now]:
            del commands[command_id]  # nobody waits for these any more
        if len(commands) >= self.node.settings.max_pending_commands:
            self.node.subscriptions.spawn(
                self.engine.broadcast({**event, "type": "reply", "refused": True, "payload": None})
            )
            return
        commands[event["command_id"]] = (event["origin"], now + event["timeout"])
        client.send(
            {"op": "command", "command_id": event["command_id"], "payload": event["payload"]}
        )

    def _multicast(self, event: dict[str, Any]) -> None:
        frame = {
            "op": "command",
            "command_id": event["command_id"],
            "payload": event["payload"],
            "channel": event["channel"],
        }
        subscriptions = self.node.subscriptions
        sent: set[int] = set()
        for topic in subscriptions.topics(event["app"], event["channel"]):
            for client in subscriptions.listeners(topic):
                device = client.device
                if device is not None and device.opt_in and id(client) not in sent:
                    sent.add(id(client))  # once per device, however many rooms it is in
                    client.send(frame)

    async def reply(self, client: Client, request: Reply) -> None:
        """A device's ``reply``: hand it to the worker that waits, if any does."""
        pending = client.state.commands.pop(request.command_id, None)
        device = client.device
        if pending is None or device is None:
            logger.debug(
                "reply %s from %s matches no command", request.command_id, client.client_id
            )
            return
        origin = pending[0]
        if origin == self.node.name:
            self._settle(request.command_id, device.app, device.id, request.payload)
            return
        await self.engine.broadcast(
            {
                "type": "reply",
                "app": device.app,
                "device_id": device.id,
                "command_id": request.command_id,
                "payload": request.payload,
                "origin": origin,
            }
        )

    def _refuse(self, command_id: str) -> None:
        waiting = self._waiting.get(command_id)
        if waiting is not None and not waiting.reply.done():
            limit = self.node.settings.max_pending_commands
            waiting.reply.set_exception(
                TooManyRequests(
                    f"device {waiting.device_id!r} has {limit} commands unanswered already",
                    code="too_many_pending_commands",
                )
            )

    def _settle(self, command_id: str, app: str, device_id: str, payload: Any) -> None:
        waiting = self._waiting.get(command_id)
        if waiting is None or waiting.reply.done():
            return  # late or duplicate
        if (waiting.app, waiting.device_id) != (app, device_id):
            logger.warning("reply to %s from the wrong device %s ignored", command_id, device_id)
            return
        waiting.reply.set_result(payload)
