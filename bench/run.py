"""The whole benchmark in one command: S1-S4 against Herald and two reference servers.

Every target runs pinned to CPU 0 (with its redis-server), one target and
scenario at a time, each scenario on a freshly started server; this process
is the load generator for all of them, pinned to CPU 1. It prints one table
(stdout; progress goes to stderr), the issue's target ratios computed from
it, and writes everything it measured to ``bench/results/run.json``.
See bench/README.md for what each column means.

Usage: python bench/run.py [--quick] [--only S1,S3] [--targets herald-memory,ref-websockets]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop

if __package__ in (None, ""):
    # Run as a script (python bench/run.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import PAYLOAD_BYTES
from bench.procs import (
    LOADGEN_CPU,
    RESULTS,
    can_pin,
    machine_busy_seconds,
    machine_facts,
    placement,
    raise_nofile,
)
from bench.report import OTHER_LIMIT_PCT, floor_lines, ratios, table
from bench.scenarios import FanoutSpec, Plan, fanout, http_publish, idle, progress
from bench.targets import TARGETS, Session, Target, loadavg

SCENARIOS = ("S1", "S2", "S3", "S4")
S1_1K = FanoutSpec("S1 1k", 1, 1000, backlog=128, window=1024, batch_max=32, feed_connections=2)
S1_10K = FanoutSpec("S1 10k", 1, 10_000, backlog=16, window=1024, batch_max=8, feed_connections=2)
S2 = FanoutSpec(
    "S2", 10_000, 1, backlog=16_384, window=16_384, batch_max=1000, feed_connections=4,
    sample_stride=100,
)  # fmt: skip
IDLE_CONNECTIONS = 10_000


def _names(text: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{what}: choose from {', '.join(allowed)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="3-second steps, one step-down, S1 with 1k only"
    )
    parser.add_argument(
        "--only",
        type=lambda text: _names(text.upper(), SCENARIOS, "--only"),
        default=list(SCENARIOS),
        help="scenarios to run, e.g. S1,S3 (default all)",
    )
    parser.add_argument(
        "--targets",
        type=lambda text: _names(text, list(TARGETS), "--targets"),
        default=list(TARGETS),
        help=f"servers to run (default {','.join(TARGETS)})",
    )
    parser.add_argument("--seconds", type=float, help="length of each step (default 5, quick 3)")
    parser.add_argument(
        "--herald-feed",
        choices=["batch", "ws"],
        default="batch",
        help="how S1/S2 publish to Herald: batch POST /v1/publish (default) or WebSocket frames",
    )
    parser.add_argument(
        "--concurrency", type=int, default=100, help="WebSocket connects in flight at once"
    )
    parser.add_argument(
        "--http-connections", type=int, default=32, help="keep-alive connections for S4 single"
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS / "run.json", help="where to write the JSON"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each scenario, wait up to this long for other processes to use < 10%% CPU",
    )
    parser.add_argument(
        "--profile",
        metavar="PY_SPY",
        nargs="?",
        const="py-spy",
        help="record the server with py-spy in each max step and S4 run (bench/results/profile-*)",
    )
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 5.0
    if args.seconds <= 0 or args.concurrency < 1 or args.http_connections < 1:
        parser.error("--seconds, --concurrency and --http-connections must be positive")
    return args


def _jobs(args: argparse.Namespace) -> list[tuple[str, FanoutSpec | None]]:
    jobs: list[tuple[str, FanoutSpec | None]] = []
    for scenario in SCENARIOS:
        if scenario not in args.only:
            continue
        if scenario == "S1":
            jobs.append(("S1", S1_1K))
            if not args.quick:
                jobs.append(("S1", S1_10K))
        elif scenario == "S2":
            jobs.append(("S2", S2))
        else:
            jobs.append((scenario, None))
    return jobs


def _rows_of(
    scenario: str, spec: FanoutSpec | None, target: Target, result: dict[str, Any]
) -> list[dict[str, Any]]:
    base = {
        "target": target.name,
        "has_redis": target.kind == "reference" or target.engine == "redis",
    }
    if spec is not None:
        row = {**base, "scenario": spec.label, **result["row"]}
        row_flags = []
        if not row.pop("passed"):
            row_flags.append(f"no step < 1% loss (best {row['loss_pct']:.1f}%)")
        if target.herald and "websocket" in row["feed"]:
            row_flags.append("fed by WS frames")
        if result["client_errors"]:
            row_flags.append(f"{result['client_errors']} client errors")
        row["flags"] = row_flags
        return [row]
    rows = []
    for item in result["rows"]:
        row = {**base, "scenario": f"{scenario} {item.pop('metric')}", **item}
        row_flags = [*row.pop("notes", [])]
        if row.pop("failed", 0):
            row_flags.append("failed requests")
        if result.get("client_errors"):
            row_flags.append(f"{result['client_errors']} client errors")
        row["flags"] = row_flags
        rows.append(row)
    return rows


async def run_all(args: argparse.Namespace, pin: bool) -> dict[str, Any]:
    """Every selected scenario against every selected target that exists; rows and details."""
    plan = Plan(
        seconds=args.seconds,
        retries=1 if args.quick else 2,
        concurrency=args.concurrency,
        herald_feed=args.herald_feed,
        http_connections=args.http_connections,
        profiler=shutil.which(args.profile) if args.profile else None,
    )
    if args.profile and plan.profiler is None:
        print(f"note: {args.profile} not found: no profiles")
    targets: list[Target] = []
    skipped: dict[str, str] = {}
    for name in args.targets:
        target = TARGETS[name]
        why = target.missing()
        if why:
            skipped[name] = why
            print(f"note: skipping {name}: {why}")
        else:
            targets.append(target)
    rows: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    for scenario, spec in _jobs(args):
        label = spec.label if spec is not None else scenario
        # References first: Herald's latency is also measured at the raw one's half rate.
        compare_rate: float | None = None
        for target in sorted(targets, key=lambda target: target.herald):
            if scenario == "S4" and not target.herald:
                continue
            progress(f"[{target.name}] {label}")
            detail: dict[str, Any] = {"scenario": label, "target": target.name}
            if args.wait_quiet > 0:
                waited, busy = await wait_quiet(args.wait_quiet)
                detail["waited_for_quiet_s"] = round(waited, 1)
                if waited >= 3:
                    progress(f"  waited {waited:.0f} s for a quiet machine (others: {busy:.0f}%)")
            started = time.monotonic()
            session: Session | None = None
            try:
                session = await Session.start(target, label.replace(" ", "-"), pin)
                if spec is not None:
                    result = await fanout(session, spec, plan, compare_rate)
                    if target.name == "ref-websockets":
                        compare_rate = result["half_rate"]
                elif scenario == "S3":
                    result = await idle(session, IDLE_CONNECTIONS, plan)
                else:
                    result = await http_publish(session, plan)
                detail["result"] = result
                rows.extend(_rows_of(scenario, spec, target, result))
            except Exception as exc:
                progress(f"  failed: {exc!r}")
                detail["error"] = repr(exc)
                rows.append(
                    {
                        "scenario": label,
                        "target": target.name,
                        "value": None,
                        "unit": "",
                        "flags": [f"FAILED: {str(exc)[:80]}"],
                    }
                )
            finally:
                if session is not None:
                    detail["server"] = session.stop()
                    if session.target.herald:
                        detail["batch_publish_endpoint"] = session.batch_publish
            detail["seconds"] = round(time.monotonic() - started, 1)
            details.append(detail)
    return {"rows": rows, "runs": details, "skipped": skipped}


async def wait_quiet(limit: float) -> tuple[float, float]:
    """Wait (at most ``limit`` s) until the rest of the machine uses < 10% of a CPU for 2 s."""
    started = time.monotonic()
    quiet_since: float | None = None
    busy = 0.0
    while time.monotonic() - started < limit:
        before = machine_busy_seconds()
        await asyncio.sleep(0.5)
        busy = 100.0 * (machine_busy_seconds() - before) / 0.5
        now = time.monotonic()
        if busy >= OTHER_LIMIT_PCT:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now - 0.5
        elif now - quiet_since >= 2.0:
            break
    return time.monotonic() - started, busy


def quiet_check(seconds: float = 1.0) -> float:
    """Percent of a CPU the rest of the machine uses right now (we are idle)."""
    busy = machine_busy_seconds()
    time.sleep(seconds)
    return 100.0 * (machine_busy_seconds() - busy) / seconds


def main(argv: list[str] | None = None) -> int:
    """Run, print the table and the target ratios, write the JSON."""
    args = parse_args(argv)
    nofile = raise_nofile()
    if nofile[0] < IDLE_CONNECTIONS + 512:
        print(f"note: the open-files limit is {nofile[0]}; 10,000 connections need more")
    RESULTS.mkdir(parents=True, exist_ok=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    pin = can_pin()
    if pin:
        os.sched_setaffinity(0, {LOADGEN_CPU})
    load_before = loadavg()
    busy_before = quiet_check()
    started = time.monotonic()
    outcome = uvloop.run(run_all(args, pin))
    minutes = (time.monotonic() - started) / 60
    load_after = loadavg()
    rows = outcome["rows"]
    found = ratios(rows)
    where = placement(pin, "servers and their redis-server")
    print()
    print(
        f"Herald benchmark: {PAYLOAD_BYTES}-byte payloads, {args.seconds:g} s steps, {where}; "
        f"{minutes:.1f} min"
    )
    print(f"load average before: {_load(load_before)}   after: {_load(load_after)}")
    if busy_before > OTHER_LIMIT_PCT:
        print(f"note: other processes used {busy_before:.0f}% of a CPU just before the run")
    print(table(rows))
    print()
    feeds = _feeds(outcome)
    if feeds:
        print("S1/S2: result = deliveries/s of the highest step with < 1% loss (and its CPU %);")
        print("p50/p99 = publish->receive latency at half that rate; Herald is also measured")
        print("at the raw reference's half rate (\"p99 at the reference's half rate\"). Feeds:")
        for line in feeds:
            print(f"  {line}")
    print()
    print("Targets (issue 4):")
    for ratio in found:
        print(f"  {ratio.line()}")
    floors = floor_lines(rows)
    if floors:
        print()
        print("The floor (ref-floor: a lookup and a write per delivery; not a target):")
        for line in floors:
            print(f"  {line}")
    report = {
        "benchmark": "run",
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "minutes": round(minutes, 2),
        "machine": {
            **machine_facts(load_before, load_after),
            "other_cpu_pct_before": busy_before,
            "open_files_limit": nofile[0],
        },
        "config": {
            "quick": args.quick,
            "scenarios": args.only,
            "targets": args.targets,
            "seconds_per_step": args.seconds,
            "payload_bytes": PAYLOAD_BYTES,
            "herald_feed": args.herald_feed,
            "connect_concurrency": args.concurrency,
            "s4_http_connections": args.http_connections,
            "pinned": pin,
        },
        **outcome,
        "ratios": [
            {"text": r.text, "value": r.value, "goal": r.goal, "met": r.met, "suspect": r.suspect}
            for r in found
        ],
        "floor": floors,
    }
    args.output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"\nJSON: {args.output}")
    return 0


def _load(values: tuple[float, float, float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def _feeds(outcome: dict[str, Any]) -> list[str]:
    """Which publish path fed which servers in which scenarios, in a line."""
    feeds: dict[str, tuple[set[str], list[str]]] = {}
    for run in outcome["runs"]:
        setup = run.get("result", {}).get("setup")
        if setup is not None:
            servers, scenarios = feeds.setdefault(str(setup["feed"]), (set(), []))
            servers.add(run["target"])
            if run["scenario"] not in scenarios:
                scenarios.append(run["scenario"])
    return [
        f"{', '.join(sorted(servers))} in {', '.join(scenarios)}: {feed}"
        for feed, (servers, scenarios) in feeds.items()
    ]


if __name__ == "__main__":
    raise SystemExit(main())
