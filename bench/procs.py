"""The processes a benchmark starts and watches: redis-server, Herald, reference servers.

Each runs on 127.0.0.1, pinned with ``taskset`` to the server CPU when the
machine has two CPUs to pin apart, with its output in a log file. CPU time
and resident memory are read from ``/proc`` (the process and any children
it forks). `Proc.stop` sends SIGTERM, then SIGKILL if the process lingers.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "HOST",
    "LOADGEN_CPU",
    "RESULTS",
    "SERVER_CPU",
    "Proc",
    "can_pin",
    "cpu_seconds",
    "free_port",
    "log_problems",
    "machine_busy_seconds",
    "machine_facts",
    "machine_irq_seconds",
    "machine_steal_seconds",
    "placement",
    "raise_nofile",
    "server_facts",
    "spawn",
    "start_herald",
    "start_redis",
    "start_reference",
    "wait_port",
    "worker_pids",
]

HOST = "127.0.0.1"
SERVER_CPU = 0
LOADGEN_CPU = 1
RESULTS = Path(__file__).resolve().parent / "results"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def can_pin() -> bool:
    """Whether CPUs 0 and 1 are both available to this process."""
    return {SERVER_CPU, LOADGEN_CPU} <= os.sched_getaffinity(0)


def raise_nofile(needed: int | None = None) -> tuple[int, int]:
    """Raise the soft open-files limit to ``needed`` or, if None, to the hard limit.

    Child processes inherit the raised limit, so call this before starting servers.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if needed is None else needed
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard


def _cpu_ticks() -> list[int]:
    """The first eight fields of /proc/stat's ``cpu`` line, summed over all CPUs."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return [int(x) for x in fields[:8]]


def machine_busy_seconds() -> float:
    """CPU time all CPUs have spent busy since boot (/proc/stat: all but idle and iowait)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = _cpu_ticks()
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def machine_irq_seconds() -> float:
    """CPU time all CPUs have spent in interrupts since boot (/proc/stat: irq + softirq).

    No process is charged for it; on loopback much of it is the TCP work of the
    processes a benchmark measures, not of other processes.
    """
    ticks = _cpu_ticks()
    return (ticks[5] + ticks[6]) / _CLK_TCK


def machine_steal_seconds() -> float:
    """CPU time the hypervisor ran something else while this machine's CPUs had work
    (/proc/stat: steal). No process is charged for it either."""
    return _cpu_ticks()[7] / _CLK_TCK


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which may itself contain spaces and parentheses.
    return stat.rsplit(")", 1)[1].split()


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time used so far by these processes (those that still run)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


def sleeps(pids: Iterable[int]) -> int:
    """Times these processes' main threads went to sleep (voluntary context switches).

    A process woken for every few events (an idle loop in `epoll_wait`) makes
    many; one that finds work waiting whenever it looks makes few.
    """
    return _status_total(pids, "voluntary_ctxt_switches:")


def _status_total(pids: Iterable[int], field: str) -> int:
    """The sum of one number field of ``/proc/<pid>/status`` over these processes."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith(field):
                total += int(line.split()[1])
                break
    return total


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


@dataclass
class Proc:
    """A started server process and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The process id (``taskset`` execs the command, so it is the server's own)."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        """The process and its descendants (a server that forks workers)."""
        tree = _children()
        found = [self.pid]
        index = 0
        while index < len(found):
            found.extend(tree.get(found[index], []))
            index += 1
        return found

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the process and its descendants."""
        return cpu_seconds(self.pids())

    def rss_kib(self, pids: Iterable[int] | None = None) -> int:
        """Resident memory of the process and its descendants, KiB.

        ``pids`` (from an earlier `pids`) skips the walk over ``/proc``, which
        takes milliseconds: too long for a load generator sampling while it measures.
        """
        return _status_total(self.pids() if pids is None else pids, "VmRSS:")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it lingers; the exit code (negative: killed by a signal)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def spawn(
    name: str, command: list[str], log_path: Path, pin: bool, env: dict[str, str] | None = None
) -> Proc:
    """Start ``command`` with its output in ``log_path``, on the server CPU when ``pin``."""
    taskset = shutil.which("taskset")
    if pin and taskset:
        command = [taskset, "-c", str(SERVER_CPU), *command]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL
        )
    if pin and not taskset:
        os.sched_setaffinity(popen.pid, {SERVER_CPU})
    return Proc(name, popen, log_path)


def wait_port(proc: Proc, port: int, timeout: float = 20.0) -> None:
    """Wait until something accepts TCP connections on ``port``; fail if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode}; see {proc.log_path}"
            )
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} did not listen on {port}; see {proc.log_path}")
        time.sleep(0.05)


def start_redis(log_path: Path, pin: bool) -> tuple[Proc, str]:
    """A throwaway ``redis-server`` (no persistence) on a free port; it and its URL."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", HOST, "--save", ""]
    command += ["--appendonly", "no", "--maxclients", "20000"]
    proc = spawn("redis-server", command, log_path, pin)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                with socket.create_connection((HOST, port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or not proc.alive():
                raise RuntimeError(f"redis-server did not start; see {log_path}")
            time.sleep(0.05)
    except BaseException:
        proc.stop()
        raise
    return proc, f"redis://{HOST}:{port}/0"


def start_herald(
    port: int,
    key: str,
    log_path: Path,
    pin: bool,
    redis_url: str | None = None,
    settings: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
) -> Proc:
    """``python -m herald serve`` (the Redis engine when ``redis_url``), admin key ``key``;
    ``settings`` adds ``HERALD_*`` variables (e.g. a lower outbox limit), ``args`` more
    ``serve`` flags (e.g. ``--redis-cluster URLS --workers 2``)."""
    env = {**os.environ, **(settings or {}), "HERALD_ADMIN_KEY": key}
    command = [sys.executable, "-m", "herald", "serve", "--host", HOST, "--port", str(port)]
    if redis_url:
        command += ["--redis", redis_url]
    return spawn("herald", [*command, *args], log_path, pin, env)


def worker_pids(herald: Proc) -> set[int]:
    """Herald's worker processes: its children that run multiprocessing's ``spawn_main``
    (uvicorn's supervisor also forks multiprocessing's resource tracker)."""
    workers = set()
    for pid in herald.pids()[1:]:
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.add(pid)
        except OSError:
            continue
    return workers


def start_reference(script: Path, port: int, redis_url: str, log_path: Path, pin: bool) -> Proc:
    """``python <script> --port P --redis URL``: a reference server of ``bench/``."""
    command = [sys.executable, str(script), "--port", str(port), "--redis", redis_url]
    return spawn(script.stem, command, log_path, pin, dict(os.environ))


def log_problems(path: Path) -> list[str]:
    """Lines of a server log that report errors or warnings."""
    words = ("ERROR", "Traceback", "WARNING", "CRITICAL", "Exception")
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if any(word in line for word in words)]


def server_facts(proc: Proc, exit_code: int | None) -> dict[str, Any]:
    """The ``server`` entry of a benchmark's JSON: exit code, log, its warning/error lines."""
    problems = log_problems(proc.log_path)
    return {
        "exit_code": exit_code,
        "log": str(proc.log_path),
        "log_problems": len(problems),
        "log_problem_examples": problems[:10],
    }


def machine_facts(
    loadavg_before: tuple[float, float, float], loadavg_after: tuple[float, float, float]
) -> dict[str, Any]:
    """The ``machine`` entry of a benchmark's JSON."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg_after,
    }


def placement(pin: bool, servers: str = "server") -> str:
    """Which CPU each side ran on, for a report's header line."""
    if not pin:
        return "not pinned (fewer than 2 CPUs)"
    return f"{servers} on CPU {SERVER_CPU}, load generator on CPU {LOADGEN_CPU}"
