"""The ``herald`` command: ``serve`` runs the server; the client commands
(``channels``, ``publish``, ``tail``, ``keys``, ``devices``, ``token``) talk to
a running one and live in `herald.cli_commands`."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import shutil
import sys
import tempfile

from herald import __version__, cli_commands
from herald.auth import new_key
from herald.config import ConfigError, Settings
from herald.errors import Unavailable
from herald.logs import configure

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herald",
        description="Realtime WebSocket pub/sub.",
        epilog="The client commands read --url/--key, or HERALD_URL (default "
        f"{cli_commands.DEFAULT_URL}) and HERALD_KEY. `herald COMMAND --help` says more.",
    )
    parser.add_argument("--version", action="version", version=f"herald {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Run Herald. Every flag also reads HERALD_<NAME> (e.g. HERALD_PORT).",
    )
    serve.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port for HTTP and WebSocket (default 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (needs --redis if > 1)")
    serve.add_argument(
        "--redis",
        dest="redis_url",
        metavar="URL",
        help="Redis URL (HERALD_REDIS_URL); without it the in-process memory engine is used",
    )
    serve.add_argument(
        "--redis-cluster",
        dest="redis_cluster",
        metavar="URLS",
        help="Redis Cluster startup nodes, comma-separated redis:// URLs (HERALD_REDIS_CLUSTER)",
    )
    serve.add_argument("--log-format", choices=["text", "json"], help="log line format")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    cli_commands.add_commands(commands)
    return parser


async def _bootstrap_redis(settings: Settings) -> str | None:
    from herald.engines import make_engine
    from herald.identity import ensure_bootstrap_key

    engine = make_engine(settings)
    try:
        return await ensure_bootstrap_key(engine, settings.admin_key)
    finally:
        await engine.close()


def use_multiprocess_dir() -> None:
    """Give this process and its workers a fresh metrics directory (removed at exit),
    unless ``PROMETHEUS_MULTIPROC_DIR`` is set already. prometheus_client reads it
    when it is first imported, so this runs before anything imports it."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    directory = tempfile.mkdtemp(prefix="herald-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    atexit.register(shutil.rmtree, directory, ignore_errors=True)


def serve(settings: Settings) -> int:
    """Run the server; print its URL and, when one was generated, the admin key."""
    log_config = configure(settings.log_format, settings.log_level)
    redis = settings.redis_cluster or settings.redis_url
    if redis:
        try:
            generated = asyncio.run(_bootstrap_redis(settings))
        except (Unavailable, ValueError) as exc:
            detail = exc.detail if isinstance(exc, Unavailable) else str(exc)
            print(f"herald: cannot reach Redis at {redis}: {detail}", file=sys.stderr)
            return 1
    else:
        generated = None if settings.admin_key else new_key()
        settings = settings.replace(admin_key=settings.admin_key or generated)
    engine = settings.engine
    print(
        f"Herald {__version__} listening on http://{settings.host}:{settings.port} "
        f"({engine} engine, {settings.workers} worker{'s' if settings.workers > 1 else ''})",
        flush=True,
    )
    print(f"WebSocket endpoint: ws://{settings.host}:{settings.port}/v1/connect", flush=True)
    if generated:
        print(f"Admin key (app 'default', shown once): {generated}", flush=True)
    elif redis and not settings.admin_key:
        print("Admin key: the one shown at first start (stored hashed in Redis)", flush=True)
    else:
        print("Admin key: taken from HERALD_ADMIN_KEY", flush=True)
    # Before anything imports prometheus_client: it picks its storage at import.
    use_multiprocess_dir()
    from herald.app import run  # imported late: `herald --help` stays fast

    run(settings, log_config)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``herald`` command."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        overrides = {k: v for k, v in vars(args).items() if k != "command"}
        try:
            settings = Settings.from_env(**overrides)
        except ConfigError as exc:
            print(f"herald: {exc}", file=sys.stderr)
            return 2
        return serve(settings)
    return cli_commands.run(args)
