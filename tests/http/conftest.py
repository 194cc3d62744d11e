"""Fixtures of the HTTP tests."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support import ServerProcess, scaled


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    """An HTTP client on the shared server, carrying the operator (bootstrap admin) key."""
    with httpx.Client(
        base_url=server.url, headers=server.headers, timeout=scaled(10), trust_env=False
    ) as client:
        yield client
