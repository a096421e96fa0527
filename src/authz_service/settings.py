"""Validated, frozen settings. Each has a default, an environment variable and a config-file key.

Precedence: default < config file (``--config``, YAML, keys are the field names) < environment.
Every value is validated at start; an error names the setting as both its variable and its key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

ENV_PREFIX = "AUTHZ_"
_HEADER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_RESERVED_HEADERS = frozenset({"authorization", "host", "content-length", "x-ext-authz-reason"})


class SettingsError(ValueError):
    """A setting is invalid; the message names it."""


def _setting(default: Any, doc: str, check: Callable[[Any], str | None] | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "check": check})


def _address(unix_ok: bool) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if unix_ok and value.startswith("unix:") and len(value) > len("unix:"):
            return None
        host, sep, port = value.rpartition(":")
        if sep and host and port.isdigit() and 0 <= int(port) <= 65535:
            return None
        return "expected host:port" + (" or unix:/path" if unix_ok else "")

    return check


def _between(low: float, high: float) -> Callable[[float], str | None]:
    return lambda value: None if low <= value <= high else f"must be between {low} and {high}"


def _header_name(value: str) -> str | None:
    if not _HEADER_NAME.fullmatch(value):
        return "expected a lower-case header name (letters, digits, '-')"
    if value in _RESERVED_HEADERS:
        return f"{value!r} is reserved"
    return None


def _realm(value: str) -> str | None:
    ok = 0 < len(value) <= 64 and value.isascii() and value.isprintable()
    return None if ok else "1-64 printable ASCII characters"


@dataclass(frozen=True, slots=True)
class Settings:
    grpc_address: str = _setting(
        "0.0.0.0:9001",
        "gRPC listen address (ext_authz, health, reflection): host:port or unix:/path",
        _address(unix_ok=True),
    )
    http_address: str = _setting(
        "0.0.0.0:9090",
        "HTTP listen address for /healthz and /readyz: host:port",
        _address(unix_ok=False),
    )
    keys_file: Path = _setting(
        Path("keys.yaml"), "YAML file of SHA-256 key hashes and their clients"
    )
    keys_reload_interval: float = _setting(
        2.0,
        "seconds between checks of the keys file for changes (0: never reload)",
        _between(0, 3600),
    )
    check_timeout: float = _setting(
        0.15,
        "seconds one check may take before it is denied with 503; keep it below Envoy's "
        "ext_authz timeout",
        _between(0.001, 30),
    )
    max_key_length: int = _setting(
        128, "longest API key accepted, in characters", _between(16, 4096)
    )
    require_key_checksum: bool = _setting(
        False, "deny keys that are not in the checksummed azk_ format without any lookup"
    )
    non_http_requests: Literal["deny", "allow"] = _setting(
        "deny", "answer to checks without HTTP attributes (Envoy's network/TCP ext_authz)"
    )
    realm: str = _setting(
        "authz-service", "realm in the WWW-Authenticate challenge of 401 answers", _realm
    )
    client_id_header: str = _setting(
        "x-client-id", "upstream header carrying the client id", _header_name
    )
    client_name_header: str = _setting(
        "x-client-name", "upstream header carrying the client name", _header_name
    )
    client_roles_header: str = _setting(
        "x-client-roles", "upstream header carrying the client's roles", _header_name
    )
    retry_after: int = _setting(1, "Retry-After seconds sent with 503 answers", _between(0, 3600))
    max_message_bytes: int = _setting(
        1 << 20, "largest gRPC message accepted, in bytes", _between(4096, 64 << 20)
    )
    max_concurrent_checks: int = _setting(
        1000,
        "checks in progress at once; beyond that new checks are denied with 503 overloaded",
        _between(1, 100_000),
    )
    drain_delay: float = _setting(
        0.0,
        "seconds to keep answering after SIGTERM while health reports NOT_SERVING, so "
        "load balancers stop sending checks before the port closes",
        _between(0, 300),
    )
    shutdown_grace: float = _setting(
        10.0, "seconds in-flight checks get to finish after SIGTERM", _between(0, 300)
    )
    log_level: Literal["debug", "info", "warning", "error"] = _setting(
        "info", "log level; decisions are logged at info"
    )
    log_redact_fields: tuple[str, ...] = _setting(
        ("authorization", "api_key", "apikey", "key", "x-api-key", "token"),
        "comma-separated log field names whose values are always replaced by [redacted]",
    )

    def __post_init__(self) -> None:
        headers = (self.client_id_header, self.client_name_header, self.client_roles_header)
        if len(set(headers)) != len(headers):
            raise SettingsError(
                "AUTHZ_CLIENT_ID_HEADER, AUTHZ_CLIENT_NAME_HEADER, AUTHZ_CLIENT_ROLES_HEADER: "
                "the identity headers must be three different names"
            )


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def load(config_file: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from the defaults, an optional YAML file and the environment."""
    environ = os.environ if environ is None else environ
    from_file = _read_config(config_file) if config_file else {}
    names = {f.name for f in fields(Settings)}
    unknown = sorted(set(from_file) - names)
    if unknown:
        raise SettingsError(f"{config_file}: unknown setting {unknown[0]!r}")
    hints = get_type_hints(Settings)
    values: dict[str, Any] = {}
    for f in fields(Settings):
        where = f"{env_name(f.name)} ({f.name})"
        if env_name(f.name) in environ:
            raw: Any = environ[env_name(f.name)]
        elif f.name in from_file:
            raw = from_file[f.name]
        else:
            continue
        value = _coerce(raw, hints[f.name], where)
        problem = f.metadata["check"](value) if f.metadata["check"] else None
        if problem:
            raise SettingsError(f"{where}: {problem}; got {raw!r}")
        values[f.name] = value
    return Settings(**values)


def describe() -> str:
    """One paragraph per setting, for --help."""
    lines = []
    for f in fields(Settings):
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(default)
        lines.append(f"  {env_name(f.name)}  (config key: {f.name}; default: {default})")
        lines.append(f"      {f.metadata['doc']}")
    return "\n".join(lines)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SettingsError(f"--config {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"--config {path}: not valid YAML: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise SettingsError(f"--config {path}: expected a mapping of setting names to values")
    return document


def _coerce(raw: Any, kind: Any, where: str) -> Any:
    if get_origin(kind) is Literal:
        convert: Callable[[Any], Any] = _choice(get_args(kind))
    elif get_origin(kind) is tuple:
        convert = _names
    else:
        convert = _CONVERTERS[kind]
    try:
        return convert(raw)
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}; got {raw!r}") from None


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(raw: Any) -> str:
        value = str(raw).strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return convert


def _bool(raw: Any) -> bool:
    text = str(raw).strip().lower()
    if text in {"true", "1", "yes"}:
        return True
    if text in {"false", "0", "no"}:
        return False
    raise ValueError("expected true or false")


def _number(kind: type[int] | type[float]) -> Callable[[Any], int | float]:
    def convert(raw: Any) -> int | float:
        # Through str() first, so that YAML's true (an int to Python) is refused as a number.
        return kind(str(raw).strip())

    return convert


def _names(raw: Any) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else str(raw).split(",")
    return tuple(str(item).strip() for item in items if str(item).strip())


_CONVERTERS: dict[Any, Callable[[Any], Any]] = {
    bool: _bool,
    int: _number(int),
    float: _number(float),
    str: lambda raw: str(raw).strip(),
    Path: lambda raw: Path(str(raw)),
}
