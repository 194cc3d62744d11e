"""An upgraded connection leaves nothing of uvicorn's HTTP protocol to the cyclic collector.

The one test here runs the server in the test's own process: what it checks
(which objects are still alive inside the server) cannot be seen from outside.
The clients are real WebSocket clients on a real socket all the same.
"""

from __future__ import annotations

import asyncio
import gc

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from herald.app import create_app
from herald.config import Settings
from herald.transport import Connection
from tests.support import free_port


async def test_upgraded_connections_free_their_http_protocol() -> None:
    port = free_port()
    settings = Settings(admin_key="upgrade-lifetime-admin-key-0123456789", port=port)
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        http="httptools",
        ws=Connection,
        lifespan="on",
        log_config=None,
    )
    server = uvicorn.Server(config)
    thresholds = gc.get_threshold()
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done(), "the server did not start"
            await asyncio.sleep(0.01)
        # Without the collector, an object in a reference cycle stays alive for good:
        # whatever uvicorn left behind in one would still be found below.
        gc.disable()
        clients = [
            await connect(
                f"ws://127.0.0.1:{port}/v1/connect",
                subprotocols=[Subprotocol("herald.json")],
                proxy=None,
            )
            for _ in range(10)
        ]
        try:
            left = [o for o in gc.get_objects() if isinstance(o, HttpToolsProtocol)]
            assert left == []
        finally:
            for client in clients:
                await client.close()
    finally:
        gc.enable()
        server.should_exit = True
        await serving
        # The app's lifespan tunes the collector for a worker; give the tests theirs back.
        gc.unfreeze()
        gc.set_threshold(*thresholds)
