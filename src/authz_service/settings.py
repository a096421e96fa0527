"""The ext_authz service's settings. Each has a default, an environment variable (``AUTHZ_``
and the name in capitals) and a config-file key (the name); see ``config`` for the rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from authz_service.apikeys import PREFIX_PATTERN
from authz_service.config import SettingsError, address, between
from authz_service.config import describe as describe_settings
from authz_service.config import load as load_settings
from authz_service.config import setting as _setting

ENV_PREFIX = "AUTHZ_"
_HEADER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_RESERVED_HEADERS = frozenset(
    {"authorization", "host", "content-length", "x-ext-authz-reason", "x-ext-authz-rule"}
)


def _header_name(value: str) -> str | None:
    if not _HEADER_NAME.fullmatch(value):
        return "expected a lower-case header name (letters, digits, '-')"
    if value in _RESERVED_HEADERS:
        return f"{value!r} is reserved"
    return None


def _url(value: str) -> str | None:
    ok = value.startswith(("http://", "https://")) and len(value) > len("https://")
    return None if ok else "expected an http:// or https:// URL"


def _redis_url(value: str) -> str | None:
    ok = not value or (value.startswith(("redis://", "rediss://")) and len(value) > len("redis://"))
    return None if ok else "expected redis://host:port/db"


def _path_prefix(value: str) -> str | None:
    ok = not value or (value.startswith("/") and not value.endswith("/") and value.isprintable())
    return None if ok else "empty, or a path starting with '/' and not ending with '/'"


def _token(value: str) -> str | None:
    # Sent in a header: a control character would be refused by every HTTP library, or split
    # the request.
    return None if value.isprintable() else "printable characters only (a token, as issued)"


def _key_prefix(value: str) -> str | None:
    return None if PREFIX_PATTERN.fullmatch(value) else f"expected {PREFIX_PATTERN.pattern}"


def _realm(value: str) -> str | None:
    ok = 0 < len(value) <= 64 and value.isascii() and value.isprintable()
    return None if ok else "1-64 printable ASCII characters"


@dataclass(frozen=True, slots=True)
class Settings:
    grpc_address: str = _setting(
        "0.0.0.0:9001",
        "gRPC listen address of the check server (ext_authz, health, reflection): host:port or "
        "unix:/path",
        address(unix_ok=True),
    )
    http_address: str = _setting(
        "0.0.0.0:9090",
        "HTTP listen address for /healthz, /readyz and /metrics: host:port",
        address(unix_ok=False),
    )
    grpc_workers: int = _setting(
        32,
        "threads of the check server; a check that waits for the registry holds one, checks "
        "answered from memory hold one for microseconds",
        between(1, 1024),
    )
    access_log_address: str = _setting(
        "0.0.0.0:9003",
        "gRPC listen address of Envoy's access-log service (per-client responses and bytes): "
        "host:port or unix:/path (empty: off)",
        lambda value: address(unix_ok=True)(value) if value else None,
    )
    http_check_address: str = _setting(
        "0.0.0.0:9004",
        "listen address of the HTTP ext_authz check server (Envoy's http_service mode): "
        "host:port or unix:/path (empty: off)",
        lambda value: address(unix_ok=True)(value) if value else None,
    )
    http_check_path_prefix: str = _setting(
        "",
        "the path_prefix Envoy's http_service puts before the original path; removed before "
        "the policy sees the path",
        _path_prefix,
    )
    access_log_token: str = _setting(
        "",
        "bearer token Envoy must send on access-log streams (grpc_service initial_metadata "
        "'authorization: Bearer <token>'); empty: streams are not authenticated",
        secret=True,
    )
    admin_address: str = _setting(
        "127.0.0.1:9002",
        "gRPC listen address of the admin API (Explain, Invalidate; with reflection): "
        "host:port or unix:/path; keep it private (empty: off)",
        lambda value: address(unix_ok=True)(value) if value else None,
    )
    registry: Literal["static", "http", "snapshot"] = _setting(
        "static",
        "where keys are resolved: static (the keys file), http (the client registry's "
        "validation endpoint, cached) or snapshot (an in-memory copy of the registry's valid "
        "keys, kept in sync)",
    )
    registry_url: str = _setting(
        "http://127.0.0.1:8081", "base URL of the client registry (registry=http)", _url
    )
    registry_token: str = _setting(
        "",
        "service token of the client registry's verification API (registry=http)",
        _token,
        secret=True,
    )
    registry_timeout: float = _setting(
        0.1,
        "seconds one registry call may take; keep it below AUTHZ_CHECK_TIMEOUT",
        between(0.001, 30),
    )
    registry_max_in_flight: int = _setting(
        100,
        "registry calls in progress at once; beyond that checks are denied with 503 registry_busy",
        between(1, 10_000),
    )
    registry_breaker_failures: int = _setting(
        5, "consecutive registry failures that open the circuit breaker", between(1, 1000)
    )
    registry_breaker_cooldown: float = _setting(
        5.0, "seconds the open circuit refuses registry calls before one trial", between(0.1, 600)
    )
    snapshot_poll_interval: float = _setting(
        5.0,
        "seconds between delta polls while the change feed is down (registry=snapshot), and "
        "between attempts to load the first snapshot",
        between(0.05, 3600),
    )
    registry_feed: bool = _setting(
        True,
        "follow the registry's change feed and evict revoked or changed keys at once "
        "(registry=http); without it a revocation takes effect within AUTHZ_CACHE_TTL",
    )
    cache_ttl: float = _setting(
        30.0,
        "seconds a registry answer that a key is valid is reused (registry=http)",
        between(0.1, 86400),
    )
    cache_negative_ttl: float = _setting(
        5.0, "seconds a registry refusal (unknown, revoked, ...) is reused", between(0, 3600)
    )
    cache_max_stale: float = _setting(
        300.0,
        "seconds past its TTL a valid key keeps working while the registry is unreachable",
        between(0, 86400),
    )
    cache_max_entries: int = _setting(
        100_000, "keys remembered at most (least recently used go first)", between(1, 10**7)
    )
    cold_lookup_rate: float = _setting(
        200.0,
        "registry lookups per second for keys not in the cache; beyond that (and the burst), "
        "503 registry_busy",
        between(0.1, 100_000),
    )
    cold_lookup_burst: int = _setting(
        400, "lookups of uncached keys allowed in a burst", between(1, 100_000)
    )
    redis_url: str = _setting(
        "",
        "redis://host:port/db of a Redis shared by the replicas: a second cache tier "
        "(registry=http) and the rate-limit buckets; empty: in-process cache and limits only",
        _redis_url,
        secret=True,  # redis://:password@host
    )
    redis_timeout: float = _setting(
        0.02,
        "seconds one Redis operation may take before it counts as a miss (shared cache) or "
        "the local bucket decides (rate limits)",
        between(0.001, 1),
    )
    redis_namespace: str = _setting(
        "authz", "prefix of the Redis keys of the shared cache and rate limits", _header_name
    )
    rate_limits: bool = _setting(
        True,
        "enforce each client's rate_limit here (429 rate_limited); false: only pass it on in "
        "the dynamic metadata, for Envoy's global rate-limit service",
    )
    rate_limit_headers: bool = _setting(
        True,
        "send a rate-limited client's RateLimit and RateLimit-Policy headers on allowed "
        "answers too (429 answers always carry them)",
    )
    usage_ledger: bool = _setting(
        False,
        "keep a usage ledger per key and minute (checks, upstream responses, bytes) and send "
        "it to the client registry (POST /v1/usage at AUTHZ_REGISTRY_URL, with "
        "AUTHZ_REGISTRY_TOKEN), in any registry mode",
    )
    usage_flush_interval: float = _setting(
        10.0,
        "seconds between sends of the usage ledger's completed minutes to the registry",
        between(0.05, 3600),
    )
    usage_max_buffered: int = _setting(
        100_000,
        "usage ledger entries (one key, one minute) held at most while they wait for the "
        "registry; beyond, checks and upstream responses are not counted (and counted as "
        "dropped)",
        between(1, 10**7),
    )
    metrics_client_cap: int = _setting(
        1000,
        "distinct client_id label values in /metrics; further clients are counted as 'other'",
        between(1, 100_000),
    )
    access_log_client_header: str = _setting(
        "",
        "request header naming the client in Envoy's access logs when the ext_authz dynamic "
        "metadata is absent (empty: metadata only)",
        lambda value: _header_name(value) if value else None,
    )
    keys_file: Path = _setting(
        Path("keys.yaml"), "YAML file of SHA-256 key hashes and their clients"
    )
    keys_reload_interval: float = _setting(
        2.0,
        "seconds between checks of the keys file for changes (0: never reload)",
        between(0, 3600),
    )
    policy_file: str = _setting(
        "",
        "YAML access-policy file: rules by host, method and path, allowing by role or client "
        "(empty: none; every identified client is allowed, subject to its route's requirements)",
    )
    policy_reload_interval: float = _setting(
        2.0,
        "seconds between checks of the policy file for changes (0: never reload)",
        between(0, 3600),
    )
    check_timeout: float = _setting(
        0.15,
        "seconds one check may take before it is denied with 503; keep it below Envoy's "
        "ext_authz timeout",
        between(0.001, 30),
    )
    max_key_length: int = _setting(
        128, "longest API key accepted, in characters", between(16, 4096)
    )
    key_prefix: str = _setting(
        "azk",
        "prefix of keys in the checksummed format (the registry's REGISTRY_KEY_PREFIX): a key "
        "of that shape whose checksum is wrong is refused without any lookup",
        _key_prefix,
    )
    require_key_checksum: bool = _setting(
        False,
        "refuse every key that is not in the checksummed format with AUTHZ_KEY_PREFIX, without "
        "any lookup",
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
    retry_after: int = _setting(1, "Retry-After seconds sent with 503 answers", between(0, 3600))
    max_message_bytes: int = _setting(
        1 << 20, "largest gRPC message accepted, in bytes", between(4096, 64 << 20)
    )
    max_concurrent_checks: int = _setting(
        1000,
        "checks waiting for the registry at once (AUTHZ_GRPC_WORKERS bounds them too); beyond "
        "that, checks that would wait are denied with 503 overloaded (answers from memory "
        "never wait)",
        between(1, 100_000),
    )
    drain_delay: float = _setting(
        0.0,
        "seconds to keep answering after SIGTERM while health reports NOT_SERVING, so "
        "load balancers stop sending checks before the port closes",
        between(0, 300),
    )
    shutdown_grace: float = _setting(
        10.0, "seconds in-flight checks get to finish after SIGTERM", between(0, 300)
    )
    log_level: Literal["debug", "info", "warning", "error"] = _setting(
        "info", "log level; decisions are logged at info"
    )
    log_redact_fields: tuple[str, ...] = _setting(
        ("authorization", "api_key", "apikey", "key", "x-api-key", "token"),
        "comma-separated log field names whose values are always replaced by [redacted]",
    )

    def __post_init__(self) -> None:
        if self.registry == "http" and not self.registry_token:
            raise SettingsError(
                "AUTHZ_REGISTRY_TOKEN (registry_token): required with registry=http"
            )
        if self.registry_timeout >= self.check_timeout:
            raise SettingsError(
                "AUTHZ_REGISTRY_TIMEOUT (registry_timeout): must be below AUTHZ_CHECK_TIMEOUT "
                f"({self.check_timeout}), or checks would time out before the registry does"
            )
        if self.usage_ledger and not self.registry_token:
            raise SettingsError(
                "AUTHZ_USAGE_LEDGER (usage_ledger): needs AUTHZ_REGISTRY_TOKEN, the service "
                "token with which the ledger is sent to the registry at AUTHZ_REGISTRY_URL"
            )
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
    return load_settings(Settings, ENV_PREFIX, config_file, environ)


def describe() -> str:
    """One paragraph per setting, for --help."""
    return describe_settings(Settings, ENV_PREFIX)


__all__ = ["Settings", "SettingsError", "describe", "env_name", "load"]
