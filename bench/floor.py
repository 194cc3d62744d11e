"""What one delivery costs the kernel: the floor under every server's figures.

In `bench/run.py` S2 (10,000 channels x 1 subscriber) a server that writes
each message as it comes makes one ``send()`` of one small frame per
delivery, each on its own TCP connection (only frames left waiting can be
coalesced into one write). This measures that send alone, as the servers
make it: this process (on the server CPU) holds ``--connections`` accepted
sockets and sends one frame to each in turn, while a second process (on
the load generator's CPU) reads them all with epoll, as the load generator
does.

    .venv/bin/python bench/floor.py

It prints the sender's CPU time per send and what that leaves of the S2
target: with the raw reference's S2 figure from ``bench/results/run.json``
(when a run left one), the time per delivery that 1.5x the reference allows
and how much of it the send takes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (python bench/floor.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import HOST, LOADGEN_CPU, RESULTS, SERVER_CPU, can_pin, raise_nofile

# About the size of Herald's S2 frame (a `message` frame with a 64-byte payload, some
# 230 bytes); the raw reference forwards frames of the same text.
_FRAME = b"\x81\x7e\x00\xe6" + b"x" * 230


def receive(port: int, connections: int, expected: int) -> int:
    """The reading side: connect, then read until ``expected`` bytes arrived."""
    sockets = []
    for _ in range(connections):
        sock = socket.create_connection((HOST, port))
        sock.setblocking(False)
        sockets.append(sock)
    poller = select.epoll()
    by_fd = {sock.fileno(): sock for sock in sockets}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    print("ready", flush=True)
    got = 0
    while got < expected:
        for fd, _ in poller.poll(1.0):
            with contextlib.suppress(BlockingIOError):  # woken, but nothing left
                got += len(by_fd[fd].recv(65536))
    return 0


def send(args: argparse.Namespace) -> dict[str, float]:
    """The sending side: accept, start the reader, send ``rounds`` frames to each."""
    listener = socket.create_server((HOST, 0), backlog=args.connections)
    port = listener.getsockname()[1]
    expected = len(_FRAME) * args.connections * (args.rounds + 1)
    command = [sys.executable, __file__, "--receive", str(port)]
    command += ["--connections", str(args.connections), "--expect", str(expected)]
    if args.pin:
        command = ["taskset", "-c", str(LOADGEN_CPU), *command]
    reader = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        accepted = []
        for _ in range(args.connections):
            sock, _ = listener.accept()
            # As uvloop sets it on every TCP transport: no Nagle delay.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            accepted.append(sock)
        assert reader.stdout is not None
        reader.stdout.readline()  # "ready": every connection is registered with epoll
        for sock in accepted:  # warm-up round: first segment of each connection
            sock.send(_FRAME)
        time.sleep(0.5)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(args.rounds):
            for sock in accepted:
                sock.send(_FRAME)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if reader.wait(60) != 0:
            raise RuntimeError("the reader failed")
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    sends = args.rounds * args.connections
    return {"cpu_us_per_send": cpu / sends * 1e6, "wall_us_per_send": wall / sends * 1e6}


def _reference_s2() -> float | None:
    """The raw reference's S2 deliveries/s in the last `bench/run.py` JSON, if any."""
    path = RESULTS / "run.json"
    if not path.exists():
        return None
    for row in json.loads(path.read_text()).get("rows", []):
        if row.get("scenario") == "S2" and row.get("target") == "ref-websockets":
            value = row.get("value")
            return float(value) if value else None
    return None


def main(argv: list[str] | None = None) -> int:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5, help="frames sent to each connection")
    parser.add_argument("--receive", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raise_nofile(2 * args.connections + 100)
    if args.receive is not None:
        return receive(args.receive, args.connections, args.expect)
    args.pin = can_pin()
    if args.pin:
        os.sched_setaffinity(0, {SERVER_CPU})
    result = send(args)
    per_send = result["cpu_us_per_send"]
    placement = "sender on CPU 0, reader on CPU 1" if args.pin else "not pinned"
    print(
        f"send() of a {len(_FRAME)}-byte frame, {args.connections:,} TCP connections, "
        f"{placement}: {per_send:.2f} CPU us per send "
        f"({result['wall_us_per_send']:.2f} us wall); one core doing only this: "
        f"{1e6 / per_send:,.0f} sends/s"
    )
    reference = _reference_s2()
    if reference:
        budget = 1e6 / (1.5 * reference)
        print(
            f"S2 target, 1.5x the raw reference's {reference:,.0f} deliveries/s: "
            f"{budget:.2f} us per delivery for everything; the send takes "
            f"{per_send / budget:.0%} of it, leaving {budget - per_send:.2f} us"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "floor.json").write_text(json.dumps({**result, "reference_s2": reference}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
