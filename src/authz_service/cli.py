"""Command line: ``authz-service serve`` and ``authz-service keys add``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from authz_service import __version__, apikeys, app, logs, settings
from authz_service.registry import static_file


def _parser() -> argparse.ArgumentParser:
    settings_help = "settings (environment variable, config-file key, default):\n" + (
        settings.describe()
    )
    parser = argparse.ArgumentParser(
        prog="authz-service",
        description="Envoy ext_authz gRPC service: admits registered API clients by API key.",
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
        help="run the gRPC and HTTP servers",
        description="Serve Envoy's Authorization/Check, gRPC health and reflection on "
        "AUTHZ_GRPC_ADDRESS, and /healthz and /readyz on AUTHZ_HTTP_ADDRESS.",
        epilog=settings_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    keys = commands.add_parser("keys", help="manage the static keys file")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    add = key_commands.add_parser(
        "add",
        help="create a key for a client; print it once",
        description="Generate a key, store its SHA-256 hash in the keys file and print the key "
        "on standard output. It is never shown again.",
    )
    add.add_argument("--client-id", required=True)
    add.add_argument("--client-name", required=True)
    add.add_argument("--roles", default="", help="comma-separated roles")
    add.add_argument("--file", type=Path, help="keys file (default: AUTHZ_KEYS_FILE)")
    add.add_argument("--prefix", default=apikeys.DEFAULT_PREFIX, help="key prefix")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = settings.load(args.config)
    except settings.SettingsError as exc:
        print(f"authz-service: invalid setting: {exc}", file=sys.stderr)
        return 2
    if args.command == "keys":
        return _keys_add(args, config)
    logs.configure(config.log_level, config.log_redact_fields)
    try:
        asyncio.run(app.run_until_signalled(config))
    except (static_file.KeysFileError, app.StartupError) as exc:
        print(f"authz-service: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _keys_add(args: argparse.Namespace, config: settings.Settings) -> int:
    path: Path = args.file or config.keys_file
    roles = tuple(role.strip() for role in args.roles.split(",") if role.strip())
    try:
        key = static_file.add_key(path, args.client_id, args.client_name, roles, args.prefix)
    except (static_file.KeysFileError, ValueError, OSError) as exc:
        print(f"authz-service: key not added: {exc}", file=sys.stderr)
        return 1
    print(key)
    print(
        f"Added a key for client {args.client_id!r} to {path}. Store it now: it is shown once.\n"
        f"Use it as: Authorization: ApiKey <the key above>",
        file=sys.stderr,
    )
    return 0
