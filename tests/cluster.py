"""A real Redis Cluster for the tests: 3 masters and 3 replicas, killed and restarted at will.

Every node is a ``redis-server`` on free ports (its own client port and cluster bus
port), with its own directory. ``redis-cli --cluster create`` joins them; the helpers
then wait on what the nodes report (``CLUSTER INFO``, ``CLUSTER NODES``, ``INFO
replication``) rather than on fixed sleeps, so a start or a failover takes as long as
Redis needs and no longer.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

from redis.crc import key_slot

from tests.support import free_port, redis_cli, scaled

__all__ = ["SLOTS", "RedisClusterProcess", "start_redis_cluster"]

SLOTS = 16384
"""Hash slots of a Redis Cluster; all of them must be served for ``cluster_state:ok``."""

_MASTERS = 3
_REPLICAS_PER_MASTER = 1
# A node is suspected after this long without an answer; 1 s (instead of 15 s) makes a
# failover finish in a few seconds and stays far above a loaded machine's pauses.
_NODE_TIMEOUT_MS = 1000
_POLL = 0.05  # seconds between two looks at the nodes' state
_INSTALL_HINT = "run scripts/test.sh, which installs it"

_Check: TypeAlias = Callable[[], "str | None"]
"""An extra condition for `RedisClusterProcess._wait_settled`: what is amiss, or None."""


class _ErrorReply(RuntimeError):
    """A node answered a command with a Redis error (``-ERR ...``)."""


def _ask(port: int, *args: str, timeout: float = 2.0) -> str:
    """One command to the node on ``port`` over a new connection; its reply as text.

    A raw socket rather than redis-py: the helpers must work on nodes that are half
    up, failed or loading, and only need the text replies of ``INFO`` and ``CLUSTER``.
    """
    request = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        request += b"$%d\r\n%s\r\n" % (len(data), data)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock,
        sock.makefile("rb") as stream,
    ):
        sock.sendall(request)
        line = stream.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"node {port} closed the connection mid-reply")
        kind, rest = line[:1], line[1:-2].decode(errors="replace")
        if kind in (b"+", b":"):
            return rest
        if kind == b"-":
            raise _ErrorReply(f"node {port}: {rest}")
        if kind == b"$":
            size = int(rest)
            data = stream.read(size + 2) if size >= 0 else b"\r\n"
            if len(data) != max(size, 0) + 2:
                raise ConnectionError(f"node {port} closed the connection mid-reply")
            return data[:-2].decode(errors="replace")
        raise ConnectionError(f"node {port} sent an unexpected reply: {line!r}")


def _fields(text: str) -> dict[str, str]:
    """``key:value`` lines of ``INFO`` or ``CLUSTER INFO``."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


@dataclass(frozen=True)
class _Entry:
    """One node as another node sees it: a line of ``CLUSTER NODES``, minus the
    timing fields (ping/pong times, link state) that differ from one look to the next."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, line: str) -> _Entry:
        """Parse ``<id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <link>
        <slot>...``."""
        parts = line.split()
        address = parts[1].split("@", 1)[0]
        slots: list[tuple[int, int]] = []
        # Entries in brackets are slots being imported or migrated, not owned ones.
        for item in parts[8:]:
            if item.startswith("["):
                continue
            first, _, last = item.partition("-")
            slots.append((int(first), int(last or first)))
        return cls(
            node_id=parts[0],
            port=int(address.rsplit(":", 1)[1]),
            flags=frozenset(parts[2].split(",")) - {"myself"},
            master_id=None if parts[3] == "-" else parts[3],
            slots=tuple(sorted(slots)),
        )

    @property
    def failed(self) -> bool:
        """Marked failed (``fail``) or suspected (``fail?``) by the node that was asked."""
        return bool(self.flags & {"fail", "fail?"})

    @property
    def is_master(self) -> bool:
        """A master that owns slots and is not marked failed: it serves its shard."""
        return "master" in self.flags and bool(self.slots) and not self.failed

    def owns(self, slot: int) -> bool:
        """Whether ``slot`` is one of this node's slots."""
        return any(first <= slot <= last for first, last in self.slots)


def _parse_nodes(text: str) -> list[_Entry]:
    return [_Entry.parse(line) for line in text.splitlines() if line.strip()]


@dataclass
class _Node:
    """One ``redis-server`` of the cluster."""

    port: int
    bus_port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The end of what this node printed, for error messages."""
        try:
            text = (self.directory / "redis.log").read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class RedisClusterProcess:
    """A Redis Cluster the tests started: 3 masters with 1 replica each, on 127.0.0.1.

    Nodes are named by their client port. Killed nodes can be restarted; they rejoin
    with the identity kept in their ``nodes-<port>.conf``. Which node is a master
    changes with failovers, so ask `masters`, `master_of` and `replica_of` each time.
    """

    directory: Path
    node_timeout_ms: int = _NODE_TIMEOUT_MS
    _nodes: dict[int, _Node] = field(default_factory=dict, init=False, repr=False)
    _killed_shards: dict[int, list[int]] = field(default_factory=dict, init=False, repr=False)

    @property
    def ports(self) -> list[int]:
        """Client ports of all six nodes, live or killed, in start order."""
        return list(self._nodes)

    @property
    def url(self) -> str:
        """Startup URLs of every node, comma-separated, in start order:
        ``redis://127.0.0.1:P1,redis://127.0.0.1:P2,...`` (the format of
        ``herald serve --redis-cluster``). Any live node is enough for a client to find
        the rest; listing all of them keeps the URL usable while some nodes are down."""
        return ",".join(f"redis://127.0.0.1:{port}" for port in self._nodes)

    def start(self) -> RedisClusterProcess:
        """Start six nodes, join them into a cluster and wait until it is fully up.

        Fully up means every node says ``cluster_state:ok``, all nodes agree on who owns
        all 16384 slots, and every replica has finished its sync with its master. On
        failure every node started so far is stopped before the error is raised.
        """
        if self._nodes:
            raise RuntimeError("this cluster was started already: restart single nodes")
        for tool in ("redis-server", "redis-cli"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed: {_INSTALL_HINT}")
        self.directory.mkdir(parents=True, exist_ok=True)
        ports = _free_ports(2 * _MASTERS * (1 + _REPLICAS_PER_MASTER))
        for port, bus_port in zip(ports[::2], ports[1::2], strict=True):
            node = _Node(port, bus_port, self.directory / f"node-{port}")
            node.directory.mkdir()
            self._nodes[port] = node
        try:
            for node in self._nodes.values():
                self._launch(node)
            deadline = time.monotonic() + scaled(10)
            for node in self._nodes.values():
                self._wait_answers(node, deadline)
            self._create()
            self._wait_settled(scaled(30), "the new cluster to come up", full=True)
        except BaseException:
            self.stop()
            raise
        return self

    def masters(self) -> list[int]:
        """Ports of the masters serving slots now, as the first live node that answers
        sees the cluster.

        A killed master drops out once that node suspects it (``fail?``, about one node
        timeout after the kill); its replica shows up once promoted, which
        `wait_for_failover` waits for.
        """
        return sorted(entry.port for entry in self._view() if entry.is_master)

    def master_of(self, key: str) -> int:
        """Port of the master that owns the hash slot of ``key`` (hash tags respected).

        Between the kill of that master and the end of the failover, that is still the
        killed master: its slots move only when a replica takes over.
        """
        slot = key_slot(key.encode())
        for entry in self._view():
            if "master" in entry.flags and entry.owns(slot):
                return entry.port
        raise LookupError(f"no node owns slot {slot} (key {key!r})")

    def replica_of(self, master_port: int) -> int:
        """Port of the replica of the master on ``master_port`` (there is one per master)."""
        view = self._view()
        master = next((e for e in view if e.port == master_port), None)
        if master is None:
            raise LookupError(f"no node on port {master_port}")
        for entry in sorted(view, key=lambda e: e.port):
            if entry.master_id == master.node_id and not entry.failed:
                return entry.port
        raise LookupError(f"the node on port {master_port} has no live replica")

    def running(self, port: int) -> bool:
        """Whether the node on ``port`` is running (started and neither killed nor stopped)."""
        return self._nodes[port].running

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (a crash, as far as the cluster can tell) and
        wait for the process to exit."""
        node = self._nodes[port]
        if node.proc is None or not node.running:
            return
        # Remember the shard's replicas now: once the master is gone, nothing in the
        # cluster's state links it to the replica that takes over.
        try:
            view = self._view()
        except RuntimeError:
            view = []
        me = next((e for e in view if e.port == port), None)
        if me is not None and me.is_master:
            self._killed_shards[port] = [e.port for e in view if e.master_id == me.node_id]
        node.proc.kill()
        node.proc.wait()

    async def wait_for_failover(self, old_master_port: int) -> int:
        """After `kill` of a master, wait until one of its replicas has taken over and the
        cluster is ``ok`` again on every live node; the port of the new master.

        Runs in a thread: the polling uses blocking sockets and must not stall the
        test's event loop (and the clients on it) meanwhile.
        """
        return await asyncio.to_thread(self._wait_for_failover, old_master_port)

    async def restart(self, port: int) -> None:
        """Start a killed node again on the same ports and with its ``nodes-<port>.conf``,
        and wait until the cluster is settled with it. A former master that lost its
        slots in a failover rejoins as a replica of the node that took them."""
        await asyncio.to_thread(self._restart, port)

    async def cli(self, port: int, *args: str) -> str:
        """Run one ``redis-cli`` command against the node on ``port`` (see `redis_cli`)."""
        return await redis_cli(port, *args)

    def stop(self) -> None:
        """Stop every node by PID: SIGTERM to all at once, SIGKILL to any that linger."""
        live = [n.proc for n in self._nodes.values() if n.proc is not None and n.running]
        for proc in live:
            proc.terminate()
        deadline = time.monotonic() + scaled(10)
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _launch(self, node: _Node) -> None:
        args = [
            "redis-server",
            "--port",
            str(node.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(node.directory),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{node.port}.conf",
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            # The bus port is chosen free too: the default, port + 10000, may be taken
            # or beyond 65535 for the high ports free_port hands out.
            "--cluster-port",
            str(node.bus_port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            # Replicas sync at once instead of after the default 5 s grace period,
            # which would dominate the start time.
            "--repl-diskless-sync-delay",
            "0",
            # As docs/scaling.md advises for Herald: while one shard fails over, the
            # others keep answering instead of refusing every command.
            "--cluster-require-full-coverage",
            "no",
        ]
        with (node.directory / "redis.log").open("ab") as log:
            node.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def _wait_answers(self, node: _Node, deadline: float) -> None:
        assert node.proc is not None
        while True:
            try:
                if _ask(node.port, "PING", timeout=0.5) == "PONG":
                    return
            except (OSError, _ErrorReply):
                pass
            if node.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server of cluster node {node.port} exited with "
                    f"{node.proc.returncode}; its log ends:\n{node.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server of cluster node {node.port} did not answer PING; "
                    f"its log ends:\n{node.log_tail()}"
                )
            time.sleep(0.02)

    def _create(self) -> None:
        args = [
            "redis-cli",
            "--cluster",
            "create",
            *(f"127.0.0.1:{port}" for port in self._nodes),
            "--cluster-replicas",
            str(_REPLICAS_PER_MASTER),
            "--cluster-yes",
        ]
        try:
            done = subprocess.run(
                args, capture_output=True, timeout=scaled(30), check=False, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"redis-cli --cluster create hung:\n{self._logs()}") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise RuntimeError(
                f"redis-cli --cluster create failed with {done.returncode}:\n{output}\n"
                f"{self._logs()}"
            )

    def _restart(self, port: int) -> None:
        node = self._nodes[port]
        if node.running:
            raise ValueError(f"cluster node {port} is running: kill it first")
        self._launch(node)
        self._wait_answers(node, time.monotonic() + scaled(10))
        self._wait_settled(scaled(30), f"node {port} to rejoin")

    def _wait_for_failover(self, old_master_port: int) -> int:
        if self._nodes[old_master_port].running:
            raise ValueError(f"cluster node {old_master_port} is running: kill it first")
        if old_master_port not in self._killed_shards:
            raise ValueError(f"cluster node {old_master_port} was not a master when killed")
        candidates = self._killed_shards[old_master_port]
        what = f"a replica of node {old_master_port} to take over"

        def promoted() -> str | None:
            masters = self.masters()
            if not any(port in masters for port in candidates):
                return f"none of {candidates} is a master yet (masters: {masters})"
            return None

        self._wait_settled(scaled(30), what, also=promoted)
        del self._killed_shards[old_master_port]
        return next(port for port in candidates if port in self.masters())

    def _wait_settled(
        self,
        seconds: float,
        what: str,
        *,
        full: bool = False,
        also: _Check | None = None,
    ) -> None:
        """Poll until `_unsettled` (and ``also``) find nothing amiss, or fail saying
        what was still amiss at the deadline."""
        deadline = time.monotonic() + seconds
        while True:
            problem = self._unsettled(full)
            if problem is None and also is not None:
                problem = also()
            if problem is None:
                return
            for node in self._nodes.values():
                if node.proc is not None and node.proc.poll() not in (None, -signal.SIGKILL):
                    raise RuntimeError(
                        f"cluster node {node.port} exited with {node.proc.returncode} "
                        f"while waiting for {what}; its log ends:\n{node.log_tail()}"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"timed out after {seconds:.0f} s waiting for {what}: {problem}\n{self._logs()}"
                )
            time.sleep(_POLL)

    def _unsettled(self, full: bool) -> str | None:
        """What keeps the cluster from being settled, or None if it is settled.

        Settled: every live node says ``cluster_state:ok`` with all slots served; all
        live nodes agree on every node's role, master and slots; they mark every killed
        node failed and no live one; each live node is a master with slots or a replica
        whose link to its master is up. ``full``: also 3 masters with 1 replica each.
        """
        live = [port for port, node in self._nodes.items() if node.running]
        dead = set(self._nodes) - set(live)
        views: dict[int, set[tuple[str, int, bool, str | None, tuple[tuple[int, int], ...]]]] = {}
        agreed: list[_Entry] = []
        try:
            for port in live:
                info = _fields(_ask(port, "CLUSTER", "INFO"))
                if info.get("cluster_state") != "ok":
                    return f"node {port} says cluster_state:{info.get('cluster_state')}"
                if info.get("cluster_slots_ok") != str(SLOTS):
                    return f"node {port} has {info.get('cluster_slots_ok')} slots ok"
                entries = _parse_nodes(_ask(port, "CLUSTER", "NODES"))
                if len(entries) != len(self._nodes):
                    return f"node {port} knows {len(entries)} nodes"
                for entry in entries:
                    if entry.port in dead and "fail" not in entry.flags:
                        return f"node {port} does not mark killed node {entry.port} failed"
                    if entry.port not in dead and entry.failed:
                        return f"node {port} marks live node {entry.port} {set(entry.flags)}"
                views[port] = {
                    (e.node_id, e.port, "master" in e.flags, e.master_id, e.slots) for e in entries
                }
                agreed = entries
            if len({frozenset(view) for view in views.values()}) > 1:
                return "the nodes disagree on the cluster's layout"
            by_id = {entry.node_id: entry for entry in agreed}
            for entry in agreed:
                if entry.port in dead:
                    continue
                if "master" in entry.flags:
                    if not entry.slots:
                        return f"node {entry.port} is a master without slots"
                    continue
                master = by_id.get(entry.master_id or "")
                if master is None or master.port in dead:
                    return f"replica {entry.port} has no live master"
                replication = _fields(_ask(entry.port, "INFO", "replication"))
                if replication.get("master_port") != str(master.port):
                    return f"replica {entry.port} does not replicate {master.port} yet"
                if replication.get("master_link_status") != "up":
                    return f"replica {entry.port} is still syncing with {master.port}"
        except (OSError, _ErrorReply) as exc:
            return f"a node did not answer: {exc}"
        if full:
            masters = [e for e in agreed if "master" in e.flags]
            if len(masters) != _MASTERS or len(agreed) != len(masters) * 2:
                return f"{len(masters)} masters among {len(agreed)} nodes"
            for master in masters:
                replicas = [e for e in agreed if e.master_id == master.node_id]
                if len(replicas) != _REPLICAS_PER_MASTER:
                    return f"master {master.port} has {len(replicas)} replicas"
        return None

    def _view(self) -> list[_Entry]:
        """``CLUSTER NODES`` as the first live node that answers sees it."""
        errors: list[str] = []
        for port, node in self._nodes.items():
            if not node.running:
                continue
            try:
                return _parse_nodes(_ask(port, "CLUSTER", "NODES"))
            except (OSError, _ErrorReply) as exc:
                errors.append(f"{port}: {exc}")
        raise RuntimeError(f"no cluster node answered CLUSTER NODES: {errors}")

    def _logs(self) -> str:
        return "\n".join(
            f"--- node {node.port} log ends:\n{node.log_tail(15)}" for node in self._nodes.values()
        )


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (free_port may hand out a port twice in a row)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def start_redis_cluster(directory: Path) -> RedisClusterProcess:
    """A fresh Redis Cluster (3 masters, 3 replicas) storing its nodes' files under
    ``directory``."""
    return RedisClusterProcess(directory).start()
