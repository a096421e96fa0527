"""Command line: ``client-registry serve`` and management commands that call the API and print
JSON (``clients create|list|get|revoke|regenerate|suspend|activate|delete``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from authz_service import logs
from authz_service.config import SettingsError, describe, load
from client_registry import app
from client_registry.db import DatabaseError
from client_registry.settings import ENV_PREFIX, RegistrySettings


def _parser() -> argparse.ArgumentParser:
    help_text = "settings (environment variable, config-file key, default):\n" + describe(
        RegistrySettings, ENV_PREFIX
    )
    parser = argparse.ArgumentParser(
        prog="client-registry",
        description="The reference client registry for authz-service.",
        epilog=help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML file of settings")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "serve",
        help="run the registry's HTTP API",
        epilog=help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    clients = commands.add_parser("clients", help="manage clients through the API")
    clients.add_argument(
        "--url",
        default=os.environ.get("REGISTRY_URL", "http://127.0.0.1:8081"),
        help="registry base URL (env REGISTRY_URL)",
    )
    actions = clients.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="register a client; prints its key once")
    create.add_argument("--name", required=True)
    create.add_argument("--email", required=True)
    create.add_argument("--roles", default="", help="comma-separated roles")
    actions.add_parser("list", help="list clients")
    for name, text in [
        ("get", "show a client and its keys (no key material)"),
        ("revoke", "revoke the client's key"),
        ("suspend", "suspend the client (its keys stop validating)"),
        ("activate", "reactivate a suspended client"),
        ("delete", "delete the client and its keys"),
    ]:
        actions.add_parser(name, help=text).add_argument("client_id")
    regenerate = actions.add_parser("regenerate", help="issue a new key; prints it once")
    regenerate.add_argument("client_id")
    regenerate.add_argument(
        "--grace", type=float, default=0, help="seconds the old key keeps working"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load(RegistrySettings, ENV_PREFIX, args.config)
    except SettingsError as exc:
        print(f"client-registry: invalid setting: {exc}", file=sys.stderr)
        return 2
    if args.command == "clients":
        return _clients(args, settings)
    logs.configure(settings.log_level)
    try:
        asyncio.run(app.serve(settings))
    except (DatabaseError, OSError) as exc:
        print(f"client-registry: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _clients(args: argparse.Namespace, settings: RegistrySettings) -> int:
    admin_token, _ = app.tokens(settings)
    base = args.url.rstrip("/")
    action = args.action
    roles = [r.strip() for r in getattr(args, "roles", "").split(",") if r.strip()]
    requests: dict[str, tuple[str, str, Any]] = {
        "create": (
            "POST",
            "/clients",
            {
                "client_name": args.name if action == "create" else "",
                "email": getattr(args, "email", ""),
                "roles": roles,
            },
        ),
        "list": ("GET", "/clients", None),
        "get": ("GET", f"/clients/{getattr(args, 'client_id', '')}", None),
        "revoke": ("DELETE", f"/clients/{getattr(args, 'client_id', '')}/api-key", None),
        "regenerate": (
            "POST",
            f"/clients/{getattr(args, 'client_id', '')}/api-key",
            {"grace_seconds": getattr(args, "grace", 0)},
        ),
        "suspend": ("PATCH", f"/clients/{getattr(args, 'client_id', '')}", {"status": "suspended"}),
        "activate": ("PATCH", f"/clients/{getattr(args, 'client_id', '')}", {"status": "active"}),
        "delete": ("DELETE", f"/clients/{getattr(args, 'client_id', '')}", None),
    }
    method, path, body = requests[action]
    request = urllib.request.Request(  # noqa: S310 (the URL is the operator's own registry)
        base + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
            text = reply.read().decode()
    except urllib.error.HTTPError as exc:
        print(exc.read().decode() or json.dumps({"error": exc.code}), file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"client-registry: cannot reach {base}: {exc.reason}", file=sys.stderr)
        return 1
    print(text if text else json.dumps({"ok": True}))
    return 0
