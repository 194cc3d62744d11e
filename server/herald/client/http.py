"""`HttpApi`: a thin asyncio wrapper of Herald's HTTP API, for backends.

Each method is one request: it sends JSON, unwraps ``{"data": ...}`` and
raises `HeraldHTTPError` for an error answer. Network failures surface as
``httpx`` errors, untouched. It runs on ``httpx.AsyncClient`` for its
connection pool: a backend publishing steadily reuses its keep-alive
connections instead of paying a TCP handshake per message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from herald.client.errors import HeraldHTTPError
from herald.client.frames import Message

__all__ = ["ChannelPage", "HttpApi"]


@dataclass(frozen=True, slots=True)
class ChannelPage:
    """One page of `HttpApi.list_channels`; pass ``next`` as ``cursor`` for the next
    (None on the last page)."""

    channels: list[dict[str, Any]]
    next: str | None


def _segment(value: str) -> str:
    # Channel names are [A-Za-z0-9_.:-]; quoting still keeps a stray "/" from
    # reaching another route.
    return quote(value, safe=":")


class HttpApi:
    """Herald's HTTP API with one key: ``async with HttpApi(base_url, key) as api``.

    ``base_url`` is the server's root (``http://127.0.0.1:8000``). ``client``
    lets the caller bring its own ``httpx.AsyncClient`` (then it is not closed
    here); ``trust_env`` and ``timeout`` apply to the one made otherwise.
    """

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        timeout: float = 10.0,
        trust_env: bool = True,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self._own = client is None
        self._http = client or httpx.AsyncClient(timeout=timeout, trust_env=trust_env)

    async def __aenter__(self) -> HttpApi:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (unless the caller brought the client)."""
        if self._own:
            await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Any call: ``path`` from the root (``/v1/...``); the answer's ``data``."""
        answer = await self._call(method, path, body=body, params=params, headers=headers)
        return answer.get("data")

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        # The whole answer: `data`, `meta`, and `warnings` where an endpoint has them.
        response = await self._http.request(
            method,
            self.base_url + path,
            content=None if body is None else orjson.dumps(body),
            params={k: str(v) for k, v in (params or {}).items()},
            headers={**self._headers, **(headers or {})},
        )
        try:
            answer = orjson.loads(response.content) if response.content else {}
        except orjson.JSONDecodeError:
            answer = None
        if response.status_code >= 400:
            raise _error(response, answer)
        if not isinstance(answer, dict):
            raise HeraldHTTPError(response.status_code, "bad_response", "not a Herald answer")
        return answer

    # Publishing

    async def publish(
        self,
        channel: str,
        payload: Any,
        *,
        room: str | None = None,
        metadata: dict[str, Any] | None = None,
        audience: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Message:
        """Publish one message; it is stored when this returns. With
        ``idempotency_key``, a retry within 10 minutes publishes nothing new and
        answers the first message."""
        body = {"payload": payload}
        body.update(_without_none(room=room, metadata=metadata, audience=audience))
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        data = await self.request(
            "POST", f"/v1/channels/{_segment(channel)}/publish", body=body, headers=headers
        )
        return Message.from_frame(data)

    async def publish_batch(
        self, items: Sequence[Mapping[str, Any]]
    ) -> list[Message | HeraldHTTPError]:
        """Publish up to 1000 ``{channel, payload, room?, metadata?, audience?}``; one
        result per item, in order: the `Message`, or the item's error (not raised)."""
        results = await self.request("POST", "/v1/publish", body=list(items))
        out: list[Message | HeraldHTTPError] = []
        for result in results:
            if result.get("status") == 201:
                out.append(Message.from_frame(result["data"]))
            else:
                error = result.get("error") or {}
                out.append(
                    HeraldHTTPError(
                        int(result.get("status", 0)),
                        str(error.get("code", "error")),
                        str(error.get("detail", "")),
                        error.get("path"),
                    )
                )
        return out

    async def history(
        self,
        channel: str,
        *,
        room: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> list[Message]:
        """Retained messages, oldest first (``reverse``: newest first); ``since`` and
        ``until`` are exclusive ids, ``limit`` at most 1000."""
        params: dict[str, str | int] = _without_none(
            room=room, since=since, until=until, limit=limit
        )
        if reverse:
            params["reverse"] = 1
        data = await self.request("GET", f"/v1/channels/{_segment(channel)}/history", params=params)
        return [Message.from_frame(item) for item in data]

    # Channels

    async def create_channel(self, name: str, **fields: Any) -> dict[str, Any]:
        """Create a channel (``type``, ``history_size``, ACLs, ...). The answer holds
        its ``keys`` (``admin_key``, ``subscriber_key``, ``ref``), shown this once."""
        data: dict[str, Any] = await self.request(
            "POST", "/v1/channels", body={"name": name, **fields}
        )
        return data

    async def get_channel(self, name: str) -> dict[str, Any]:
        """One channel."""
        data: dict[str, Any] = await self.request("GET", f"/v1/channels/{_segment(name)}")
        return data

    async def list_channels(
        self,
        *,
        cursor: str | None = None,
        limit: int | None = None,
        include_inactive: bool = False,
        type: str | None = None,
    ) -> ChannelPage:
        """A page of channels, by name."""
        params: dict[str, str | int] = _without_none(cursor=cursor, limit=limit, type=type)
        if include_inactive:
            params["include_inactive"] = 1
        answer = await self._call("GET", "/v1/channels", params=params)
        return ChannelPage(answer.get("data") or [], (answer.get("meta") or {}).get("next"))

    async def close_channel(self, name: str) -> dict[str, Any]:
        """Close a channel for good; the closed channel."""
        data: dict[str, Any] = await self.request("DELETE", f"/v1/channels/{_segment(name)}")
        return data

    # Devices

    async def register_device(self, address: str, platform: str, **fields: Any) -> dict[str, Any]:
        """Register (or update) a device by ``(platform, address)``: ``{device_id,
        device, connection_key}``, the key only when the device is new."""
        body = {"device": {"address": address, "platform": platform, **fields}}
        data: dict[str, Any] = await self.request("POST", "/v1/devices", body=body)
        return data

    async def get_device(self, device_id: str) -> dict[str, Any]:
        """One device (never its key)."""
        data: dict[str, Any] = await self.request("GET", f"/v1/devices/{_segment(device_id)}")
        return data

    async def change_tags(
        self,
        device_id: str,
        *,
        add: Mapping[str, Sequence[str]] | None = None,
        remove: Mapping[str, Sequence[str]] | None = None,
        set: Mapping[str, Sequence[str]] | None = None,
    ) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
        """Change a device's tag groups (``add`` and ``remove``, or ``set``): its tags
        afterwards, and the warnings naming the groups that were not applied."""
        body: dict[str, Any] = {"audience": {"device_id": device_id}}
        body.update(_without_none(add=add, remove=remove, set=set))
        answer = await self._call("POST", "/v1/devices/tags", body=body)
        data = answer.get("data") or {}
        return data.get("tags", {}), list(answer.get("warnings") or [])

    async def add_subscriber(
        self,
        channel: str,
        *,
        device_id: str | None = None,
        connection_key: str | None = None,
        room: str | None = None,
    ) -> dict[str, Any]:
        """Make a device a persistent subscriber of ``channel``."""
        body = _without_none(device_id=device_id, connection_key=connection_key, room=room)
        data: dict[str, Any] = await self.request(
            "POST", f"/v1/channels/{_segment(channel)}/subscribers", body=body
        )
        return data

    async def send_command(
        self, target: str, payload: Any, *, timeout_ms: int | None = None
    ) -> dict[str, Any]:
        """Send a command to a device id (waits for its ``reply``: 504 ``timeout``,
        409 ``not_connected``) or to ``chref:<ref>`` (every device subscriber of that
        channel; answers ``delivered: "accepted"`` at once)."""
        body: dict[str, Any] = {"payload": payload}
        if timeout_ms is not None:
            body["timeout_ms"] = timeout_ms
        data: dict[str, Any] = await self.request(
            "POST", f"/v1/devices/{_segment(target)}/commands", body=body
        )
        return data

    async def command(self, device_id: str, payload: Any, *, timeout_ms: int | None = None) -> Any:
        """Send a command to one device and return its reply payload (``timeout_ms``:
        how long the server waits for it, 5 s by default)."""
        answer = await self.send_command(device_id, payload, timeout_ms=timeout_ms)
        return answer.get("reply")


def _without_none(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def _error(response: httpx.Response, body: Any) -> HeraldHTTPError:
    retry_after: float | None = None
    header = response.headers.get("retry-after")
    if header is not None:
        try:
            retry_after = float(header)
        except ValueError:
            retry_after = None
    if isinstance(body, dict) and "code" in body:
        return HeraldHTTPError(
            response.status_code,
            str(body["code"]),
            str(body.get("detail", "")),
            body.get("path"),
            retry_after=retry_after,
        )
    return HeraldHTTPError(
        response.status_code,
        "http_error",
        response.text[:200] or response.reason_phrase,
        retry_after=retry_after,
    )
