"""The device half of the HTTP API: devices, their tags and commands, channel subscribers."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from herald.api import authenticate, node_of, read_body, respond
from herald.errors import BadRequest

__all__ = ["routes"]


async def register_device(request: Request) -> Response:
    """``POST /v1/devices``: 201 with the ``connection_key`` (shown once) for a new
    device, 200 for one already registered with that (platform, address)."""
    principal = await authenticate(request)
    device, key = await node_of(request).devices.register(principal, await read_body(request))
    data = {"device_id": device.id, "device": device.to_api()}
    if key is not None:
        data["connection_key"] = key
    return respond(
        request,
        data,
        201 if key is not None else 200,
        headers={"Location": f"/v1/devices/{device.id}"},
    )


async def get_device(request: Request) -> Response:
    """``GET /v1/devices/{device_id}``: the device, never its key."""
    principal = await authenticate(request)
    device = await node_of(request).devices.get(principal, request.path_params["device_id"])
    return respond(request, device.to_api())


async def change_tags(request: Request) -> Response:
    """``POST /v1/devices/tags``: 200 with the device's tags; ``warnings`` name the
    groups that were not applied."""
    principal = await authenticate(request)
    device, warnings = await node_of(request).devices.change_tags(
        principal, await read_body(request)
    )
    data = {"device_id": device.id, "tags": device.tags}
    return respond(request, data, extra={"warnings": warnings} if warnings else None)


async def uninstall(request: Request) -> Response:
    """``POST /v1/devices/uninstall``: 202; the device is disconnected and its key revoked."""
    principal = await authenticate(request)
    device = await node_of(request).devices.uninstall(principal, await read_body(request))
    return respond(request, {"device_id": device.id, "uninstalled": True}, 202)


async def send_command(request: Request) -> Response:
    """``POST /v1/devices/{target}/commands``: the device's reply (200), or for
    ``chref:<ref>`` the multicast's acceptance, at once."""
    principal = await authenticate(request)
    answer = await node_of(request).commands.send(
        principal, request.path_params["target"], await read_body(request)
    )
    return respond(request, answer)


async def list_subscribers(request: Request) -> Response:
    """``GET /v1/channels/{name}/subscribers``: the persistent subscribers."""
    principal = await authenticate(request)
    entries = await node_of(request).devices.list_subscribers(
        principal, request.path_params["name"]
    )
    return respond(request, entries)


async def add_subscriber(request: Request) -> Response:
    """``POST /v1/channels/{name}/subscribers`` ``{device_id | connection_key, room?}``:
    201 when added, 200 when it was already."""
    principal = await authenticate(request)
    entry, added = await node_of(request).devices.add_subscriber(
        principal, request.path_params["name"], await read_body(request)
    )
    return respond(request, entry, 201 if added else 200)


async def remove_subscriber(request: Request) -> Response:
    """``DELETE /v1/channels/{name}/subscribers``, the device in the body or in
    ``?device_id=`` (and ``room=``): it stops receiving at once."""
    principal = await authenticate(request)
    if request.query_params.get("device_id"):
        unknown = sorted(set(request.query_params) - {"device_id", "room"})
        if unknown:
            raise BadRequest(f"unknown parameter {unknown[0]!r}", path=unknown[0])
        body: object = dict(request.query_params)
    else:
        body = await read_body(request)
    entry = await node_of(request).devices.remove_subscriber(
        principal, request.path_params["name"], body
    )
    return respond(request, entry)


routes = [
    Route("/v1/devices", register_device, methods=["POST"]),
    Route("/v1/devices/tags", change_tags, methods=["POST"]),
    Route("/v1/devices/uninstall", uninstall, methods=["POST"]),
    Route("/v1/devices/{device_id}", get_device, methods=["GET"]),
    Route("/v1/devices/{target}/commands", send_command, methods=["POST"]),
    Route("/v1/channels/{name}/subscribers", list_subscribers, methods=["GET"]),
    Route("/v1/channels/{name}/subscribers", add_subscriber, methods=["POST"]),
    Route("/v1/channels/{name}/subscribers", remove_subscriber, methods=["DELETE"]),
]
"""The device routes of the API."""
