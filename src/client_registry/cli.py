"""Command line: ``client-registry serve`` and management commands that call the API and print
JSON (``clients create|list|get|revoke|regenerate|suspend|activate|delete|set-rate-limit|usage``).

The management commands only read credentials, never create them: the admin token comes from
``--token-file``, else ``REGISTRY_ADMIN_TOKEN`` (or ``admin_token`` in ``--config``), else the
tokens file that ``serve`` writes (``REGISTRY_TOKENS_FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from authz_service import __version__, logs
from authz_service.config import (
    SettingsError,
    describe,
    load,
    log_unknown_variables,
    unknown_variables,
)
from authz_service.contract import MAX_REQUESTS_PER_UNIT, RATE_UNITS
from client_registry import app
from client_registry.db import DatabaseError
from client_registry.settings import ENV_PREFIX, RegistrySettings

log = logging.getLogger(__name__)
# Read by the clients command (for --url), not a setting of the server.
_URL_VARIABLE = "REGISTRY_URL"


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the error it is: urllib would send the admin token on to
    wherever it points, on any host."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)
_LOOKUP_ORDER = (
    "--token-file, REGISTRY_ADMIN_TOKEN (or admin_token in --config), then the tokens file "
    "that 'client-registry serve' writes (REGISTRY_TOKENS_FILE, default registry-tokens.json)"
)


class NoToken(Exception):  # noqa: N818 (a condition the user fixes, not a bug)
    """No admin token was found; the message says where the command looked."""


_LIMIT_FORM = f"N/UNIT (N from 1 to {MAX_REQUESTS_PER_UNIT}, UNIT {'|'.join(RATE_UNITS)}) or none"


def _rate_limit(text: str) -> dict[str, Any] | None:
    """``5/second`` as the API's rate_limit; ``none`` clears it."""
    if text.strip().lower() == "none":
        return None
    count, _, unit = text.strip().partition("/")
    if not (count.isdigit() and 0 < int(count) <= MAX_REQUESTS_PER_UNIT and unit in RATE_UNITS):
        raise argparse.ArgumentTypeError(f"expected {_LIMIT_FORM}, not {text!r}")
    return {"requests_per_unit": int(count), "unit": unit}


def _parser() -> argparse.ArgumentParser:
    help_text = "settings (environment variable, config-file key, default):\n" + describe(
        RegistrySettings, ENV_PREFIX
    )
    # --config is accepted before the command and after it; SUPPRESS keeps the command's
    # copy from overwriting one given before it.
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="YAML file of settings",
    )
    parser = argparse.ArgumentParser(
        prog="client-registry",
        description="The reference client registry for authz-service.",
        epilog=help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML file of settings")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "serve",
        parents=[config_option],
        help="run the registry's HTTP API",
        epilog=help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    clients = commands.add_parser(
        "clients",
        parents=[config_option],
        help="manage clients through the API",
        description="Call the management API and print its JSON answer. The admin token is "
        f"taken from {_LOOKUP_ORDER}; nothing is ever written.",
    )
    clients.add_argument(
        "--url",
        default=os.environ.get(_URL_VARIABLE, "http://127.0.0.1:8081"),
        help=f"registry base URL (env {_URL_VARIABLE}; default http://127.0.0.1:8081)",
    )
    clients.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="file holding the admin token: the registry's tokens file (JSON), or the token alone",
    )
    actions = clients.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="register a client; prints its key once")
    create.add_argument("--name", required=True)
    create.add_argument("--email", required=True)
    create.add_argument("--roles", default="", help="comma-separated roles")
    create.add_argument(
        "--rate-limit",
        type=_rate_limit,
        default=argparse.SUPPRESS,
        metavar="N/UNIT",
        help="the client's rate limit, e.g. 5/second (UNIT: second, minute, hour or day)",
    )
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
    set_limit = actions.add_parser(
        "set-rate-limit", help="set the client's rate limit (N/UNIT), or clear it (none)"
    )
    set_limit.add_argument("client_id")
    set_limit.add_argument("rate_limit", type=_rate_limit, metavar="N/UNIT|none")
    report = actions.add_parser(
        "usage",
        help="the client's usage: totals and a series, per key and for the client",
        description="Usage recorded by authz-service's ledger, in buckets of a minute, an hour "
        "(the default) or a day. Times are ISO 8601 with a zone, e.g. 2025-01-31T00:00:00Z; "
        "without --to, up to now, and without --from, the day before --to.",
    )
    report.add_argument("client_id")
    report.add_argument("--from", dest="start", metavar="TIME", help="start (rounded down)")
    report.add_argument("--to", dest="end", metavar="TIME", help="end (rounded up)")
    report.add_argument("--granularity", choices=["minute", "hour", "day"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load(RegistrySettings, ENV_PREFIX, args.config)
    except SettingsError as exc:
        print(f"client-registry: invalid setting: {exc}", file=sys.stderr)
        return 2
    unknown = unknown_variables(RegistrySettings, ENV_PREFIX, also_known=frozenset({_URL_VARIABLE}))
    if args.command == "clients":
        for variable in unknown:
            print(f"client-registry: warning: {variable}", file=sys.stderr)
        return _clients(args, settings)
    logs.configure(settings.log_level)
    log_unknown_variables(unknown, log)
    try:
        asyncio.run(app.serve(settings))
    except (DatabaseError, OSError) as exc:
        print(f"client-registry: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _admin_token(token_file: Path | None, settings: RegistrySettings) -> tuple[str, str]:
    """The admin token and where it came from, looked for in the order of ``_LOOKUP_ORDER``."""
    if token_file is not None:
        return _token_from(token_file), f"--token-file {token_file}"
    if settings.admin_token:
        return settings.admin_token, "REGISTRY_ADMIN_TOKEN"
    path = settings.tokens_file
    if path.exists():
        return _token_from(path), f"the tokens file {path}"
    raise NoToken(
        "no admin token: --token-file is not given, REGISTRY_ADMIN_TOKEN is not set, and "
        f"there is no tokens file {path.resolve()} (REGISTRY_TOKENS_FILE). Run this where "
        "'client-registry serve' runs, or pass --token-file with its tokens file"
    )


def _token_from(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise NoToken(f"cannot read the token file {path}: {exc.strerror}") from None
    if text.startswith("{"):
        try:
            token = json.loads(text).get("admin_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise NoToken(f"{path}: expected JSON with an 'admin_token' string, or a bare token")
        return token
    if not text or len(text.split()) != 1:
        raise NoToken(f"{path}: expected the admin token alone, or the registry's tokens file")
    return text


def _clients(args: argparse.Namespace, settings: RegistrySettings) -> int:
    try:
        token, source = _admin_token(args.token_file, settings)
    except NoToken as exc:
        print(f"client-registry: {exc}", file=sys.stderr)
        return 2
    base = args.url.rstrip("/")
    method, path, body = _call(args)
    request = urllib.request.Request(  # noqa: S310 (the URL is the operator's own registry)
        base + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with _NO_REDIRECTS.open(request, timeout=10) as reply:
            text = reply.read().decode()
    except urllib.error.HTTPError as exc:
        print(exc.read().decode() or json.dumps({"error": exc.code}), file=sys.stderr)
        if exc.code in (401, 403):
            print(
                f"client-registry: {base} refused the admin token from {source}",
                file=sys.stderr,
            )
        return 1
    except urllib.error.URLError as exc:
        print(f"client-registry: cannot reach {base}: {exc.reason}", file=sys.stderr)
        return 1
    print(text if text else json.dumps({"ok": True}))
    return 0


def _call(args: argparse.Namespace) -> tuple[str, str, Any]:
    """The API call of a ``clients`` action: method, path and JSON body (or None)."""
    action = args.action
    if action == "create":
        roles = [r.strip() for r in args.roles.split(",") if r.strip()]
        body = {"client_name": args.name, "email": args.email, "roles": roles}
        if "rate_limit" in args:
            body["rate_limit"] = args.rate_limit
        return "POST", "/clients", body
    if action == "list":
        return "GET", "/clients", None
    client = f"/clients/{urllib.parse.quote(args.client_id, safe='')}"
    calls: dict[str, tuple[str, str, Any]] = {
        "get": ("GET", client, None),
        "revoke": ("DELETE", f"{client}/api-key", None),
        "suspend": ("PATCH", client, {"status": "suspended"}),
        "activate": ("PATCH", client, {"status": "active"}),
        "delete": ("DELETE", client, None),
    }
    if action in calls:
        return calls[action]
    if action == "regenerate":
        return "POST", f"{client}/api-key", {"grace_seconds": args.grace}
    if action == "set-rate-limit":
        return "PATCH", client, {"rate_limit": args.rate_limit}
    given = [("from", args.start), ("to", args.end), ("granularity", args.granularity)]
    query = {name: value for name, value in given if value is not None}
    return "GET", f"{client}/usage" + (f"?{urllib.parse.urlencode(query)}" if query else ""), None
