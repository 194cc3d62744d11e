"""The dashboard and herald.js in a real browser: Debian's headless Chromium, driven by Playwright.

Playwright's own browser downloads are not used: the tests launch the system
``chromium`` (``scripts/setup.sh test`` installs it with apt-get). Without it the
tests skip with the reason, except under ``CI=true``, where they fail.

The dashboard test saves a screenshot next to the test's files and copies it to
``$HERALD_TEST_ARTIFACTS`` (default ``<tmp>/herald-test-artifacts``), and prints
where.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
from playwright.async_api import Browser, ConsoleMessage, Error, Page, async_playwright, expect

from herald.web import CONTENT_SECURITY_POLICY
from tests.e2e.conftest import open_api
from tests.support import RedisProcess, ServerProcess, scaled, start_server

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("HERALD_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(
    os.environ.get("HERALD_TEST_ARTIFACTS", Path(tempfile.gettempdir()) / "herald-test-artifacts")
)
WAIT_MS = scaled(10) * 1000
"""How long the page may take to show something (Playwright counts milliseconds)."""


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI is set: the browser tests must run, not skip)")
    pytest.skip(reason)


@dataclasses.dataclass
class BrowserPage:
    """A page of its own, and what went wrong in it: uncaught errors, console errors."""

    page: Page
    errors: list[str]
    console: list[str]

    def assert_clean(self) -> None:
        """No uncaught exception, no Content-Security-Policy violation."""
        assert self.errors == [], self.errors
        violations = [line for line in self.console if "Content Security Policy" in line]
        assert violations == [], violations


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium (the system's), closed after the test."""
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(
            f"Chromium not found at {CHROMIUM}: install it with `apt-get install chromium` "
            "(scripts/setup.sh test does), or set HERALD_TEST_CHROMIUM"
        )
    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            await instance.close()


@pytest.fixture
async def tab(browser: Browser) -> AsyncIterator[BrowserPage]:
    """A fresh page (its own context: empty sessionStorage) recording its errors."""
    context = await browser.new_context(viewport={"width": 1360, "height": 1000})
    page = await context.new_page()
    watched = BrowserPage(page, [], [])
    page.on("pageerror", lambda error: watched.errors.append(str(error)))

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            watched.console.append(message.text)

    page.on("console", on_console)
    try:
        yield watched
    finally:
        await context.close()


def _announce(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Print ``line`` in the test run's output, even while output is captured."""
    with capsys.disabled():
        print(f"\n{line}")


def _keep(artifact: Path) -> Path:
    """Copy a test artifact to `ARTIFACTS`; the copy's path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    copy = ARTIFACTS / artifact.name
    shutil.copyfile(artifact, copy)
    return copy


async def _sign_in(page: Page, server: ServerProcess) -> None:
    await page.goto(f"{server.url}/dashboard")
    await page.fill("#admin-key", server.key)
    await page.click("#login button[type=submit]")
    await expect(page.locator("#board")).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#link-state")).to_have_text("connected", timeout=WAIT_MS)


async def _tail(page: Page, channel: str) -> None:
    option = page.locator(f'#tail-channel option[value="{channel}"]')
    await expect(option).to_be_attached(timeout=WAIT_MS)
    await page.select_option("#tail-channel", channel)
    await page.click("#tail-form button[type=submit]")
    await expect(page.locator("#tail-state")).to_have_text(
        f"Tailing {channel} (live).", timeout=WAIT_MS
    )


def test_page_and_files_have_their_types_and_the_policy(server: ServerProcess) -> None:
    expected = {
        "/dashboard": "text/html; charset=utf-8",
        "/static/herald.js": "text/javascript; charset=utf-8",
        "/static/dashboard.js": "text/javascript; charset=utf-8",
        "/static/dashboard.css": "text/css; charset=utf-8",
    }
    with httpx.Client(base_url=server.url, timeout=scaled(10), trust_env=False) as http:
        for path, content_type in expected.items():
            response = http.get(path)  # no credentials: the page asks for the key itself
            assert response.status_code == 200, path
            assert response.headers["content-type"] == content_type, path
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert response.headers["x-content-type-options"] == "nosniff"
            again = http.get(path, headers={"If-None-Match": response.headers["etag"]})
            assert again.status_code == 304, path
        assert "script-src 'self';" in CONTENT_SECURITY_POLICY
        assert "unsafe" not in CONTENT_SECURITY_POLICY
        for missing in ("/static/nope.js", "/static/..%2Fweb.py", "/static/.hidden.js"):
            response = http.get(missing)
            assert response.status_code == 404, missing
            assert response.json()["code"] == "not_found"


async def test_dashboard_tails_a_channel_and_publishes(
    server: ServerProcess,
    tab: BrowserPage,
    channel_name: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    page = tab.page
    async with open_api(server) as api:
        await api.create_channel(channel_name, description="dashboard test")
        await api.create_channel(f"{channel_name}-other")
        await api.publish(channel_name, {"before": "tail"})  # history shown when tailing

        try:
            # A wrong key is refused and not kept.
            await page.goto(f"{server.url}/dashboard")
            await page.fill("#admin-key", "not-the-key")
            await page.click("#login button[type=submit]")
            await expect(page.locator("#login-error")).to_contain_text(
                "does not accept", timeout=WAIT_MS
            )
            assert await page.evaluate("sessionStorage.length") == 0

            await _sign_in(page, server)
            assert server.key not in page.url
            stored = await page.evaluate("sessionStorage.getItem('herald.adminKey')")
            assert stored == server.key
            assert await page.evaluate("localStorage.length") == 0

            await _tail(page, channel_name)
            tail = page.locator("#tail li")
            await expect(tail).to_have_count(1)  # the message published before
            await expect(page.locator("#publish-channel")).to_have_value(channel_name)

            # Published through the form: the answer names the id, the tail shows it.
            await page.fill("#publish-payload", '{"from": "form", "n": 1}')
            await page.click("#publish-form button[type=submit]")
            result = page.locator("#publish-result")
            await expect(result).to_contain_text("Published ", timeout=WAIT_MS)
            form_id = (await result.inner_text()).split()[1]
            form_entry = page.locator(f'#tail li[data-id="{form_id}"]')
            await expect(form_entry).to_contain_text('{"from":"form","n":1}', timeout=WAIT_MS)

            # Published over HTTP by someone else: it appears too, on top.
            http_id = await api.publish(channel_name, {"from": "http"})
            http_entry = page.locator(f'#tail li[data-id="{http_id}"]')
            await expect(http_entry).to_contain_text('{"from":"http"}', timeout=WAIT_MS)
            await expect(tail).to_have_count(3)
            await expect(tail.first).to_have_attribute("data-id", http_id)

            # The listing catches up: 3 messages, and the dashboard's own connection.
            row = page.locator(f'#channels tr[data-channel="{channel_name}"] td')
            await expect(row.nth(2)).to_have_text("3", timeout=WAIT_MS)
            await expect(row.nth(3)).to_have_text("1", timeout=WAIT_MS)
            rate = page.locator("#stat-rate")
            await expect(rate).to_have_text(re.compile(r"^\d"), timeout=WAIT_MS)
            await page.wait_for_timeout(1100)  # one more frame of the chart
            tab.assert_clean()
        finally:
            screenshot = tmp_path / "dashboard.png"
            await page.screenshot(path=screenshot, full_page=True)
            copy = _keep(screenshot)
            request.node.user_properties.append(("screenshot", str(copy)))
            _announce(capsys, f"dashboard screenshot: {copy}")


# In the page: two clients, one with a callback and one iterating, recording every id.
_SUBSCRIBE_IN_PAGE = """
async ({channel, key}) => {
  const { Herald } = await import("/static/herald.js");
  const options = { key, minDelay: 100, maxDelay: 1000 };
  window.test = { byCallback: [], byIterator: [], gaps: [], states: [] };
  window.callbackClient = new Herald(options);
  window.callbackClient.addEventListener(
    "statechange", (event) => window.test.states.push(event.detail.state));
  const subscription = window.callbackClient.subscribe(
    channel, (message) => window.test.byCallback.push(message.id),
    { onGap: (answer) => window.test.gaps.push(answer) });
  window.iteratorClient = new Herald(options);
  const iterated = window.iteratorClient.subscribe(channel);
  (async () => {
    for await (const message of iterated) window.test.byIterator.push(message.id);
  })();
  await Promise.all([subscription.ready, iterated.ready]);
}
"""


def _restart_on(port: int, directory: Path, redis: RedisProcess) -> ServerProcess:
    """A new ``herald serve`` on ``port`` (the one a stopped server had), once healthy."""
    server = start_server(directory, "--redis", redis.url, "--port", str(port), wait=False)
    server = dataclasses.replace(server, port=port)  # the last --port is the one it takes
    deadline = time.monotonic() + scaled(20)
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"herald exited with {server.proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise RuntimeError(f"herald did not become healthy:\n{server.log()}")
        time.sleep(0.05)


def _directory(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).mkdir()
    return tmp_path / name


@pytest.fixture
def stopped_later() -> Iterator[list[ServerProcess]]:
    """Servers the test starts, killed by PID at the end whatever happened."""
    servers: list[ServerProcess] = []
    yield servers
    for server in servers:
        server.stop(signal.SIGKILL)


async def _wait_for_states(page: Page, *, connected: bool) -> None:
    """Until both clients in the page are connected (or both are not)."""
    await page.wait_for_function(
        "(up) => [window.callbackClient, window.iteratorClient]"
        ".every((client) => (client.state === 'connected') === up)",
        arg=connected,
        timeout=WAIT_MS,
    )


async def _ids(page: Page, name: str) -> list[str]:
    ids: list[str] = await page.evaluate(f"window.test.{name}")
    return ids


@pytest.mark.redis
async def test_herald_js_recovers_every_message_across_a_server_restart(
    fresh_redis: RedisProcess,
    tab: BrowserPage,
    channel_name: str,
    tmp_path: Path,
    stopped_later: list[ServerProcess],
) -> None:
    page = tab.page
    first = start_server(_directory(tmp_path, "first"), "--redis", fresh_redis.url)
    stopped_later.append(first)
    # A second server on the same Redis, to publish while the first one's port is closed.
    other = start_server(_directory(tmp_path, "gap"), "--redis", fresh_redis.url)
    stopped_later.append(other)
    expected: list[str] = []

    async with open_api(first) as api_first, open_api(other) as api_other:
        await api_first.create_channel(channel_name)
        await _sign_in(page, first)  # the dashboard tails it too, through the restart
        await _tail(page, channel_name)
        await page.evaluate(_SUBSCRIBE_IN_PAGE, {"channel": channel_name, "key": first.key})

        expected += [await api_first.publish(channel_name, {"n": n}) for n in range(3)]
        await page.wait_for_function("() => window.test.byCallback.length >= 3", timeout=WAIT_MS)

        assert first.stop() == 0  # SIGTERM: the sockets close with 1012
        await _wait_for_states(page, connected=False)
        # Published while nobody in the page is connected (the port is closed).
        expected += [await api_other.publish(channel_name, {"n": n}) for n in range(3, 6)]
        assert await page.evaluate("window.callbackClient.state") != "connected"
        assert await _ids(page, "byCallback") == expected[:3]

        second = _restart_on(first.port, _directory(tmp_path, "second"), fresh_redis)
        stopped_later.append(second)
        await _wait_for_states(page, connected=True)
        async with open_api(second) as api_second:
            expected += [await api_second.publish(channel_name, {"n": n}) for n in range(6, 9)]
        # Ids only grow, and duplicates would come before the last one: once it is in,
        # the lists are complete.
        last = expected[-1]
        await page.wait_for_function(
            "(last) => window.test.byCallback.includes(last)"
            " && window.test.byIterator.includes(last)",
            arg=last,
            timeout=WAIT_MS,
        )

    assert await _ids(page, "byCallback") == expected
    assert await _ids(page, "byIterator") == expected
    test_state: dict[str, Any] = await page.evaluate("window.test")
    assert test_state["gaps"] == []  # every answer said recovered: true
    assert "disconnected" in test_state["states"]

    # The dashboard's tail (its own herald.js client, default backoff) recovers too.
    tail = page.locator("#tail li")
    await expect(tail.first).to_have_attribute("data-id", expected[-1], timeout=WAIT_MS * 2)
    shown = [await item.get_attribute("data-id") for item in await tail.all()]
    assert shown == expected[::-1]
    await expect(page.locator("#link-state")).to_have_text("connected")
    assert tab.errors == []


async def test_a_closed_client_ends_its_iterators(
    server: ServerProcess, tab: BrowserPage, channel_name: str
) -> None:
    page = tab.page
    async with open_api(server) as api:
        await api.create_channel(channel_name)
    await page.goto(f"{server.url}/dashboard")
    try:
        outcome = await page.evaluate(
            """async ({channel, key}) => {
              const { Herald } = await import("/static/herald.js");
              const herald = new Herald({ key });
              const subscription = herald.subscribe(channel);
              await subscription.ready;
              const published = await herald.publish(channel, { over: "websocket" });
              const first = await subscription.next();
              herald.close();
              const after = await subscription.next();
              const wrong = new Herald({ key: "wrong" });
              const refused = await wrong.connected().then(() => "connected", (e) => e.code);
              return { published, first: first.value.id, done: after.done, refused,
                       state: wrong.state };
            }""",
            {"channel": channel_name, "key": server.key},
        )
    except Error as exc:
        pytest.fail(f"herald.js failed in the page: {exc}")
    assert outcome["first"] == outcome["published"]
    assert outcome["done"] is True
    assert outcome["refused"] == "unauthorized"
    assert outcome["state"] == "closed"
    tab.assert_clean()
