"""Fixtures: real Herald processes on free ports, stopped by PID in teardown."""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import RedisClusterProcess, start_redis_cluster
from tests.support import RedisProcess, ServerProcess, start_redis, start_server

_names = itertools.count(1)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One ``herald serve`` (memory engine) shared by the tests that only add data to it."""
    proc = start_server(tmp_path_factory.mktemp("server"))
    yield proc
    proc.stop(signal.SIGKILL if proc.proc.poll() is None else signal.SIGTERM)


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A ``herald serve`` of the test's own, for tests that stop or upset it."""
    proc = start_server(tmp_path)
    yield proc
    proc.stop(signal.SIGKILL)


@pytest.fixture
def channel_name(request: pytest.FixtureRequest) -> str:
    """A channel name no other test uses."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:100]
    return f"{base}-{next(_names)}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One real ``redis-server`` shared by tests that only add data to it."""
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield proc
    proc.stop()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A ``redis-server`` of the test's own, for tests that kill or restart it."""
    proc = start_redis(tmp_path)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    """One real Redis Cluster (3 masters, 3 replicas) shared by tests that only add data
    to it; tests that kill or restart nodes take `fresh_redis_cluster`."""
    cluster = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def fresh_redis_cluster(tmp_path: Path) -> Iterator[RedisClusterProcess]:
    """A Redis Cluster of the test's own, for tests that kill, restart or fail over nodes."""
    cluster = start_redis_cluster(tmp_path / "redis-cluster")
    yield cluster
    cluster.stop()
