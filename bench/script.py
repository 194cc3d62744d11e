"""Redis's CPU time per message for Herald's publish script, and the least a script
that keeps history can cost.

On the Redis engine, S2 of `bench/run.py` (10,000 channels x 1 subscriber)
runs redis-server on the worker's core, and Redis spends its time there on
the publish script. This publishes 1,000-message batches to 10,000 topics
through `RedisEngine.publish_many` (the worker's own pipelines and script)
and reads redis-server's CPU time from the kernel (``/proc/<pid>/task/*/
schedstat``, nanoseconds). The same messages then go through a floor script
on the same kind of pipeline (100 topics a call): per message one XADD that
trims and one PUBLISH of the document Herald publishes, nothing else. What
Herald's script costs over that is its own bookkeeping; the floor is what
any design with a stream per topic and a PUBLISH per topic pays.

Two histories:

- **filling**: history_size 100, each topic gets a message per batch round:
  streams never full (S2 of `bench/run.py` publishes well under 100 messages
  to each channel).
- **full**: history_size 10, streams filled first: every publish trims, as
  on any busy channel.

    .venv/bin/python bench/script.py                # both, 5 runs each, best kept
    .venv/bin/python bench/script.py --topics 1000  # fewer topics: more messages each
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvloop

if __package__ in (None, ""):
    # Run as a script (python bench/script.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import RESULTS, start_redis
from herald.codec import packb
from herald.engines.redis import RedisEngine
from herald.engines.redis_wire import RespConnection, connect, endpoint_from_url
from herald.models import Channel, Message, now_rfc3339

_BATCH = 1000
_PER_CALL = 100  # topics per script call, as the engine sends them
_PAYLOAD = "x" * 64
_AUTHOR = {"type": "key", "id": "bench"}

# Per topic: XADD with trimming, one PUBLISH of [ids, [body, ...]] (as Herald's script).
_FLOOR = """
local function array(n)
  if n < 16 then return string.char(144 + n) end
  return string.char(220, math.floor(n / 256), n % 256)
end
local at = 1
for t = 1, #KEYS do
  local maxlen, channel, body = ARGV[at], ARGV[at + 1], ARGV[at + 2]
  local id = redis.call('XADD', KEYS[t], 'MAXLEN', maxlen, '*', 'm', body)
  redis.call('PUBLISH', channel, array(2) .. cmsgpack.pack({id}) .. array(1) .. body)
  at = at + 3
end
return #KEYS
"""


def redis_cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in nanoseconds."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            total += int(Path(path).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return total


class Bench:
    """One redis-server, the engine on it, and a raw connection for the floor script."""

    def __init__(self, pid: int, url: str, topics: int) -> None:
        self.pid = pid
        self.url = url
        self.topics = topics
        self.engine = RedisEngine(url)
        self.connection: RespConnection | None = None
        self.floor_sha = ""
        self._round = 0

    async def open(self) -> None:
        """Connect the floor's connection and load its script."""
        self.connection = await connect(endpoint_from_url(self.url))
        [sha] = await self.connection.call([("SCRIPT", "LOAD", _FLOOR)])
        self.floor_sha = sha.decode()

    async def close(self) -> None:
        """Close both connections."""
        if self.connection is not None:
            self.connection.close()
        await self.engine.close()

    def _channels(self, size: int, prefix: str) -> list[Channel]:
        return [
            Channel(app="bench", name=f"{prefix}{n}", history_size=size) for n in range(self.topics)
        ]

    def _batches(self, channels: list[Channel], count: int) -> list[list[Channel]]:
        # Message n of a run goes to channel n mod topics, as in S2.
        batches = []
        for _ in range(count):
            start = self._round * _BATCH % len(channels)
            batches.append([channels[(start + i) % len(channels)] for i in range(_BATCH)])
            self._round += 1
        return batches

    async def herald(self, batches: list[list[Channel]]) -> None:
        """Publish each batch through the engine, one after the other."""
        created_at = now_rfc3339()
        for batch in batches:
            items = [
                (channel, Message("", "bench", channel.name, "", _PAYLOAD, _AUTHOR, created_at))
                for channel in batch
            ]
            await self.engine.publish_many(items)

    async def floor(self, batches: list[list[Channel]]) -> None:
        """The same messages through the floor script, one pipeline per batch."""
        assert self.connection is not None
        body = Message("", "bench", "", "", _PAYLOAD, _AUTHOR, now_rfc3339())
        for batch in batches:
            commands: list[tuple[Any, ...]] = []
            for start in range(0, len(batch), _PER_CALL):
                keys: list[str] = []
                args: list[Any] = []
                for channel in batch[start : start + _PER_CALL]:
                    tag = f"herald:{{bench|floor-{channel.name}|}}"
                    body.channel = channel.name
                    keys.append(f"{tag}:s")
                    args += [channel.history_size + 1, tag, _packed(body)]
                commands.append(("EVALSHA", self.floor_sha, len(keys), *keys, *args))
            await self.connection.call(commands)

    async def measure(self, size: int, fill: int, batches: int, repeats: int) -> dict[str, Any]:
        """Both scripts on fresh topics of ``size``, after ``fill`` rounds: µs per message."""
        channels = self._channels(size, f"s{size}-")
        result: dict[str, Any] = {"history_size": size, "fill_rounds": fill}
        for name, publish in (("herald", self.herald), ("floor", self.floor)):
            self._round = 0
            rounds = self._batches(channels, fill * -(-self.topics // _BATCH))
            await publish(rounds)  # also the warm-up: every topic exists
            runs = []
            for _ in range(repeats):
                work = self._batches(channels, batches)
                started = redis_cpu_ns(self.pid)
                await publish(work)
                spent = redis_cpu_ns(self.pid) - started
                runs.append(spent / (batches * _BATCH) / 1000)
            result[name] = {"us_per_message": runs, "best": min(runs)}
        result["herald_over_floor"] = result["herald"]["best"] / result["floor"]["best"]
        return result


def _packed(message: Message) -> bytes:
    return packb(message.fields())


async def run(args: argparse.Namespace, pid: int, url: str) -> list[dict[str, Any]]:
    """Filling histories, then full ones."""
    bench = Bench(pid, url, args.topics)
    await bench.open()
    try:
        filling = await bench.measure(100, 1, args.batches, args.repeats)
        full = await bench.measure(10, 12, args.batches, args.repeats)
    finally:
        await bench.close()
    return [{"history": "filling", **filling}, {"history": "full", **full}]


def main(argv: list[str] | None = None) -> int:
    """Measure, print a table (and write JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topics", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=20, help="1,000-message batches a run")
    parser.add_argument("--repeats", type=int, default=5, help="runs; the best is reported")
    parser.add_argument("--output", type=Path, default=RESULTS / "script.json")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("bench/script.py needs redis-server", file=sys.stderr)
        return 2
    redis, url = start_redis(Path(tempfile.gettempdir()) / "script-redis.log", False)
    try:
        rows = uvloop.run(run(args, redis.pid, url))
    finally:
        redis.stop()
    print(f"redis-server CPU per message, {args.topics:,} topics, {_BATCH}-message batches")
    print(f"{'history':10} {'herald script':>14} {'floor':>8} {'herald/floor':>13}")
    for row in rows:
        herald, floor, ratio = row["herald"]["best"], row["floor"]["best"], row["herald_over_floor"]
        print(f"{row['history']:10} {herald:11.2f} us {floor:5.2f} us {ratio:12.2f}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"topics": args.topics, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
