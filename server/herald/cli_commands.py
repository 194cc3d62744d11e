"""The client commands of ``herald``: channels, publish, tail, keys, devices, token.

Each talks to a running server over its HTTP API (or, for ``tail``, its
WebSocket endpoint) with one key. Where: ``--url`` or ``HERALD_URL`` (default
``http://127.0.0.1:8000``; the WebSocket URL is derived from it), with what:
``--key`` or ``HERALD_KEY``.

What they print: the answer's data as JSON on stdout (indented when stdout is
a terminal); progress on stderr; failures on stderr as
``error: <detail> (<code>, <path>)`` with exit code 1. Usage errors exit 2,
as argparse does. `herald.client` is imported only when a command runs, so
``herald --help`` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

import orjson

if TYPE_CHECKING:
    from herald.client import Client, HttpApi, Message, Subscription

__all__ = [
    "CLIENT_COMMANDS",
    "DEFAULT_URL",
    "CommandError",
    "Target",
    "add_commands",
    "parse_payload",
    "run",
    "ws_url",
]

DEFAULT_URL = "http://127.0.0.1:8000"
"""Where the commands look for Herald when neither ``--url`` nor ``HERALD_URL`` says."""

CLIENT_COMMANDS = ("channels", "publish", "tail", "keys", "devices", "token")
"""The top-level commands this module adds (``serve`` is `herald.cli`'s)."""

_SCOPES = ("admin", "publish", "subscribe")
_WAIT_NOTICE_AFTER = 1.0  # seconds of connecting before ``tail`` says it is waiting
_WATCH_INTERVAL = 0.25  # how often ``tail`` checks whether its connection dropped

HttpCall = Callable[[argparse.Namespace, "HttpApi"], Awaitable[Any]]
"""An HTTP command: the data to print (None prints nothing)."""

Runner = Callable[[argparse.Namespace, "Target"], Coroutine[Any, Any, int]]
"""What a command runs once its arguments are checked: the exit code."""


class CommandError(Exception):
    """A failure to report as ``error: <detail> (<code>, <path>)``, exit code 1."""

    def __init__(self, detail: str, code: str, path: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code
        self.path = path

    def line(self) -> str:
        """The line printed on stderr."""
        where = f", {self.path}" if self.path else ""
        return f"error: {self.detail} ({self.code}{where})"


@dataclass(frozen=True, slots=True)
class Target:
    """The server a command talks to, and the key it uses."""

    url: str
    """The HTTP root, ``http(s)://host:port[/prefix]``."""
    key: str
    timeout: float
    """Seconds to wait for an HTTP answer (and for a WebSocket request)."""

    @property
    def ws_url(self) -> str:
        """The WebSocket endpoint that goes with `url`."""
        return ws_url(self.url)


def ws_url(url: str) -> str:
    """The WebSocket endpoint of a server root: ``http://h:p`` → ``ws://h:p/v1/connect``
    (``https`` gives ``wss``; a path prefix is kept)."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"not an http(s):// URL: {url!r}")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/v1/connect", "", ""))


def parse_payload(text: str, *, as_string: bool = False) -> Any:
    """A payload given on the command line: its JSON value if it parses as JSON (and
    ``as_string`` is false), else the text itself."""
    if as_string:
        return text
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


# Argument types: argparse reports what they raise as a usage error (exit 2).


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _tags(text: str) -> tuple[str, list[str]]:
    """``GROUP=TAG,TAG`` (``GROUP=`` for none), or ``TAG,TAG`` in the ``device`` group."""
    group, sep, tags = text.partition("=") if "=" in text else ("device", "", text)
    if sep and not group:
        raise argparse.ArgumentTypeError(f"no group before '=': {text!r}")
    return group, [tag for tag in tags.split(",") if tag]


def _group_tags(pairs: list[tuple[str, list[str]]] | None) -> dict[str, list[str]] | None:
    if not pairs:
        return None
    groups: dict[str, list[str]] = {}
    for group, tags in pairs:
        groups.setdefault(group, []).extend(tags)
    return groups


# The parser


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions; keeps an epilog's lines (examples) as they are written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _connection_options() -> argparse.ArgumentParser:
    """``--url``, ``--key`` and ``--timeout``: every client command takes them."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("connection")
    group.add_argument(
        "--url",
        help=f"the server's HTTP root (HERALD_URL; default {DEFAULT_URL}); "
        "the WebSocket URL is derived from it",
    )
    group.add_argument(
        "--key",
        help="the key to use (HERALD_KEY; the variable keeps it out of the process list)",
    )
    group.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for each answer (default 10)",
    )
    return options


def _command(
    parent: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    connection: argparse.ArgumentParser,
    *,
    help: str,
    description: str | None = None,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    return parent.add_parser(
        name,
        parents=[connection],
        help=help,
        description=description or help[0].upper() + help[1:] + ".",
        epilog=epilog,
        formatter_class=_Formatter,
    )


def _http(call: HttpCall, parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(runner=_http_runner(call), command_parser=parser)


def _device_selector(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("device_id", nargs="?", metavar="DEVICE_ID", help="the device's id")
    parser.add_argument("--address", help="or the device's address (with --platform)")
    parser.add_argument("--platform", help="and its platform")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client commands to ``herald``'s subcommands."""
    connection = _connection_options()
    _add_channels(commands, connection)
    _add_publish(commands, connection)
    _add_tail(commands, connection)
    _add_keys(commands, connection)
    _add_devices(commands, connection)
    _add_token(commands, connection)


def _add_channels(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    connection: argparse.ArgumentParser,
) -> None:
    """``channels list|create|show|close``."""
    channels = commands.add_parser(
        "channels",
        help="list, create, show and close channels",
        description="Manage channels over the HTTP API.",
    )
    channel_commands = channels.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = _command(channel_commands, "list", connection, help="list channels, by name")
    listing.add_argument("--type", choices=["default", "separate_rooms"], help="only this type")
    listing.add_argument(
        "--include-inactive", action="store_true", help="closed channels too (hidden otherwise)"
    )
    listing.add_argument(
        "--limit", type=_positive_int, metavar="N", help="at most N channels (default: all)"
    )
    _http(_channels_list, listing)

    create = _command(
        channel_commands,
        "create",
        connection,
        help="create a channel",
        description="Create a channel. The answer holds its keys (admin_key, "
        "subscriber_key, ref): they are shown this once.",
        epilog="example:\n  herald channels create news --history-size 100 "
        '--fields \'{"readers": {"public": true}}\'',
    )
    create.add_argument("name", metavar="NAME", help="the channel's name ([A-Za-z0-9_.:-])")
    create.add_argument("--type", choices=["default", "separate_rooms"], help="default: default")
    create.add_argument("--description")
    create.add_argument("--history-size", type=_positive_int, metavar="N", help="messages kept")
    create.add_argument(
        "--history-ttl", type=_positive_int, metavar="SECONDS", help="how long messages are kept"
    )
    create.add_argument(
        "--idle-timeout",
        type=_positive_int,
        metavar="SECONDS",
        help="close the channel after this long without a publish",
    )
    create.add_argument(
        "--custom-publish", action="store_true", help="let the writers ACL's users publish"
    )
    create.add_argument(
        "--fields",
        type=_json_object,
        metavar="JSON",
        help="more fields as a JSON object (readers, writers, editors, annotations, ...)",
    )
    _http(_channels_create, create)

    show = _command(channel_commands, "show", connection, help="show one channel")
    show.add_argument("name", metavar="NAME")
    _http(_channels_show, show)

    close = _command(
        channel_commands,
        "close",
        connection,
        help="close a channel for good",
        description="Close a channel for good: publishes are refused, subscribers are "
        "unsubscribed, history stays readable.",
    )
    close.add_argument("name", metavar="NAME")
    _http(_channels_close, close)


def _add_publish(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    connection: argparse.ArgumentParser,
) -> None:
    """``publish CHANNEL PAYLOAD``."""
    publish = _command(
        commands,
        "publish",
        connection,
        help="publish one message",
        description="Publish one message over HTTP; prints it once it is stored.",
        epilog="PAYLOAD is sent as JSON when it parses as JSON, else as a string:\n"
        '  herald publish news \'{"hello": "world"}\'   # an object\n'
        "  herald publish news 42                       # a number\n"
        "  herald publish news 'hello world'            # a string\n"
        '  herald publish news 42 --string              # the string "42"\n'
        "  echo '[1, 2]' | herald publish news -        # read from stdin",
    )
    publish.add_argument("channel", metavar="CHANNEL")
    publish.add_argument(
        "payload", metavar="PAYLOAD", help="the payload (JSON or text); - reads stdin"
    )
    publish.add_argument("--room", help="the room (separate_rooms channels)")
    publish.add_argument("--string", action="store_true", help="send PAYLOAD as a string")
    publish.add_argument("--metadata", type=_json_object, metavar="JSON", help="a JSON object")
    publish.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="a retry with the same key within 10 minutes publishes nothing new",
    )
    _http(_publish, publish)


def _add_tail(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    connection: argparse.ArgumentParser,
) -> None:
    """``tail CHANNEL``: follow a channel over WebSocket."""
    tail = _command(
        commands,
        "tail",
        connection,
        help="print a channel's messages as they come",
        description="Subscribe over WebSocket and print each message as one JSON line. "
        "Reconnects by itself and resumes where it stopped, so no message is missed "
        "or repeated. Ctrl-C stops it (exit 130).",
        epilog="example:\n  herald tail news --since 0-0   # everything retained, then live",
    )
    tail.add_argument("channel", metavar="CHANNEL")
    tail.add_argument("--room", help="the room (separate_rooms channels)")
    tail.add_argument(
        "--since",
        metavar="ID",
        help="first the retained messages after this id (0-0: all of them)",
    )
    tail.add_argument("--count", type=_positive_int, metavar="N", help="exit after N messages")
    tail.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="give up if the first connection takes longer (default 30; 0: never)",
    )
    tail.add_argument(
        "-q", "--quiet", action="store_true", help="no progress on stderr, only warnings"
    )
    tail.set_defaults(runner=_tail, command_parser=tail)


def _add_keys(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    connection: argparse.ArgumentParser,
) -> None:
    """``keys create|list|delete``."""
    keys = commands.add_parser(
        "keys",
        help="create, list and delete app keys",
        description="Manage the app's keys (needs an admin key).",
    )
    key_commands = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    key_create = _command(
        key_commands,
        "create",
        connection,
        help="create a key",
        description="Create an app key. The answer holds the key: it is shown this once.",
        epilog="example:\n  herald keys create publish --name backend",
    )
    key_create.add_argument("scopes", nargs="+", choices=_SCOPES, metavar="SCOPE")
    key_create.add_argument("--name", help="a label for it")
    _http(_keys_create, key_create)
    _http(_keys_list, _command(key_commands, "list", connection, help="list keys (not secrets)"))
    key_delete = _command(
        key_commands, "delete", connection, help="delete a key: it stops working at once"
    )
    key_delete.add_argument("key_id", metavar="KEY_ID", help="the key's id (key_...)")
    _http(_keys_delete, key_delete)


def _add_devices(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    connection: argparse.ArgumentParser,
) -> None:
    """``devices register|show|tags|uninstall``."""
    devices = commands.add_parser(
        "devices",
        help="register, show, tag and uninstall devices",
        description="Manage devices (needs an admin key).",
    )
    device_commands = devices.add_subparsers(dest="action", required=True, metavar="ACTION")
    register = _command(
        device_commands,
        "register",
        connection,
        help="register or update a device",
        description="Register a device by (platform, address), or update the one registered "
        "already. A new device's connection_key is shown this once.",
        epilog="example:\n"
        "  herald devices register toy-0042 toy --tag toaster --timezone Europe/Paris",
    )
    register.add_argument(
        "address", metavar="ADDRESS", help="the device's address (unique per platform)"
    )
    register.add_argument("platform", metavar="PLATFORM", help="e.g. ios, android, toy")
    register.add_argument(
        "--tag", action="append", dest="tags", metavar="TAG", help="a tag (repeatable)"
    )
    register.add_argument("--timezone", help="e.g. Europe/Paris")
    register.add_argument("--locale-country", metavar="CC", help="e.g. FR")
    register.add_argument("--locale-language", metavar="LANG", help="e.g. fr")
    register.add_argument(
        "--opt-in",
        action=argparse.BooleanOptionalAction,
        help="whether it receives messages and commands (--no-opt-in: none)",
    )
    register.add_argument(
        "--fields", type=_json_object, metavar="JSON", help="more device fields (identifiers, ...)"
    )
    _http(_devices_register, register)

    device_show = _command(device_commands, "show", connection, help="show a device")
    device_show.add_argument("device_id", metavar="DEVICE_ID")
    _http(_devices_show, device_show)

    tags = _command(
        device_commands,
        "tags",
        connection,
        help="change a device's tags",
        description="Add, remove or set a device's tags; prints its tags. The device is "
        "DEVICE_ID, or --address with --platform.",
        epilog="TAGS is GROUP=TAG[,TAG...], or TAG[,TAG...] in the group 'device'.\n"
        "examples:\n"
        "  herald devices tags dev_123 --add toaster --add color=red,blue\n"
        "  herald devices tags --address toy-0042 --platform toy --remove color=blue\n"
        "  herald devices tags dev_123 --set color=    # an empty set removes the group",
    )
    _device_selector(tags)
    tags.add_argument("--add", action="append", type=_tags, metavar="TAGS", help="add tags")
    tags.add_argument("--remove", action="append", type=_tags, metavar="TAGS", help="remove tags")
    tags.add_argument(
        "--set",
        action="append",
        type=_tags,
        metavar="TAGS",
        help="replace a group (alone: not with --add or --remove)",
    )
    _http(_devices_tags, tags)

    uninstall = _command(
        device_commands,
        "uninstall",
        connection,
        help="uninstall a device",
        description="Uninstall a device: its connection is closed, its key stops working and "
        "its subscriptions go. The device is DEVICE_ID, or --address with --platform.",
    )
    _device_selector(uninstall)
    _http(_devices_uninstall, uninstall)


def _add_token(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    connection: argparse.ArgumentParser,
) -> None:
    """``token USER_ID``."""
    token = _command(
        commands,
        "token",
        connection,
        help="mint a user token",
        description="Mint a user token (a JWT) for a front end (needs an admin key).",
    )
    token.add_argument("user_id", metavar="USER_ID")
    token.add_argument(
        "--ttl", type=_positive_int, metavar="SECONDS", help="its lifetime (default 3600)"
    )
    _http(_token, token)


# Running


def _target(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Target:
    url = args.url or os.environ.get("HERALD_URL") or DEFAULT_URL
    try:
        ws_url(url)
    except ValueError:
        parser.error(f"--url (or HERALD_URL) must be http(s)://host[:port], not {url!r}")
    key = args.key or os.environ.get("HERALD_KEY")
    if not key:
        parser.error("no key: pass --key or set HERALD_KEY")
    return Target(url.rstrip("/"), key, args.timeout)


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """What argparse cannot say alone about the arguments."""
    positional = {
        ("channels", "create"): {"name"},
        ("devices", "register"): {"address", "platform"},
    }
    given = positional.get((args.command, getattr(args, "action", "")), set())
    clash = sorted(given & set(getattr(args, "fields", None) or {}))
    if clash:
        parser.error(f"--fields must not hold {clash[0]!r}: it is an argument of its own")
    if args.command == "devices" and args.action in ("tags", "uninstall"):
        by_address = args.address is not None or args.platform is not None
        if (args.device_id is None) == (not by_address):
            parser.error("name the device by DEVICE_ID or by --address and --platform")
        if by_address and (args.address is None or args.platform is None):
            parser.error("--address and --platform go together")
    if args.command == "devices" and args.action == "tags":
        if not (args.add or args.remove or args.set):
            parser.error("nothing to change: give --add, --remove or --set")
        if args.set and (args.add or args.remove):
            parser.error("--set goes alone, not with --add or --remove")


def run(args: argparse.Namespace) -> int:
    """Run the client command ``args`` names; its exit code."""
    parser: argparse.ArgumentParser = args.command_parser
    _check(args, parser)
    target = _target(args, parser)
    runner: Runner = args.runner
    try:
        return asyncio.run(runner(args, target))
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except CommandError as exc:
        print(exc.line(), file=sys.stderr)
        return 1
    except Exception as exc:
        error = _describe(exc, target)
        if error is None:
            raise
        print(error.line(), file=sys.stderr)
        return 1


def _describe(exc: Exception, target: Target) -> CommandError | None:
    """The `CommandError` an exception of the client or the network amounts to."""
    import httpx

    from herald.client import FatalError, HeraldHTTPError, RequestError

    if isinstance(exc, HeraldHTTPError | RequestError):
        return CommandError(exc.detail, exc.code, exc.path)
    if isinstance(exc, FatalError):
        if exc.code is not None:
            return CommandError(exc.detail, exc.code)
        status = f"close {exc.close_code}" if exc.close_code is not None else f"HTTP {exc.status}"
        return CommandError(f"{target.ws_url} refused the connection: {exc.detail}", status)
    if isinstance(exc, httpx.TimeoutException):
        return CommandError(f"no answer from {target.url} within {target.timeout:g} s", "timeout")
    if isinstance(exc, httpx.HTTPError):
        return CommandError(
            f"cannot reach {target.url}: {exc or type(exc).__name__}", "unreachable"
        )
    if isinstance(exc, TimeoutError):
        return CommandError(
            f"no answer from {target.ws_url} within {target.timeout:g} s", "timeout"
        )
    return None


# Output


def _emit(data: Any) -> None:
    """Print data as JSON: indented for a terminal, one line otherwise."""
    option = orjson.OPT_INDENT_2 if sys.stdout.isatty() else 0
    _write(orjson.dumps(data, option=option) + b"\n")


def _write(line: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(line)
    sys.stdout.buffer.flush()


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _stdout_closed() -> None:
    """The reader of stdout went away (``| head``): point stdout at /dev/null, so
    the flush at exit does not fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _message(message: Message) -> dict[str, Any]:
    return dataclasses.asdict(message)


def _segment(value: str) -> str:
    return quote(value, safe=":")


# HTTP commands


def _http_runner(call: HttpCall) -> Runner:
    async def runner(args: argparse.Namespace, target: Target) -> int:
        from herald.client import HttpApi

        async with HttpApi(target.url, target.key, timeout=target.timeout) as api:
            data = await call(args, api)
        if data is not None:
            try:
                _emit(data)
            except BrokenPipeError:
                _stdout_closed()
        return 0

    return runner


def _without_none(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


async def _channels_list(args: argparse.Namespace, api: HttpApi) -> list[dict[str, Any]]:
    """Every channel (following the pages), or the first ``--limit``."""
    channels: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        room = 200 if args.limit is None else min(200, args.limit - len(channels))
        page = await api.list_channels(
            cursor=cursor, limit=room, include_inactive=args.include_inactive, type=args.type
        )
        channels.extend(page.channels)
        cursor = page.next
        if cursor is None or (args.limit is not None and len(channels) >= args.limit):
            return channels


async def _channels_create(args: argparse.Namespace, api: HttpApi) -> dict[str, Any]:
    fields: dict[str, Any] = dict(args.fields or {})
    fields.update(
        _without_none(
            type=args.type,
            description=args.description,
            history_size=args.history_size,
            history_ttl=args.history_ttl,
            idle_timeout=args.idle_timeout,
        )
    )
    if args.custom_publish:
        fields["custom_publish"] = True
    return await api.create_channel(args.name, **fields)


async def _channels_show(args: argparse.Namespace, api: HttpApi) -> dict[str, Any]:
    return await api.get_channel(args.name)


async def _channels_close(args: argparse.Namespace, api: HttpApi) -> dict[str, Any]:
    return await api.close_channel(args.name)


async def _publish(args: argparse.Namespace, api: HttpApi) -> dict[str, Any]:
    text = sys.stdin.read().rstrip("\n") if args.payload == "-" else args.payload
    message = await api.publish(
        args.channel,
        parse_payload(text, as_string=args.string),
        room=args.room,
        metadata=args.metadata,
        idempotency_key=args.idempotency_key,
    )
    return _message(message)


async def _keys_create(args: argparse.Namespace, api: HttpApi) -> Any:
    body = {"scopes": list(dict.fromkeys(args.scopes)), **_without_none(name=args.name)}
    return await api.request("POST", "/v1/keys", body=body)


async def _keys_list(args: argparse.Namespace, api: HttpApi) -> Any:
    return await api.request("GET", "/v1/keys")


async def _keys_delete(args: argparse.Namespace, api: HttpApi) -> Any:
    return await api.request("DELETE", f"/v1/keys/{_segment(args.key_id)}")


async def _devices_register(args: argparse.Namespace, api: HttpApi) -> dict[str, Any]:
    fields: dict[str, Any] = dict(args.fields or {})
    fields.update(
        _without_none(
            tags=args.tags,
            timezone=args.timezone,
            locale_country=args.locale_country,
            locale_language=args.locale_language,
            opt_in=args.opt_in,
        )
    )
    return await api.register_device(args.address, args.platform, **fields)


async def _devices_show(args: argparse.Namespace, api: HttpApi) -> dict[str, Any]:
    return await api.get_device(args.device_id)


def _selector(args: argparse.Namespace) -> dict[str, str]:
    if args.device_id is not None:
        return {"device_id": args.device_id}
    return {"address": args.address, "platform": args.platform}


async def _devices_tags(args: argparse.Namespace, api: HttpApi) -> Any:
    body: dict[str, Any] = {"audience": _selector(args)}
    body.update(
        _without_none(
            add=_group_tags(args.add), remove=_group_tags(args.remove), set=_group_tags(args.set)
        )
    )
    return await api.request("POST", "/v1/devices/tags", body=body)


async def _devices_uninstall(args: argparse.Namespace, api: HttpApi) -> Any:
    return await api.request("POST", "/v1/devices/uninstall", body=_selector(args))


async def _token(args: argparse.Namespace, api: HttpApi) -> Any:
    body = {"user_id": args.user_id, **_without_none(ttl=args.ttl)}
    return await api.request("POST", "/v1/tokens", body=body)


# tail


class _Warnings(logging.Handler):
    """The client's warnings (a gap in recovery, an error frame) as stderr lines; its
    errors are left out: the command reports them itself."""

    def emit(self, record: logging.LogRecord) -> None:
        # A refused subscription ends it with that error, which the command reports.
        refused = str(record.msg).startswith("subscription to")
        if record.levelno < logging.ERROR and not refused:
            _progress(f"warning: {record.getMessage()}")


async def _tail(args: argparse.Namespace, target: Target) -> int:
    """Follow the channel until ``--count`` messages, the channel closes, or a signal
    (SIGINT, SIGTERM) stops it: then it closes the socket and exits 128 + the signal."""
    client_log = logging.getLogger("herald.client")
    client_log.addHandler(_Warnings())
    client_log.setLevel(logging.WARNING)
    client_log.propagate = False
    loop = asyncio.get_running_loop()
    follower = asyncio.create_task(_follow(args, target))
    stopped_by: list[int] = []

    def stop(signum: int) -> None:
        stopped_by.append(int(signum))
        follower.cancel()

    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop, signum)
            handled.append(signum)
    try:
        return await follower
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        if not args.quiet:
            _progress("stopped")
        return 128 + stopped_by[0]
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


async def _follow(args: argparse.Namespace, target: Target) -> int:
    from herald.client import Client

    progress = (lambda _: None) if args.quiet else _progress
    client = Client(
        target.ws_url,
        key=target.key,
        request_timeout=target.timeout,
        open_timeout=target.timeout,
        name="herald tail",
    )
    progress(f"connecting to {target.ws_url}")
    await _connect(client, args.connect_timeout or None, progress)
    try:
        subscription = await client.subscribe(args.channel, args.room, args.since)
        where = f"{args.channel} (room {args.room})" if args.room else args.channel
        since = f" after {args.since}" if args.since else ""
        progress(f"subscribed to {where}{since}; Ctrl-C to stop")
        watcher = asyncio.create_task(_watch(client, subscription, progress))
        try:
            return await _print_messages(subscription, args.count, progress)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    finally:
        await client.close()


async def _connect(client: Client, limit: float | None, progress: Callable[[str], None]) -> None:
    """Connect, saying so when it takes a while (the client retries until it succeeds)."""

    async def notice() -> None:
        await asyncio.sleep(_WAIT_NOTICE_AFTER)
        progress(f"waiting for {client.url} (retrying)")

    waiting = asyncio.create_task(notice())
    try:
        async with asyncio.timeout(limit):
            await client.connect()
    except TimeoutError:
        raise CommandError(
            f"could not connect to {client.url} within {limit:g} s", "unreachable"
        ) from None
    finally:
        waiting.cancel()


async def _watch(
    client: Client, subscription: Subscription, progress: Callable[[str], None]
) -> None:
    """Say when the connection drops and when the client is back (it resumes by itself)."""
    connected = True
    while True:
        await asyncio.sleep(_WATCH_INTERVAL)
        if connected and not client.connected:
            progress("connection lost; reconnecting")
        elif not connected and client.connected:
            progress(f"reconnected; resuming after {subscription.last_id}")
        connected = client.connected


async def _print_messages(
    subscription: Subscription, count: int | None, progress: Callable[[str], None]
) -> int:
    printed = 0
    async for message in subscription:
        try:
            _write(orjson.dumps(_message(message)) + b"\n")
        except BrokenPipeError:
            _stdout_closed()
            return 0
        printed += 1
        if count is not None and printed >= count:
            return 0
    if subscription.end_reason == "closed":
        progress(f"channel {subscription.channel} was closed")
    else:
        progress(f"subscription ended: {subscription.end_reason}")
    return 0
