"""``herald serve`` as an operator runs it: refusing bad setups, what it prints, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import open_api, open_client, open_socket
from tests.support import ServerProcess, free_port, scaled, start_server

SERVICE_RESTART = 1012
_GENERATED_KEY = re.compile(r"Admin key \(app 'default', shown once\): (\S+)")


def test_workers_without_redis_is_refused_quickly() -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "herald", "serve", "--workers", "2", "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=environ,
        timeout=scaled(15),
        check=False,
    )
    assert done.returncode != 0
    assert "--redis" in done.stderr
    assert "--workers" in done.stderr
    assert time.monotonic() - started < scaled(10)


def test_prints_its_urls(server: ServerProcess) -> None:
    log = server.log()
    assert f"listening on http://127.0.0.1:{server.port}" in log
    assert f"ws://127.0.0.1:{server.port}/v1/connect" in log


def test_given_admin_key_is_never_printed(server: ServerProcess) -> None:
    # The key is in use (every other test authenticates with it) ...
    response = httpx.get(f"{server.url}/v1/channels", headers=server.headers, trust_env=False)
    assert response.status_code == 200
    # ... and the log says where it came from without repeating it.
    log = server.log()
    assert "HERALD_ADMIN_KEY" in log
    assert server.key not in log
    assert _GENERATED_KEY.search(log) is None


async def test_generated_admin_key_is_printed_once_and_works(tmp_path: Path) -> None:
    proc = start_server(tmp_path, env={"HERALD_ADMIN_KEY": ""})
    try:
        log = proc.log()
        found = _GENERATED_KEY.findall(log)
        assert len(found) == 1, log
        key = found[0]
        assert key != proc.key
        assert len(key) >= 24
        async with httpx.AsyncClient(base_url=proc.url, trust_env=False) as http:
            good = await http.get("/v1/channels", headers={"Authorization": f"Bearer {key}"})
            assert good.status_code == 200
            bad = await http.get("/v1/channels", headers={"Authorization": f"Bearer {proc.key}"})
            assert bad.status_code == 401
        async with open_client(proc, key=key) as client:
            assert client.connected["op"] == "connected"
        assert log.count(key) == 1
    finally:
        proc.stop()


async def test_sigterm_closes_sockets_with_1012_and_exits_0(
    fresh_server: ServerProcess, channel_name: str
) -> None:
    async with open_api(fresh_server) as api:
        await api.create_channel(channel_name)
        async with open_client(fresh_server) as client:
            await client.subscribe(channel_name)
            message_id = await api.publish(channel_name, "before")
            assert await client.message_ids(1) == [message_id]
            fresh_server.proc.send_signal(signal.SIGTERM)
            assert await client.close_code(timeout=10) == SERVICE_RESTART
    code = await asyncio.to_thread(fresh_server.proc.wait, scaled(15))
    assert code == 0, fresh_server.log()
    assert "Traceback" not in fresh_server.log()


async def test_sigterm_lets_in_flight_http_requests_finish(fresh_server: ServerProcess) -> None:
    async with open_api(fresh_server) as api:
        registered = await api.http.post(
            "/v1/devices", json={"device": {"address": "lamp-1", "platform": "lamp"}}
        )
        device_id = registered.json()["data"]["device_id"]
        key = registered.json()["data"]["connection_key"]
        async with open_socket(fresh_server) as device:
            answer = await device.request({"op": "connect", "id": 1, "connection_key": key})
            assert answer["op"] == "connected"
            # A request that takes a while: a command waiting up to 1.5 s for a reply.
            call = asyncio.create_task(
                api.http.post(
                    f"/v1/devices/{device_id}/commands", json={"payload": 1, "timeout_ms": 1500}
                )
            )
            assert (await device.recv())["op"] == "command"
            fresh_server.proc.send_signal(signal.SIGTERM)
            assert await device.close_code(timeout=10) == SERVICE_RESTART
            # The socket went at once, the HTTP request got its answer in full.
            response = await call
            assert (response.status_code, response.json()["code"]) == (504, "timeout")
    code = await asyncio.to_thread(fresh_server.proc.wait, scaled(15))
    assert code == 0, fresh_server.log()
