"""Command line: ``authz-service serve`` and ``authz-service keys add|list|revoke|rotate``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from authz_service import __version__, apikeys, app, config, logs, settings
from authz_service.registry import static_file

log = logging.getLogger(__name__)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_SECONDS_PER_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _parser() -> argparse.ArgumentParser:
    settings_help = (
        "settings (environment variable, config-file key, default):\n"
        + settings.describe()
        + "\n\ntracing (OpenTelemetry, off by default) is configured by the standard OTEL_*\n"
        "variables, not by settings: OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317 turns it\n"
        "on. It needs pip install 'authz-service[tracing]'; see the README, \"Tracing\"."
    )
    # --config is accepted before the command and after it; SUPPRESS keeps the command's
    # copy from overwriting one given before it.
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="YAML file of settings (keys as listed below); the environment overrides it",
    )
    parser = argparse.ArgumentParser(
        prog="authz-service",
        description="Envoy ext_authz service (gRPC and HTTP): admits registered API clients "
        "by API key.",
        epilog=settings_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML file of settings (keys as listed below); the environment overrides it",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "serve",
        parents=[config_option],
        help="run the gRPC and HTTP servers",
        description="Serve Envoy's Authorization/Check, gRPC health and reflection on "
        "AUTHZ_GRPC_ADDRESS; Envoy's HTTP ext_authz checks on AUTHZ_HTTP_CHECK_ADDRESS; "
        "access logs on AUTHZ_ACCESS_LOG_ADDRESS; the admin API on AUTHZ_ADMIN_ADDRESS; and "
        "/healthz, /readyz and /metrics on AUTHZ_HTTP_ADDRESS.",
        epilog=settings_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    keys = commands.add_parser(
        "keys",
        help="manage the static keys file",
        description="Manage the keys file (AUTHZ_KEYS_FILE, or --file). Keys are named by their "
        f"key id, the first {apikeys.KEY_ID_LENGTH} hex characters of their SHA-256, as in "
        "the decision log. A running server picks up every change within "
        "AUTHZ_KEYS_RELOAD_INTERVAL.",
    )
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    add = key_commands.add_parser(
        "add",
        parents=[config_option],
        help="create a key for a client; print it once",
        description="Generate a key, store its SHA-256 hash in the keys file and print the key "
        "on standard output. It is never shown again.",
    )
    add.add_argument("--client-id", required=True)
    add.add_argument("--client-name", required=True)
    add.add_argument("--roles", default="", help="comma-separated roles")
    _file_option(add)
    add.add_argument("--prefix", default=apikeys.DEFAULT_PREFIX, help="key prefix")

    listing = key_commands.add_parser(
        "list",
        parents=[config_option],
        help="list key ids and their clients (never the hashes in full)",
        description="One line per key: key id, client id, state (active, disabled, expires or "
        "expired at), roles and client name.",
    )
    _file_option(listing)

    revoke = key_commands.add_parser(
        "revoke",
        parents=[config_option],
        help="disable a key by its key id",
        description="Set 'enabled: false' on the key: checks with it are denied key_disabled. "
        "The entry stays, so 'keys list' still shows it; delete it from the file to forget it.",
    )
    revoke.add_argument("key_id", help="the key id from 'keys list' (or its first 6+ characters)")
    _file_option(revoke)

    rotate = key_commands.add_parser(
        "rotate",
        parents=[config_option],
        help="give a client a new key and retire its old ones; print the new key once",
        description="Add a new key for the client (with the name and roles of its latest entry) "
        "and print it on standard output. The client's other usable keys are disabled at "
        "once, or, with --old-key-expires-in, keep working until then.",
    )
    rotate.add_argument("--client-id", required=True)
    rotate.add_argument(
        "--old-key-expires-in",
        type=_duration,
        metavar="DURATION",
        help="how long the old keys keep working: seconds, or a number with s, m, h or d "
        "(e.g. 90, 15m, 24h, 7d); without it they stop at once",
    )
    _file_option(rotate)
    rotate.add_argument("--prefix", default=apikeys.DEFAULT_PREFIX, help="key prefix")
    return parser


def _file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", type=Path, help="keys file (default: AUTHZ_KEYS_FILE)")


def _duration(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected seconds, or a number with s, m, h or d (e.g. 24h)"
        )
    return float(match[1]) * _SECONDS_PER_UNIT[match[2]]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        loaded = settings.load(args.config)
    except settings.SettingsError as exc:
        print(f"authz-service: invalid setting: {exc}", file=sys.stderr)
        return 2
    unknown = config.unknown_variables(settings.Settings, settings.ENV_PREFIX)
    if args.command == "keys":
        for variable in unknown:
            print(f"authz-service: warning: {variable}", file=sys.stderr)
        return _KEY_COMMANDS[args.keys_command](args, loaded)
    logs.configure(loaded.log_level, loaded.log_redact_fields)
    config.log_unknown_variables(unknown, log)
    try:
        asyncio.run(app.run_until_signalled(loaded))
    except (static_file.KeysFileError, app.StartupError) as exc:
        print(f"authz-service: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _keys_add(args: argparse.Namespace, loaded: settings.Settings) -> int:
    path: Path = args.file or loaded.keys_file
    roles = tuple(role.strip() for role in args.roles.split(",") if role.strip())
    try:
        key = static_file.add_key(path, args.client_id, args.client_name, roles, args.prefix)
    except (static_file.KeysFileError, ValueError, OSError) as exc:
        print(f"authz-service: key not added: {exc}", file=sys.stderr)
        return 1
    print(key)
    print(
        f"Added key {apikeys.key_id(apikeys.digest(key))} for client {args.client_id!r} "
        f"to {path}. Store it now: it is shown once.\n"
        f"Use it as: Authorization: ApiKey <the key above>",
        file=sys.stderr,
    )
    return 0


def _keys_list(args: argparse.Namespace, loaded: settings.Settings) -> int:
    path: Path = args.file or loaded.keys_file
    try:
        records, warnings = static_file.parse_with_warnings(path.read_text(), str(path))
    except FileNotFoundError:
        print(
            f"authz-service: cannot list keys: {path}: not found (AUTHZ_KEYS_FILE, or --file)",
            file=sys.stderr,
        )
        return 1
    except (static_file.KeysFileError, OSError) as exc:
        print(f"authz-service: cannot list keys: {exc}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"authz-service: warning: {warning}", file=sys.stderr)
    rows = [("KEY ID", "CLIENT", "STATE", "ROLES", "NAME")]
    now = time.time()
    for key_hash, record in records.items():
        client = record.client
        rows.append(
            (
                apikeys.key_id(key_hash),
                client.client_id,
                _state(record, now),
                ",".join(client.roles) or "-",
                client.name,
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for *cells, name in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)),
            name,
            sep="  ",
        )
    return 0


def _state(record: static_file.KeyRecord, now: float) -> str:
    if not record.enabled:
        return "disabled"
    if record.expires_at is None:
        return "active"
    when = static_file.format_expiry(record.expires_at)
    return f"expired {when}" if record.expires_at <= now else f"expires {when}"


def _keys_revoke(args: argparse.Namespace, loaded: settings.Settings) -> int:
    path: Path = args.file or loaded.keys_file
    try:
        key_id, client_id, was_enabled = static_file.revoke_key(path, args.key_id)
    except (static_file.KeysFileError, OSError) as exc:
        print(f"authz-service: key not revoked: {exc}", file=sys.stderr)
        return 1
    state = "Revoked" if was_enabled else "Already revoked:"
    print(f"{state} key {key_id} of client {client_id!r} in {path}.", file=sys.stderr)
    return 0


def _keys_rotate(args: argparse.Namespace, loaded: settings.Settings) -> int:
    path: Path = args.file or loaded.keys_file
    now = time.time()
    expire_at = None if args.old_key_expires_in is None else now + args.old_key_expires_in
    try:
        key, retired = static_file.rotate_key(path, args.client_id, expire_at, args.prefix, now)
    except (static_file.KeysFileError, ValueError, OSError) as exc:
        print(f"authz-service: key not rotated: {exc}", file=sys.stderr)
        return 1
    print(key)
    if not retired:
        old = "It had no other usable key."
    elif expire_at is None:
        old = f"Disabled its old key(s): {', '.join(retired)}."
    else:
        when = static_file.format_expiry(expire_at)
        old = f"Its old key(s) {', '.join(retired)} expire at {when}."
    print(
        f"Added key {apikeys.key_id(apikeys.digest(key))} for client {args.client_id!r} "
        f"to {path}. Store it now: it is shown once.\n{old}",
        file=sys.stderr,
    )
    return 0


_KEY_COMMANDS = {
    "add": _keys_add,
    "list": _keys_list,
    "revoke": _keys_revoke,
    "rotate": _keys_rotate,
}
