"""Device registration, lookup, tags and uninstall over HTTP (memory engine)."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest


def _address() -> str:
    return f"addr-{secrets.token_hex(6)}"


def _register(http: httpx.Client, **device: Any) -> httpx.Response:
    return http.post("/v1/devices", json={"device": {"platform": "toy", **device}})


def test_register_creates_then_updates_by_platform_and_address(http: httpx.Client) -> None:
    address = _address()
    created = _register(
        http,
        address=address,
        tags=["red"],
        timezone="Europe/Paris",
        locale_country="fr",
        locale_language="FR",
        identifiers={"serial": "1"},
    )
    assert created.status_code == 201, created.text
    data = created.json()["data"]
    device_id, key = data["device_id"], data["connection_key"]
    assert created.headers["location"] == f"/v1/devices/{device_id}"
    assert key.startswith("hk_")
    assert data["device"]["tags"] == {
        "device": ["red"],
        "herald_timezone": ["Europe/Paris"],
        "herald_locale_country": ["FR"],
        "herald_locale_language": ["fr"],
    }

    again = _register(http, address=address, opt_in=False, identifiers={"model": "b"})
    assert again.status_code == 200, again.text
    assert again.headers["location"] == f"/v1/devices/{device_id}"
    body = again.json()["data"]
    assert body["device_id"] == device_id
    assert "connection_key" not in body

    shown = http.get(f"/v1/devices/{device_id}")
    assert shown.status_code == 200
    device = shown.json()["data"]
    assert key not in shown.text
    assert device["opt_in"] is False
    assert device["identifiers"] == {"model": "b"}  # overwritten, never merged
    assert device["tags"]["device"] == ["red"]  # untouched when not given
    assert device["timezone"] == "Europe/Paris"

    other = _register(http, address=address, platform="sensor")
    assert other.status_code == 201
    assert other.json()["data"]["device_id"] != device_id


@pytest.mark.parametrize(
    ("device", "path"),
    [
        ({"platform": "toy"}, "device.address"),
        ({"address": "a", "platform": "no spaces"}, "device.platform"),
        ({"address": "a", "platform": "toy", "opt_in": "yes"}, "device.opt_in"),
        ({"address": "a", "platform": "toy", "colour": "red"}, "device.colour"),
        ({"address": "a", "platform": "toy", "locale_country": "FRA"}, "device.locale_country"),
        ({"address": "a", "platform": "toy", "identifiers": {"x": 1}}, "device.identifiers.x"),
        ({"address": "a", "platform": "toy", "tags": {"herald_x": ["a"]}}, "device.tags"),
    ],
)
def test_register_rejects_bad_fields_with_their_path(
    http: httpx.Client, device: dict[str, Any], path: str
) -> None:
    response = http.post("/v1/devices", json={"device": device})
    assert response.status_code == 400, response.text
    assert response.json()["path"].startswith(path)


def test_devices_are_managed_with_an_admin_key(http: httpx.Client) -> None:
    publisher = http.post("/v1/keys", json={"scopes": ["publish"]}).json()["data"]["key"]
    as_publisher = {"Authorization": f"Bearer {publisher}"}
    body = {"device": {"address": _address(), "platform": "toy"}}
    assert http.post("/v1/devices", json=body, headers=as_publisher).status_code == 403
    assert http.post("/v1/devices", json=body, headers={"Authorization": ""}).status_code == 401
    created = http.post("/v1/devices", json=body).json()["data"]
    device_id, key = created["device_id"], created["connection_key"]
    # A device may read its own record with its key, and no other.
    own = http.get(f"/v1/devices/{device_id}", headers={"Authorization": f"Bearer {key}"})
    assert own.status_code == 200
    other = _register(http, address=_address()).json()["data"]["device_id"]
    assert (
        http.get(f"/v1/devices/{other}", headers={"Authorization": f"Bearer {key}"}).status_code
        == 403
    )
    assert http.get("/v1/devices/dev_unknown").status_code == 404
    # Device keys are not app keys: not listed, not deletable through /v1/keys.
    listed = http.get("/v1/keys").json()["data"]
    assert device_id not in {k["id"] for k in listed}
    assert http.delete(f"/v1/keys/{device_id}").status_code == 404


def test_tags_add_remove_set_and_warnings(http: httpx.Client) -> None:
    address = _address()
    device_id = _register(http, address=address, tags=["a"]).json()["data"]["device_id"]

    def change(**body: Any) -> httpx.Response:
        return http.post("/v1/devices/tags", json=body)

    added = change(
        audience={"device_id": device_id},
        add={"device": ["b"], "colour": ["red"]},
        remove={"device": ["a"]},
    )
    assert added.status_code == 200, added.text
    assert added.json()["data"]["tags"] == {"device": ["b"], "colour": ["red"]}
    assert "warnings" not in added.json()

    partly = change(
        audience={"address": address, "platform": "toy"},
        set={"colour": ["blue"], "herald_timezone": ["x"], "size": ["s" * 129]},
    )
    assert partly.status_code == 200, partly.text
    assert partly.json()["data"]["tags"] == {"device": ["b"], "colour": ["blue"]}
    assert sorted(w["path"] for w in partly.json()["warnings"]) == [
        "set.herald_timezone",
        "set.size",
    ]

    nothing = change(audience={"device_id": device_id}, add={"herald_x": ["y"]})
    assert nothing.status_code == 400
    assert nothing.json()["path"] == "add.herald_x"
    both = change(audience={"device_id": device_id}, set={"a": ["b"]}, add={"a": ["c"]})
    assert (both.status_code, both.json()["path"]) == (400, "set")
    too_many = change(audience={"device_id": device_id}, add={"many": [str(i) for i in range(101)]})
    assert (too_many.status_code, too_many.json()["path"]) == (400, "add.many")
    unknown = change(audience={"device_id": "dev_nobody"}, add={"a": ["b"]})
    assert unknown.status_code == 404
    assert http.get(f"/v1/devices/{device_id}").json()["data"]["tags"] == {
        "device": ["b"],
        "colour": ["blue"],
    }


def test_uninstall_revokes_the_key_and_forgets_the_device(http: httpx.Client) -> None:
    address = _address()
    created = _register(http, address=address).json()["data"]
    device_id, key = created["device_id"], created["connection_key"]
    gone = http.post("/v1/devices/uninstall", json={"address": address, "platform": "toy"})
    assert gone.status_code == 202, gone.text
    assert http.get(f"/v1/devices/{device_id}").status_code == 404
    assert (
        http.get(f"/v1/devices/{device_id}", headers={"Authorization": f"Bearer {key}"}).status_code
        == 401
    )
    again = http.post("/v1/devices/uninstall", json={"device_id": device_id})
    assert again.status_code == 404
    # Registering the address again makes a new device with a new key.
    renewed = _register(http, address=address)
    assert renewed.status_code == 201
    assert renewed.json()["data"]["device_id"] != device_id
