"""The ``herald`` command."""

from __future__ import annotations

import argparse
import sys

from herald import __version__
from herald.config import ConfigError, Settings
from herald.logs import configure
from herald.node import Node

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herald", description="Realtime WebSocket pub/sub.")
    parser.add_argument("--version", action="version", version=f"herald {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
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
        help="Redis URL; without it the in-process memory engine is used",
    )
    serve.add_argument("--log-format", choices=["text", "json"], help="log line format")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser


def _announce(settings: Settings, generated: bool) -> object:
    def on_ready(node: Node) -> None:
        print(
            f"Herald {__version__} listening on http://{settings.host}:{settings.port}", flush=True
        )
        print(f"WebSocket endpoint: ws://{settings.host}:{settings.port}/v1/connect", flush=True)
        if generated:
            print(f"Admin key (app 'default', shown once): {node.admin_key}", flush=True)
        else:
            print("Admin key: taken from HERALD_ADMIN_KEY", flush=True)

    return on_ready


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
        log_config = configure(settings.log_format, settings.log_level)
        from herald.app import run  # imported late: `herald --help` stays fast

        on_ready = _announce(settings, generated=settings.admin_key is None)
        run(settings, log_config, on_ready)  # type: ignore[arg-type]
    return 0
