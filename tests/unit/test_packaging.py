"""Packaging and docs: what the Dockerfile, docker-compose.yml and docs/ promise.

Everything here runs without a Docker engine: the image's command is parsed
with Herald's own argument parser, the health check's Python runs against a
stub server, compose's environment is fed to `Settings`, and the docs are held
to every setting, close code and frame the code has.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from herald.cli import _parser
from herald.config import ConfigError, Settings
from herald.errors import CloseCode

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PACKAGE = ROOT / "server" / "herald"


# Dockerfile


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result: list[tuple[str, str]] = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def instruction(name: str) -> list[str]:
    """The arguments of every ``name`` instruction, in order."""
    return [args for keyword, args in instructions() if keyword == name]


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) command."""
    value = json.loads(args)
    assert isinstance(value, list), args
    assert all(isinstance(part, str) for part in value), args
    return value


def command() -> list[str]:
    """The image's command (the last ``CMD``, in exec form, so SIGTERM reaches Herald)."""
    cmds = instruction("CMD")
    assert cmds, "the Dockerfile has no CMD"
    assert not instruction("ENTRYPOINT"), "the command is a plain CMD: easy to override"
    return exec_form(cmds[-1])


def healthcheck() -> list[str]:
    """The health check's command."""
    (args,) = instruction("HEALTHCHECK")
    _, sep, cmd = args.partition("CMD ")
    assert sep, args
    return exec_form(cmd)


def test_console_script_is_declared() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = pyproject["project"]["scripts"]["herald"]
    module, _, attribute = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))


def test_serve_help_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "herald", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--host" in done.stdout


def test_image_runs_herald_serve_on_every_interface() -> None:
    cmd = command()
    assert cmd[0] == "herald"
    args = _parser().parse_args(cmd[1:])  # exits (fails) on a flag `herald` does not have
    assert args.command == "serve"
    assert args.host == "0.0.0.0"


def test_image_is_slim_python_311_and_installs_the_package() -> None:
    bases = [args.split()[0] for args in instruction("FROM")]
    assert bases
    assert all(base == "python:3.11-slim" for base in bases), bases
    installs = [run for run in instruction("RUN") if "pip install" in run]
    assert installs, "the Dockerfile does not pip install Herald"
    assert all("--no-cache-dir" in run for run in installs)
    assert any(re.search(r"pip install (--\S+ |-c \S+ )*\.(\s|$)", run) for run in installs)
    # The versions the tests passed with, as scripts/setup.sh installs them.
    assert any("-c constraints.txt" in run for run in installs)
    assert not any("apt-get" in run for run in instruction("RUN")), "no build tools"


def test_build_context_holds_what_the_image_copies() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for args in instruction("COPY"):
        if args.startswith("--from"):
            continue
        *sources, _ = args.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source not in ignored, source


def test_image_does_not_run_as_root() -> None:
    users = instruction("USER")
    assert users, "no USER: the server would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0")
    assert group not in ("root", "0")
    keywords = [keyword for keyword, _ in instructions()]
    last_user = len(keywords) - 1 - keywords[::-1].index("USER")
    assert keywords.index("CMD") > last_user
    if user.isdigit():
        assert any(f"--uid {user}" in run for run in instruction("RUN")), "the uid is created"


def test_exposed_port_is_the_default_port() -> None:
    assert instruction("EXPOSE") == [str(Settings().port)]


def test_image_sets_only_real_settings() -> None:
    names = {f"HERALD_{field.name.upper()}" for field in dataclasses.fields(Settings)}
    for args in instruction("ENV"):
        for variable in re.findall(r"\b(HERALD_\w+)=", args):
            assert variable in names, variable


# The health check


def test_healthcheck_is_python_asking_for_healthz_on_the_default_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cmd = healthcheck()
    assert cmd[:2] == ["python", "-c"], "slim images have no curl: the check is Python"
    code = compile(cmd[2], "<healthcheck>", "exec")
    asked: list[str] = []

    def urlopen(url: str, *args: object, **kwargs: object) -> None:
        asked.append(url)

    monkeypatch.delenv("HERALD_PORT", raising=False)
    # Only to read which URL it asks for; the tests below run it against a real server.
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    exec(code, {"__name__": "__main__"})
    assert asked == [f"http://127.0.0.1:{Settings().port}/healthz"]


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        body = b'{"data": {"status": "ok"}, "meta": {"code": 200}}'
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Down(_Health):
    status = 503


@pytest.fixture(params=[_Health, _Down], ids=["healthy", "unhealthy"])
def stub(request: pytest.FixtureRequest) -> Iterator[tuple[int, int]]:
    """A stub /healthz on a free port: (port, the status it answers)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], request.param.status
    finally:
        server.shutdown()
        server.server_close()


def run_healthcheck(port: int) -> int:
    cmd = healthcheck()
    env = {**os.environ, "HERALD_PORT": str(port)}
    done = subprocess.run(
        [sys.executable, *cmd[1:]], capture_output=True, env=env, timeout=30, check=False
    )
    return done.returncode


def test_healthcheck_passes_only_on_200(stub: tuple[int, int]) -> None:
    port, status = stub
    assert (run_healthcheck(port) == 0) == (status == 200)


def test_healthcheck_fails_when_nothing_listens() -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), _Health) as server:
        port = server.server_address[1]
    assert run_healthcheck(port) != 0


# docker-compose.yml


def compose() -> dict[str, Any]:
    import yaml  # PyYAML: a test dependency (schemathesis reads YAML schemas with it)

    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


def interpolate(value: object) -> str:
    """A compose value with ``${VAR:-default}`` / ``${VAR}`` as an unset VAR gives them."""
    text = str(value)
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m[1] or "", text)


def herald_environment() -> dict[str, str]:
    environment = compose()["services"]["herald"]["environment"]
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {str(k): interpolate(v) for k, v in environment.items()}


def test_compose_sets_only_variables_settings_reads() -> None:
    names = {f"HERALD_{field.name.upper()}" for field in dataclasses.fields(Settings)}
    environment = herald_environment()
    assert set(environment) <= names, sorted(set(environment) - names)


def test_compose_runs_two_workers_on_its_redis() -> None:
    environment = herald_environment()
    try:
        settings = Settings.from_env(environment)
    except ConfigError as exc:  # pragma: no cover - the message says what to fix
        pytest.fail(f"herald would refuse compose's settings: {exc}")
    assert settings.workers == 2
    assert settings.redis_url is not None
    host = re.match(r"rediss?://([^:/@]+)", settings.redis_url)
    assert host is not None
    services = compose()["services"]
    assert host[1] in services
    assert host[1] in services["herald"]["depends_on"]


def test_compose_publishes_the_default_port() -> None:
    ports = [str(p) for p in compose()["services"]["herald"]["ports"]]
    assert any(p.split("/")[0].rsplit(":", 1)[-1] == str(Settings().port) for p in ports)


def test_compose_redis_is_7_with_the_append_only_file() -> None:
    redis = compose()["services"]["redis"]
    assert str(redis["image"]).split(":")[1].startswith("7")
    cmd = redis["command"]
    words = cmd if isinstance(cmd, list) else str(cmd).split()
    assert words[words.index("--appendonly") + 1] == "yes"
    assert any(str(v).endswith(":/data") for v in redis["volumes"]), "the AOF outlives the box"


# docs/


def documented_default(value: object) -> str:
    """How docs/operations.md writes a default: the value, or a word for none."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value or "empty"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def settings_table() -> dict[str, list[str]]:
    """docs/operations.md's settings table: variable → the row's cells."""
    rows: dict[str, list[str]] = {}
    for line in (DOCS / "operations.md").read_text().splitlines():
        match = re.match(r"\|\s*`(HERALD_\w+)`\s*\|(.*)\|\s*$", line)
        if match:
            rows[match[1]] = [cell.strip() for cell in match[2].split("|")]
    return rows


def test_every_setting_is_documented_with_its_default() -> None:
    defaults = Settings()
    expected = {
        f"HERALD_{field.name.upper()}": documented_default(getattr(defaults, field.name))
        for field in dataclasses.fields(Settings)
    }
    rows = settings_table()
    missing = sorted(set(expected) - set(rows))
    assert not missing, f"settings missing from docs/operations.md: {missing}"
    stale = sorted(set(rows) - set(expected))
    assert not stale, f"docs/operations.md documents settings that do not exist: {stale}"
    for variable, default in expected.items():
        _flag, documented, *_ = rows[variable]
        assert documented == f"`{default}`", f"{variable}: default {default}, docs {documented}"


def test_documented_flags_set_their_setting() -> None:
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    flags = {option: action.dest for action in serve._actions for option in action.option_strings}
    for variable, (flag, *_) in settings_table().items():
        if flag:
            setting = variable.removeprefix("HERALD_").lower()
            assert flags.get(flag.strip("`")) == setting, f"{flag} does not set {variable}"


def section(path: Path, heading: str) -> str:
    """The text under a ``## heading``, up to the next ``## ``."""
    text = path.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_every_close_code_is_documented() -> None:
    table = section(DOCS / "protocol.md", "Close codes")
    documented = {int(code) for code in re.findall(r"^\|\s*`(\d{4})`", table, re.M)}
    assert documented == {int(code) for code in CloseCode}


def frame_ops() -> set[str]:
    """Every ``op`` the server reads or writes, from its sources."""
    ops: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        ops.update(re.findall(r"""\bop == ["'](\w+)["']""", text))
        ops.update(re.findall(r"""["']op["']: ["'](\w+)["']""", text))
    return ops


def test_every_frame_is_documented() -> None:
    ops = frame_ops()
    assert {"connect", "subscribe", "message", "error"} <= ops, ops
    text = (DOCS / "protocol.md").read_text()
    headings = set(re.findall(r"^#### `(\w+)`$", text, re.M))
    assert ops <= headings, f"frames missing from docs/protocol.md: {sorted(ops - headings)}"


def test_docs_links_point_at_existing_files() -> None:
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}"


def test_docs_name_the_api_document_that_exists() -> None:
    from herald.openapi import routes

    assert "/openapi.json" in {route.path for route in routes}
    assert "/openapi.json" in (DOCS / "api.md").read_text()
