"""The transport keepalive: every connection pinged once an interval, silent peers dropped."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from tests.e2e.minisocket import MiniSocket
from tests.support import scaled, start_server

_INTERVAL = 0.5


async def _listen(sock: MiniSocket) -> float:
    """Read (answering pings, if the socket does) until the server drops the link; when."""
    with contextlib.suppress(EOFError, OSError):
        while True:
            await sock.recv()
    return asyncio.get_running_loop().time()


async def test_pings_are_spread_over_the_interval_and_silent_peers_dropped(
    tmp_path: Path,
) -> None:
    server = start_server(tmp_path, env={"HERALD_PING_INTERVAL": str(_INTERVAL)})
    lively: list[MiniSocket] = []
    try:
        for _ in range(50):
            sock = await MiniSocket.open(server.port)
            lively.append(sock)
            answer = await sock.request({"op": "connect", "id": 1, "key": server.key})
            assert answer["op"] == "connected", answer
        silent = await MiniSocket.open(server.port)
        silent.answer_pings = False
        answer = await silent.request({"op": "connect", "id": 1, "key": server.key})
        assert answer["op"] == "connected", answer
        loop = asyncio.get_running_loop()
        started = loop.time()
        readers = [asyncio.create_task(_listen(sock)) for sock in lively]

        # The silent peer is pinged, then dropped at its next turn, an interval later.
        dropped = await asyncio.wait_for(_listen(silent), scaled(5 * _INTERVAL))
        assert silent.pings, "the silent peer was dropped without a ping"
        assert dropped - silent.pings[0] >= 0.8 * _INTERVAL

        await asyncio.sleep(max(0.0, started + scaled(3 * _INTERVAL) - loop.time()))
        assert not any(reader.done() for reader in readers), "a peer that answers was dropped"
        for sock in lively:
            assert len(sock.pings) >= 2  # about one an interval
        # Each connection has its slice of the interval: the first pings of fifty
        # connections opened together arrive over most of it, not all at once.
        firsts = sorted(sock.pings[0] for sock in lively)
        assert firsts[-1] - firsts[0] >= 0.5 * _INTERVAL
        for reader in readers:
            reader.cancel()
    finally:
        for sock in lively:
            sock.close()
        server.stop()
