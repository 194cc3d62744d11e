"""Devices: registration, tags, uninstall, connections and persistent subscribers.

A device's ``connection_key`` is a key record (scope ``device``, id = the
device id), so it authenticates like any key and is revoked like one. Which
connection holds a device is recorded in the engine, so any worker can find
it; what a worker must do to a connection it holds (refresh its tags, close
it, subscribe it) travels as a control event to every worker.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Any

from herald.auth import DEVICE_SCOPE, Principal, can_edit, hash_key, new_key, require_scope
from herald.errors import (
    BadRequest,
    CloseCode,
    Forbidden,
    Gone,
    HeraldError,
    NotFound,
    Unauthorized,
)
from herald.models import Device, KeyRecord, Topic, check_name
from herald.registration import apply_fields, parse_registration, parse_selector
from herald.subscriptions import Client
from herald.tags import change_tags

if TYPE_CHECKING:
    from herald.node import Node

__all__ = ["Devices"]

logger = logging.getLogger("herald.devices")


def _target(channel: str, room: str) -> str:
    # The same spelling as `herald.node.subscription_target`, from parts.
    return f"{channel}|{room}" if room else channel


class Devices:
    """The device operations of one worker, and the device connections it holds."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.engine = node.engine
        self.connected: dict[tuple[str, str], Client] = {}
        """(app, device id) → this worker's connection of that device."""

    # Registration

    async def register(self, principal: Principal, body: object) -> tuple[Device, str | None]:
        """Create or update the device with the body's (platform, address).

        Answers the device and, for a new one, its connection key (shown this once).
        """
        _require_server_admin(principal)
        fields = parse_registration(body)
        device = Device(
            id=f"dev_{secrets.token_hex(8)}",
            app=principal.app,
            address=fields["address"],
            platform=fields["platform"],
        )
        apply_fields(device, fields)
        existing = await self.engine.add_device(device)
        if existing is None:
            key = new_key()
            try:
                await self.engine.add_key(
                    KeyRecord(
                        id=device.id,
                        app=device.app,
                        scopes=(DEVICE_SCOPE,),
                        key_hash=hash_key(key),
                        name=device.id,
                    )
                )
            except BaseException:
                await self.engine.delete_device(device.app, device.id)
                raise
            return device, key
        updated = await self.engine.update_device(
            existing.app, existing.id, lambda stored: apply_fields(stored, fields)
        )
        if updated is None:  # uninstalled between the two steps
            raise NotFound("Not found")
        await self._changed(updated[0])
        return updated[0], None

    async def get(self, principal: Principal, device_id: str) -> Device:
        """One device of the principal's app: for app admins, and for the device itself."""
        if not (principal.is_device and principal.id == device_id):
            _require_server_admin(principal)
        device = await self.engine.get_device(principal.app, device_id)
        if device is None:
            raise NotFound("Not found")
        return device

    async def _find(self, principal: Principal, selector: object, path: str) -> Device:
        device_id, address = parse_selector(selector, path)
        if device_id is not None:
            device = await self.engine.get_device(principal.app, device_id)
        else:
            assert address is not None
            device = await self.engine.find_device(principal.app, *address)
        if device is None:
            raise NotFound("Not found")
        return device

    async def change_tags(
        self, principal: Principal, body: object
    ) -> tuple[Device, list[dict[str, str]]]:
        """Apply ``add``/``remove``/``set`` to one device's tags; answers the warnings."""
        _require_server_admin(principal)
        if not isinstance(body, dict) or "audience" not in body:
            raise BadRequest(
                "audience names the device: {device_id} or {address, platform}", path="audience"
            )
        device = await self._find(principal, body["audience"], "audience")
        change = {k: v for k, v in body.items() if k != "audience"}

        def apply(stored: Device) -> list[dict[str, str]]:
            stored.tags, warnings = change_tags(stored.tags, change)
            return warnings

        updated = await self.engine.update_device(device.app, device.id, apply)
        if updated is None:
            raise NotFound("Not found")
        await self._changed(updated[0])
        return updated

    async def _changed(self, device: Device) -> None:
        await self.engine.broadcast(
            {"type": "device_changed", "app": device.app, "device": device.to_record()}
        )

    async def uninstall(self, principal: Principal, body: object) -> Device:
        """Forget a device: its key stops working, its subscriptions go, and the
        connection holding it (on whichever worker) is closed with 4001."""
        _require_server_admin(principal)
        device = await self._find(principal, body, "device")
        app = device.app
        await self.engine.delete_key(app, device.id)
        await self.engine.broadcast({"type": "key_deleted", "app": app, "id": device.id})
        subscriber = f"device:{device.id}"
        for target in await self.engine.subscriptions(app, subscriber):
            await self.engine.remove_subscription(app, target, subscriber)
        await self.engine.delete_device(app, device.id)
        await self.engine.broadcast({"type": "device_removed", "app": app, "device_id": device.id})
        return device

    # Connections

    async def connect(self, client: Client, principal: Principal) -> None:
        """Make ``client`` the connection of the device ``principal`` is; the engine
        learns where it is. `Unauthorized` if the device was uninstalled meanwhile."""
        device = await self.engine.get_device(principal.app, principal.id)
        if device is None:
            raise Unauthorized("invalid credentials")
        client.device = device
        self.connected[(device.app, device.id)] = client
        await self.engine.set_connection(device.app, device.id, client.client_id)

    async def disconnect(self, client: Client) -> None:
        """Forget a closed device connection, unless a newer one holds the device now."""
        device = client.device
        if device is None:
            return
        key = (device.app, device.id)
        if self.connected.get(key) is client:
            del self.connected[key]
        try:
            await self.engine.clear_connection(device.app, device.id, client.client_id)
        except HeraldError as exc:  # the worker's presence lapses, and with it this entry
            logger.warning("could not clear the connection of %s: %s", device.id, exc.detail)

    def on_control(self, event: dict[str, Any]) -> None:
        """Act on device events for the device connections this worker holds."""
        kind = event.get("type")
        if kind == "device_changed":
            record = event["device"]
            client = self.connected.get((record["app"], record["id"]))
            if client is not None:
                client.device = Device.from_record(record)
        elif kind == "device_removed":
            client = self.connected.pop((event["app"], event["device_id"]), None)
            if client is not None:
                client.send({"op": "error", "code": "unauthorized", "detail": "uninstalled"})
                client.close(CloseCode.UNAUTHORIZED, "device uninstalled")
        elif kind in ("device_subscribed", "device_unsubscribed"):
            client = self.connected.get((event["app"], event["device_id"]))
            if client is not None:
                topic = Topic(event["app"], event["channel"], event["room"])
                if kind == "device_subscribed":
                    self.node.subscriptions.spawn(self._follow(client, topic))
                else:
                    self.node.subscriptions.spawn(self._unfollow(client, topic))

    async def _follow(self, client: Client, topic: Topic) -> None:
        try:
            await self.node.subscriptions.add(client, topic, None)
        except HeraldError as exc:
            logger.info("could not subscribe %s to %s: %s", client.client_id, topic, exc.detail)

    async def _unfollow(self, client: Client, topic: Topic) -> None:
        if await self.node.subscriptions.remove(client, topic):
            client.send({"op": "unsubscribed", "channel": topic.channel, "room": topic.room})

    # Persistent subscribers of a channel

    async def _subscriber_request(
        self, principal: Principal, name: str, body: object
    ) -> tuple[Topic, Device]:
        channel = await self.node.channel(principal, name)
        if not can_edit(principal, channel):
            raise Forbidden(f"this credential may not manage subscribers of {name!r}")
        if not isinstance(body, dict):
            raise BadRequest("the body must be {device_id} or {connection_key}")
        unknown = sorted(set(body) - {"device_id", "connection_key", "room"})
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}", path=unknown[0])
        topic = channel.topic(channel.check_room(body.get("room")))
        if ("device_id" in body) == ("connection_key" in body):
            raise BadRequest("give one of device_id and connection_key", path="device_id")
        if "connection_key" in body:
            key = body["connection_key"]
            record = await self.engine.find_key(hash_key(key)) if isinstance(key, str) else None
            if record is None or record.scopes[0] != DEVICE_SCOPE or record.app != channel.app:
                raise NotFound("no device has this connection_key", path="connection_key")
            device_id = record.id
        else:
            device_id = check_name(body["device_id"], "device_id")
        device = await self.engine.get_device(channel.app, device_id)
        if device is None:
            raise NotFound("Not found", path="device_id")
        if channel.is_inactive:
            raise Gone(f"channel {name!r} is closed")
        return topic, device

    async def add_subscriber(
        self, principal: Principal, name: str, body: object
    ) -> tuple[dict[str, Any], bool]:
        """Make a device a persistent subscriber (live at once if it is connected);
        answers the entry and whether it is new."""
        topic, device = await self._subscriber_request(principal, name, body)
        added = await self.engine.add_subscription(
            topic.app, _target(topic.channel, topic.room), f"device:{device.id}"
        )
        await self.engine.broadcast(
            {
                "type": "device_subscribed",
                "app": topic.app,
                "device_id": device.id,
                "channel": topic.channel,
                "room": topic.room,
            }
        )
        return await self._entry(device, topic.room), added

    async def remove_subscriber(
        self, principal: Principal, name: str, body: object
    ) -> dict[str, Any]:
        """Stop a device's persistent subscription; it stops receiving at once."""
        topic, device = await self._subscriber_request(principal, name, body)
        removed = await self.engine.remove_subscription(
            topic.app, _target(topic.channel, topic.room), f"device:{device.id}"
        )
        if not removed:
            raise NotFound(f"device {device.id!r} does not subscribe to {name!r}")
        await self.engine.broadcast(
            {
                "type": "device_unsubscribed",
                "app": topic.app,
                "device_id": device.id,
                "channel": topic.channel,
                "room": topic.room,
            }
        )
        return await self._entry(device, topic.room)

    async def list_subscribers(self, principal: Principal, name: str) -> list[dict[str, Any]]:
        """Every persistent subscriber of a channel; devices say whether they are
        ``active`` (connected somewhere and opted in)."""
        channel = await self.node.channel(principal, name)
        if not can_edit(principal, channel):
            raise Forbidden(f"this credential may not manage subscribers of {name!r}")
        subscribers = await self.engine.subscribers(channel.app, channel.name)
        device_ids = [s.partition(":")[2] for s in subscribers if s.startswith("device:")]
        online = await self.engine.connections(channel.app, device_ids)
        entries: list[dict[str, Any]] = []
        for subscriber in subscribers:
            kind, _, ident = subscriber.partition(":")
            if kind == "device":
                device = await self.engine.get_device(channel.app, ident)
                active = device is not None and device.opt_in and ident in online
                entries.append({"type": "device", "device_id": ident, "active": active})
            else:
                entries.append({"type": kind, "user_id": ident})
        return entries

    async def _entry(self, device: Device, room: str) -> dict[str, Any]:
        online = await self.engine.connections(device.app, [device.id])
        return {
            "type": "device",
            "device_id": device.id,
            "room": room,
            "active": device.opt_in and device.id in online,
        }


def _require_server_admin(principal: Principal) -> None:
    if principal.is_user or principal.is_device:
        raise Forbidden("devices are managed with an admin key")
    require_scope(principal, "admin")
