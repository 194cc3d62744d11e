"""Structured logs: JSON lines, and a request id on every HTTP log line."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.support import scaled, start_server, wait_until


async def test_json_access_log_lines_carry_the_request_id(tmp_path: Path) -> None:
    server = start_server(tmp_path, env={"HERALD_LOG_FORMAT": "json", "HERALD_ACCESS_LOG": "1"})
    try:
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers, timeout=scaled(10), trust_env=False
        ) as http:
            given = await http.get("/v1/channels", headers={"X-Request-Id": "trace-42"})
            assert given.headers["x-request-id"] == "trace-42"
            fresh = await http.get("/v1/channels/nowhere")
            generated = fresh.headers["x-request-id"]
            assert generated
            assert generated != "trace-42"
            bad = await http.get("/healthz", headers={"X-Request-Id": "x" * 500})
            assert bad.headers["x-request-id"] != "x" * 500  # too long: replaced

        def lines() -> list[dict[str, object]]:
            return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]

        async def logged() -> bool:
            ids = {line.get("request_id") for line in lines()}
            return {"trace-42", generated} <= ids

        await wait_until(logged)
        by_id = {line.get("request_id"): line for line in lines() if line.get("request_id")}
        assert by_id["trace-42"]["logger"] == "herald.access"
        assert str(by_id["trace-42"]["msg"]).startswith("GET /v1/channels 200 ")
        assert str(by_id[generated]["msg"]).startswith("GET /v1/channels/nowhere 404 ")
        # Every log line is JSON; only the banner printed for the operator is not.
        banner = ("Herald ", "WebSocket endpoint: ", "Admin key: ")
        for line in server.log().splitlines():
            assert line.startswith(("{", *banner)), line
    finally:
        server.stop()


async def test_text_lines_show_the_request_id(tmp_path: Path) -> None:
    server = start_server(tmp_path, env={"HERALD_ACCESS_LOG": "1"})
    try:
        async with httpx.AsyncClient(base_url=server.url, trust_env=False) as http:
            await http.get("/healthz", headers={"X-Request-Id": "text-7"})

        async def logged() -> bool:
            return any("[text-7]: GET /healthz 200" in line for line in server.log().splitlines())

        await wait_until(logged)
    finally:
        server.stop()
