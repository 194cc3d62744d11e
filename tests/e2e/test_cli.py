"""``herald``'s client commands as a user runs them: a subprocess with ``HERALD_URL``
and ``HERALD_KEY`` in its environment, against a live server, reading what it
prints on stdout (JSON), on stderr (progress and errors) and its exit code."""

from __future__ import annotations

import base64
import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any

import httpx
import pytest

from herald.cli_commands import parse_payload, ws_url
from tests.support import ServerProcess, free_port, scaled

HERALD = [sys.executable, "-m", "herald"]

COMMANDS = [
    [],
    ["serve"],
    ["channels"],
    ["channels", "list"],
    ["channels", "create"],
    ["channels", "show"],
    ["channels", "close"],
    ["publish"],
    ["tail"],
    ["keys"],
    ["keys", "create"],
    ["keys", "list"],
    ["keys", "delete"],
    ["devices"],
    ["devices", "register"],
    ["devices", "show"],
    ["devices", "tags"],
    ["devices", "uninstall"],
    ["token"],
]
"""Every command and subcommand (``[]`` is ``herald`` itself)."""


def environment(url: str, key: str | None) -> dict[str, str]:
    """This environment without any ``HERALD_*`` but the connection's."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("HERALD_")}
    env["HERALD_URL"] = url
    if key is not None:
        env["HERALD_KEY"] = key
    return env


def herald(
    server: ServerProcess, *args: str, key: str | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``herald ARGS`` against ``server`` with its admin key (or ``key``)."""
    return subprocess.run(
        [*HERALD, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environment(server.url, key or server.key),
        timeout=scaled(30),
        check=False,
    )


def data(
    server: ServerProcess, *args: str, key: str | None = None, stdin: str | None = None
) -> Any:
    """What a command that must succeed prints, parsed."""
    done = herald(server, *args, key=key, stdin=stdin)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def run_all(
    runs: Sequence[tuple[Sequence[str], dict[str, str]]],
) -> list[subprocess.CompletedProcess[str]]:
    """Run several ``herald`` commands at once; their results, in order."""
    procs = [
        (
            list(args),
            subprocess.Popen(
                [*HERALD, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            ),
        )
        for args, env in runs
    ]
    results = []
    for args, proc in procs:
        stdout, stderr = proc.communicate(timeout=scaled(30))
        results.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    return results


def failed(done: subprocess.CompletedProcess[str], code: str) -> bool:
    """Whether a command failed as a refused request: exit 1, nothing on stdout, and
    ``error: <detail> (<code>[, <path>])`` as stderr's last line."""
    lines = done.stderr.strip().splitlines()
    return (
        done.returncode == 1
        and done.stdout == ""
        and bool(lines)
        and lines[-1].startswith("error: ")
        and (lines[-1].endswith(f"({code})") or f"({code}, " in lines[-1])
        and "Traceback" not in done.stderr
    )


class Lines:
    """The lines a running process writes to one of its pipes, read by a thread."""

    def __init__(self, pipe: IO[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._lines.put(line.rstrip("\n"))

    def next(self, seconds: float = 10) -> str:
        """The next line; fails if none comes in time."""
        try:
            return self._lines.get(timeout=scaled(seconds))
        except queue.Empty:
            pytest.fail(f"no line within {seconds} s")

    def until(self, text: str, seconds: float = 10) -> list[str]:
        """The lines up to the first that holds ``text``, that one included."""
        seen = [self.next(seconds)]
        while text not in seen[-1]:
            seen.append(self.next(seconds))
        return seen

    def rest(self) -> list[str]:
        """The lines left, once the process has ended."""
        self._thread.join(scaled(10))
        lines = []
        while not self._lines.empty():
            lines.append(self._lines.get())
        return lines


# Pure parts


def test_payload_is_json_when_it_parses_and_text_otherwise() -> None:
    assert parse_payload('{"a": [1, 2]}') == {"a": [1, 2]}
    assert parse_payload("42") == 42
    assert parse_payload('"quoted"') == "quoted"
    assert parse_payload("null") is None
    assert parse_payload("hello world") == "hello world"
    assert parse_payload("{not json") == "{not json"
    assert parse_payload("42", as_string=True) == "42"


def test_websocket_url_is_derived_from_the_http_url() -> None:
    assert ws_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/v1/connect"
    assert ws_url("https://herald.example/") == "wss://herald.example/v1/connect"
    assert ws_url("https://example.com/herald") == "wss://example.com/herald/v1/connect"
    with pytest.raises(ValueError, match="http"):
        ws_url("ftp://example.com")


# Round trips


def test_channel_create_list_show_publish_tail_close(
    server: ServerProcess, channel_name: str
) -> None:
    created = data(server, "channels", "create", channel_name, "--history-size", "10")
    assert created["name"] == channel_name
    assert created["history_size"] == 10
    assert set(created["keys"]) == {"admin_key", "subscriber_key", "ref"}

    assert channel_name in [channel["name"] for channel in data(server, "channels", "list")]
    shown = data(server, "channels", "show", channel_name)
    assert (shown["name"], shown["is_inactive"]) == (channel_name, False)

    published = [
        data(server, "publish", channel_name, '{"n": 1}'),
        data(server, "publish", channel_name, "hello world"),
        data(server, "publish", channel_name, "42", "--string"),
        data(server, "publish", channel_name, "-", stdin="[1, 2]\n"),
    ]
    assert [m["payload"] for m in published] == [{"n": 1}, "hello world", "42", [1, 2]]
    assert all(m["channel"] == channel_name for m in published)

    tail = herald(server, "tail", channel_name, "--since", "0-0", "--count", str(len(published)))
    assert tail.returncode == 0, tail.stderr
    assert [json.loads(line) for line in tail.stdout.splitlines()] == published
    assert f"subscribed to {channel_name}" in tail.stderr

    closed = data(server, "channels", "close", channel_name)
    assert (closed["name"], closed["is_inactive"]) == (channel_name, True)
    assert failed(herald(server, "publish", channel_name, "late"), "gone")


def test_tail_prints_live_messages_and_stops_on_ctrl_c(
    server: ServerProcess, channel_name: str
) -> None:
    api = httpx.Client(base_url=server.url, headers=server.headers, trust_env=False)
    with api:
        assert api.post("/v1/channels", json={"name": channel_name}).status_code == 201
        proc = subprocess.Popen(
            [*HERALD, "tail", channel_name],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(server.url, server.key),
        )
        try:
            assert proc.stdout is not None
            assert proc.stderr is not None
            stdout, stderr = Lines(proc.stdout), Lines(proc.stderr)
            stderr.until(f"subscribed to {channel_name}")
            sent = api.post(f"/v1/channels/{channel_name}/publish", json={"payload": {"live": 1}})
            assert sent.status_code == 201
            message = json.loads(stdout.next())
            assert message["id"] == sent.json()["data"]["id"]
            assert message["payload"] == {"live": 1}
            proc.send_signal(signal.SIGINT)
            assert proc.wait(scaled(10)) == 128 + signal.SIGINT
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert stdout.rest() == []
        rest = stderr.rest()
        assert rest == ["stopped"], rest


def test_keys_create_list_delete(server: ServerProcess, channel_name: str) -> None:
    created = data(server, "keys", "create", "publish", "--name", "cli")
    assert (created["scopes"], created["name"]) == (["publish"], "cli")
    listed = data(server, "keys", "list")
    assert created["id"] in [key["id"] for key in listed]
    assert not any("key" in key for key in listed), "listing shows no secret"

    # The new key works, until it is deleted.
    body = {"name": channel_name}
    response = httpx.post(
        f"{server.url}/v1/channels", json=body, headers=server.headers, trust_env=False
    )
    assert response.status_code == 201, response.text
    assert data(server, "publish", channel_name, "1", key=created["key"])["payload"] == 1
    assert data(server, "keys", "delete", created["id"])["id"] == created["id"]
    assert failed(herald(server, "publish", channel_name, "2", key=created["key"]), "unauthorized")


def test_devices_register_show_tags_uninstall(server: ServerProcess) -> None:
    address = f"toy-{secrets.token_hex(6)}"
    registered = data(
        server, "devices", "register", address, "toy", "--tag", "toaster", "--timezone", "UTC"
    )
    device_id = registered["device_id"]
    assert registered["connection_key"]
    shown = data(server, "devices", "show", device_id)
    assert (shown["address"], shown["tags"]["device"]) == (address, ["toaster"])

    added = data(server, "devices", "tags", device_id, "--add", "color=red,blue", "--add", "big")
    assert added["tags"]["device"] == ["toaster", "big"]
    assert added["tags"]["color"] == ["red", "blue"]
    by_address = ["--address", address, "--platform", "toy"]
    removed = data(server, "devices", "tags", *by_address, "--remove", "color=red")
    assert removed["tags"]["color"] == ["blue"]
    emptied = data(server, "devices", "tags", device_id, "--set", "color=")
    assert "color" not in emptied["tags"]

    assert data(server, "devices", "uninstall", *by_address) == {
        "device_id": device_id,
        "uninstalled": True,
    }
    assert failed(herald(server, "devices", "show", device_id), "not_found")


def test_token_is_a_jwt_for_the_user(server: ServerProcess) -> None:
    minted = data(server, "token", "ann", "--ttl", "60")
    assert minted["user_id"] == "ann"
    _header, claims, _signature = minted["token"].split(".")
    decoded = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    assert decoded["sub"] == "ann"
    assert decoded["exp"] - decoded["iat"] == 60


# Help and failures


def test_every_command_has_help() -> None:
    env = environment("http://127.0.0.1:1", None)
    results = run_all([([*command, "--help"], env) for command in COMMANDS])
    for command, done in zip(COMMANDS, results, strict=True):
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.startswith(f"usage: {' '.join(['herald', *command])}"), command
    top = results[0].stdout
    for name in ("serve", "channels", "publish", "tail", "keys", "devices", "token"):
        assert f"    {name} " in top, name


def test_a_bad_key_is_an_error_on_stderr(server: ServerProcess, channel_name: str) -> None:
    env = environment(server.url, "not-a-key")
    http, ws = run_all(
        [
            (["channels", "list"], env),
            (["tail", channel_name, "--connect-timeout", "10"], env),
        ]
    )
    assert failed(http, "unauthorized"), http
    assert failed(ws, "unauthorized"), ws


def test_usage_errors_exit_2(server: ServerProcess) -> None:
    env = environment(server.url, server.key)
    results = run_all(
        [
            (["publish", "news"], env),  # no payload
            (["channels", "list"], environment(server.url, None)),  # no key
            (["channels", "list", "--url", "ftp://example.com"], env),
            (["devices", "tags", "dev_x"], env),  # nothing to change
            (["devices", "uninstall"], env),  # which device?
            (["token", "ann", "--ttl", "0"], env),
            (["channels", "create", "x", "--fields", "[1]"], env),
            (["channels", "create", "x", "--fields", '{"name": "y"}'], env),
        ]
    )
    for done in results:
        assert done.returncode == 2, (done.args, done.stderr)
        assert "usage: herald" in done.stderr, done.args
        assert done.stdout == ""


def test_an_unreachable_server_is_an_error() -> None:
    env = environment(f"http://127.0.0.1:{free_port()}", "some-key")
    http, ws = run_all(
        [(["keys", "list"], env), (["tail", "news", "--connect-timeout", "1.5"], env)]
    )
    assert failed(http, "unreachable"), http
    assert failed(ws, "unreachable"), ws
    assert "waiting for ws://127.0.0.1:" in ws.stderr
