"""Access policy: which identified clients may call which routes.

Two sources combine, and both must allow:

- the policy file (``AUTHZ_POLICY_FILE``): an ordered list of rules matching host, method and
  path; the first matching rule decides, and ``default`` decides for requests no rule matches;
- the route's own requirements, sent by Envoy as ``context_extensions`` (``ExtAuthzPerRoute``):
  ``required_roles`` (any of) and/or ``allowed_clients``.

Paths are matched in one normal form, and the rules' own paths are written in it: percent-encoded
unreserved characters decoded, other escapes in upper case, dot-segments removed, duplicate and
trailing slashes dropped. A path whose meaning depends on who reads it (an encoded slash or
backslash, a backslash, a control character, a malformed escape, and ``;`` path parameters unless
the file says to strip them) is refused rather than guessed at.

A rule (or the whole policy) in dry-run never denies: it is evaluated, its would-be denial is
recorded, and the decision is taken as if it were not there.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from authz_service.config import yaml_problem
from authz_service.model import Client, Request, Route
from authz_service.reasons import Reason
from authz_service.watched_file import WatchedFile

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_RULES = 1000
RULE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
ROUTE_RULE_ID = "route"  # the rule id of a route's own requirements, unless it names one
DEFAULT_RULE_ID = "default"  # the rule id of the policy's default
ROUTE_KEYS = frozenset({"required_roles", "allowed_clients", "rule_id", "dry_run"})
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_HOST_PATTERN = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the rule and the field."""


class AmbiguousPathError(ValueError):
    pass


def normalize_path(path: str, strip_parameters: bool = False) -> str:
    """The one form in which paths are compared; raises AmbiguousPathError for a path that
    different servers could read differently."""
    if (  # the common case, already in normal form: a few substring tests in C
        path.startswith("/")
        and path.isprintable()
        and "%" not in path
        and ";" not in path
        and "\\" not in path
        and "//" not in path
        and "/." not in path
        and (path == "/" or not path.endswith("/"))
    ):
        return path
    if not path.startswith("/"):
        raise AmbiguousPathError("the path does not start with '/'")
    if "\\" in path:
        raise AmbiguousPathError("a backslash")
    if "%" in path:
        path = _decode_unreserved(path)
    if ";" in path and not strip_parameters:
        raise AmbiguousPathError("a ';' path parameter")
    segments: list[str] = []
    for raw in path.split("/"):
        segment = raw.partition(";")[0] if strip_parameters else raw
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in segment):
            raise AmbiguousPathError("a control character")
        segments.append(segment)
    return "/" + "/".join(segments)


def _decode_unreserved(path: str) -> str:
    parts = path.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        escape = part[:2]
        if len(escape) < 2 or not _HEX.issuperset(escape):
            raise AmbiguousPathError("a malformed percent-escape")
        char = chr(int(escape, 16))
        if char in _UNRESERVED:
            out.append(char + part[2:])
        elif char in "/\\":
            raise AmbiguousPathError("an encoded slash or backslash")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            raise AmbiguousPathError("an encoded control character")
        else:
            out.append("%" + escape.upper() + part[2:])
    return "".join(out)


def request_host(host: str) -> str:
    """The host a rule compares: lower case, without port or trailing dot."""
    host = host.lower()
    if host.startswith("["):  # an IPv6 literal, with or without port
        return host.partition("]")[0] + "]"
    return host.partition(":")[0].rstrip(".")


@dataclass(frozen=True, slots=True)
class Grant:
    """Who a rule lets in: anyone identified, or clients with one of ``roles`` or in ``clients``."""

    anyone: bool = False
    roles: frozenset[str] = frozenset()
    clients: frozenset[str] = frozenset()

    def admits(self, client: Client) -> bool:
        return (
            self.anyone
            or client.client_id in self.clients
            or not self.roles.isdisjoint(client.roles)
        )


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    grant: Grant
    hosts: frozenset[str] | None = None  # exact hosts; None: any host
    host_suffixes: tuple[str, ...] = ()  # from "*.example.com" entries (".example.com")
    methods: frozenset[str] | None = None
    path: re.Pattern[str] | None = None
    dry_run: bool = False
    # The first path segments (lower case) the rule can match; None: any. Lets a request skip
    # every rule that cannot match it with one dictionary lookup.
    first_segments: frozenset[str] | None = None

    def matches(self, host: str, method: str, path: str) -> bool:
        if (
            self.hosts is not None
            and host not in self.hosts
            and not host.endswith(self.host_suffixes)
        ):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        return self.path is None or self.path.fullmatch(path) is not None


class Verdict(NamedTuple):
    """What the policy says about one request from one client. (A NamedTuple: made on every
    check, and several times cheaper to build than a frozen dataclass.)"""

    allowed: bool
    reason: Reason = Reason.ALLOWED
    rule: str | None = None  # the rule that decided; None for the default or no policy
    dry_run_rule: str | None = None  # a dry-run rule that would have denied
    path: str | None = None  # the normalised path the rules saw


ALLOWED = Verdict(allowed=True)
_DEFAULT_DENIAL = Verdict(allowed=False, reason=Reason.FORBIDDEN, rule=DEFAULT_RULE_ID)
_DEFAULT_DENIAL_IN_DRY_RUN = Verdict(allowed=True, dry_run_rule=DEFAULT_RULE_ID)


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    default_allow: bool = True
    dry_run: bool = False
    strip_path_parameters: bool = False
    # Derived from the rules: for a request's first path segment (lower case), the rules that
    # may match it, in order; and the rules for any other segment.
    _by_segment: dict[str, tuple[Rule, ...]] = field(init=False, repr=False, compare=False)
    _anywhere: tuple[Rule, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        anywhere = tuple(r for r in self.rules if r.first_segments is None)
        segments = {s for r in self.rules for s in r.first_segments or ()}
        by_segment = {
            segment: tuple(
                r for r in self.rules if r.first_segments is None or segment in r.first_segments
            )
            for segment in segments
        }
        object.__setattr__(self, "_by_segment", by_segment)
        object.__setattr__(self, "_anywhere", anywhere)

    def evaluate(self, request: Request, client: Client) -> Verdict:
        verdict = self._evaluate_rules(request, client) if self.rules else self._by_default()
        if request.route and verdict.allowed:
            verdict = _evaluate_route(request.route, client, verdict)
        return verdict

    def _evaluate_rules(self, request: Request, client: Client) -> Verdict:
        try:
            path = normalize_path(request.path, self.strip_path_parameters)
        except AmbiguousPathError:
            return Verdict(allowed=False, reason=Reason.AMBIGUOUS_PATH)
        segment = path[1:].partition("/")[0].lower()
        candidates = self._by_segment.get(segment, self._anywhere)
        dry_run_rule = None
        if candidates:
            host, method = request_host(request.host), request.method.upper()
        for rule in candidates:
            if not rule.matches(host, method, path):
                continue
            admitted = rule.grant.admits(client)
            if rule.dry_run:
                # Evaluated as if it were not there, whichever way it goes: only a denial it
                # would have made is recorded, and the rules after it decide.
                if not admitted:
                    dry_run_rule = dry_run_rule or rule.id
                continue
            if admitted:
                return Verdict(True, Reason.ALLOWED, rule.id, dry_run_rule, path)
            if self.dry_run:
                return Verdict(True, Reason.ALLOWED, rule.id, dry_run_rule or rule.id, path)
            return Verdict(False, Reason.FORBIDDEN, rule.id, dry_run_rule, path)
        default = self._by_default()
        dry_run_rule = dry_run_rule or default.dry_run_rule
        return Verdict(default.allowed, default.reason, default.rule, dry_run_rule, path)

    def _by_default(self) -> Verdict:
        if self.default_allow:
            return ALLOWED
        return _DEFAULT_DENIAL_IN_DRY_RUN if self.dry_run else _DEFAULT_DENIAL


NO_POLICY = Policy()  # without a policy file: every identified client, subject to its route


def _evaluate_route(route: Route, client: Client, verdict: Verdict) -> Verdict:
    """Apply a route's requirements to a request the policy file allows."""
    requirement = parse_route(route)
    if requirement is None:
        return Verdict(False, Reason.INVALID_ROUTE_POLICY, ROUTE_RULE_ID, None, verdict.path)
    grant, rule_id, dry_run = requirement
    if grant.admits(client):
        return verdict
    if dry_run:
        dry_run_rule = verdict.dry_run_rule or rule_id
        return Verdict(True, Reason.ALLOWED, verdict.rule, dry_run_rule, verdict.path)
    return Verdict(False, Reason.FORBIDDEN, rule_id, verdict.dry_run_rule, verdict.path)


@functools.lru_cache(maxsize=1024)
def parse_route(route: Route) -> tuple[Grant, str, bool] | None:
    """A route's requirements (parsed once per distinct route), or None when they cannot be
    understood: the route is then closed, as a typo in an Envoy route must not open it."""
    requirement = _parse_route(dict(route))
    if requirement is None:
        log.error(
            "route requirements not understood; the route denies every request",
            extra={"fields": {"event": "route_policy_invalid", "context_extensions": dict(route)}},
        )
    return requirement


def _parse_route(route: dict[str, str]) -> tuple[Grant, str, bool] | None:
    if not set(route) <= ROUTE_KEYS:
        return None
    roles = _csv(route.get("required_roles"))
    clients = _csv(route.get("allowed_clients"))
    rule_id = route.get("rule_id", ROUTE_RULE_ID)
    dry_run = route.get("dry_run", "false")
    if (
        roles == ()
        or clients == ()
        or (roles is None and clients is None)
        or not RULE_ID_PATTERN.fullmatch(rule_id)
        or dry_run not in ("true", "false")
    ):
        return None
    grant = Grant(roles=frozenset(roles or ()), clients=frozenset(clients or ()))
    return grant, rule_id, dry_run == "true"


def _csv(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(item for item in (part.strip() for part in value.split(",")) if item)


# --- the policy file ------------------------------------------------------------------------

_TOP_FIELDS = frozenset({"version", "default", "dry_run", "path_parameters", "rules"})
_RULE_FIELDS = frozenset({"id", "hosts", "methods", "paths", "case_sensitive", "allow", "dry_run"})
_GRANT_FIELDS = frozenset({"roles", "clients"})
_PATH_KINDS = ("exact", "prefix", "glob")


def parse(text: str, source: str) -> Policy:
    """Parse and validate a policy file; errors name the rule and the field."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(document, dict):
        raise PolicyError(f"{source}: expected a mapping with 'version', 'default' and 'rules'")
    unknown = set(document) - _TOP_FIELDS
    if unknown:
        raise PolicyError(f"{source}: unknown top-level field {sorted(unknown)[0]!r}")
    if document.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise PolicyError(f"{source}: version: only version {FORMAT_VERSION} is understood")
    default = document.get("default")
    if default not in ("allow", "deny"):
        raise PolicyError(
            f"{source}: default: required, 'allow' or 'deny' (for requests no rule matches)"
        )
    parameters = document.get("path_parameters", "reject")
    if parameters not in ("reject", "strip"):
        raise PolicyError(f"{source}: path_parameters: 'reject' or 'strip'")
    strip = parameters == "strip"
    entries = document.get("rules") or []
    if not isinstance(entries, list) or len(entries) > MAX_RULES:
        raise PolicyError(f"{source}: rules: expected a list of at most {MAX_RULES} rules")
    rules: list[Rule] = []
    for index, entry in enumerate(entries):
        rule = _parse_rule(entry, f"{source}: rules[{index}]", strip)
        if any(r.id == rule.id for r in rules):
            raise PolicyError(f"{source}: rules[{index}].id: {rule.id!r} is used twice")
        rules.append(rule)
    return Policy(
        rules=tuple(rules),
        default_allow=default == "allow",
        dry_run=_flag(document, "dry_run", source),
        strip_path_parameters=strip,
    )


def _flag(entry: dict[str, Any], name: str, where: str) -> bool:
    value = entry.get(name, False)
    if not isinstance(value, bool):
        raise PolicyError(f"{where}.{name}: expected true or false")
    return value


def _names(entry: dict[str, Any], name: str, where: str) -> list[str] | None:
    value = entry.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where}.{name}: expected a non-empty list of strings")
    return value


def _parse_rule(entry: Any, where: str, strip_parameters: bool) -> Rule:
    if not isinstance(entry, dict):
        raise PolicyError(f"{where}: expected a mapping")
    rule_id = entry.get("id")
    if not isinstance(rule_id, str) or not RULE_ID_PATTERN.fullmatch(rule_id):
        raise PolicyError(f"{where}.id: required, matching {RULE_ID_PATTERN.pattern}")
    where = f"{where} ({rule_id})"
    unknown = set(entry) - _RULE_FIELDS
    if unknown:
        raise PolicyError(f"{where}.{sorted(unknown)[0]}: unknown field")

    hosts: frozenset[str] | None = None
    suffixes: tuple[str, ...] = ()
    host_names = _names(entry, "hosts", where)
    if host_names is not None:
        for host in host_names:
            if not _HOST_PATTERN.fullmatch(host.lower()):
                raise PolicyError(f"{where}.hosts: {host!r} is not a host name or '*.domain'")
        lowered = [h.lower() for h in host_names]
        hosts = frozenset(h for h in lowered if not h.startswith("*."))
        suffixes = tuple(h[1:] for h in lowered if h.startswith("*."))

    methods = None
    method_names = _names(entry, "methods", where)
    if method_names is not None:
        methods = frozenset(m.upper() for m in method_names)
        bad = sorted(methods - _METHODS)
        if bad:
            raise PolicyError(f"{where}.methods: {bad[0]!r} is not an HTTP method")
        if "GET" in methods:
            # Servers answer HEAD with their GET handler: a rule about GET is about HEAD too.
            methods |= {"HEAD"}

    case_sensitive = entry.get("case_sensitive", True)
    if not isinstance(case_sensitive, bool):
        raise PolicyError(f"{where}.case_sensitive: expected true or false")
    paths = entry.get("paths")
    path = _compile_paths(paths, f"{where}.paths", case_sensitive, strip_parameters)
    return Rule(
        id=rule_id,
        grant=_parse_grant(entry.get("allow"), f"{where}.allow"),
        hosts=hosts,
        host_suffixes=suffixes,
        methods=methods,
        path=path,
        dry_run=_flag(entry, "dry_run", where),
        first_segments=_first_segments(paths),
    )


def _parse_grant(value: Any, where: str) -> Grant:
    if value == "any":
        return Grant(anyone=True)
    if value == "none":
        return Grant()
    if not isinstance(value, dict) or not value:
        raise PolicyError(
            f"{where}: required: 'any', 'none', or a mapping with 'roles' and/or 'clients'"
        )
    unknown = sorted(str(name) for name in set(value) - _GRANT_FIELDS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(_GRANT_FIELDS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PolicyError(
            f"{where}.{unknown[0]}: unknown field; {hint}expected 'roles' and/or 'clients'"
        )
    roles = _names(value, "roles", where) or []
    clients = _names(value, "clients", where) or []
    return Grant(roles=frozenset(roles), clients=frozenset(clients))


def _compile_paths(
    value: Any, where: str, case_sensitive: bool, strip_parameters: bool
) -> re.Pattern[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise PolicyError(f"{where}: expected a non-empty list of {{exact|prefix|glob: path}}")
    patterns = []
    for index, item in enumerate(value):
        here = f"{where}[{index}]"
        if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in _PATH_KINDS:
            raise PolicyError(f"{here}: expected one of exact, prefix or glob")
        kind, path = next(iter(item.items()))
        if not isinstance(path, str):
            raise PolicyError(f"{here}.{kind}: expected a path")
        try:
            normal = normalize_path(path, strip_parameters)
        except AmbiguousPathError as exc:
            raise PolicyError(f"{here}.{kind}: {path!r} is ambiguous ({exc})") from None
        if normal != path:
            raise PolicyError(
                f"{here}.{kind}: {path!r} is not in normal form; write {normal!r} "
                "(requests are matched after normalisation)"
            )
        if kind == "exact":
            patterns.append(re.escape(path))
        elif kind == "prefix":  # whole segments: /admin covers /admin and /admin/..., not /adminx
            patterns.append("/.*" if path == "/" else re.escape(path) + "(?:/.*)?")
        elif any("**" in s and s != "**" for s in path.split("/")):
            raise PolicyError(f"{here}.glob: '**' must be a whole segment, as in /a/**/b")
        else:
            patterns.append(_glob(path))
    return re.compile("|".join(patterns), 0 if case_sensitive else re.IGNORECASE)


def _first_segments(paths: list[dict[str, str]] | None) -> frozenset[str] | None:
    """The first segments (lower case) of validated rule paths; None if one can match any."""
    if paths is None:
        return None
    segments = set()
    for item in paths:
        ((kind, path),) = item.items()
        first = path[1:].partition("/")[0]
        if (kind == "prefix" and path == "/") or (kind == "glob" and "*" in first):
            return None
        segments.add(first.lower())
    return frozenset(segments)


def _glob(path: str) -> str:
    """``*`` matches within one segment; a ``**`` segment matches any number of segments,
    none included (``/a/**`` matches ``/a`` too, as the trailing slash of ``/a/`` is dropped)."""
    out = []
    for segment in path.split("/")[1:]:
        if segment == "**":
            out.append("(?:/.*)?")
        else:
            out.append("/" + "[^/]*".join(re.escape(part) for part in segment.split("*")))
    return "".join(out)


class PolicyFile:
    """The policy file in force: loaded at start (errors are fatal), reloaded when it changes."""

    def __init__(self, path: Path, reload_interval: float) -> None:
        self._file = WatchedFile(path, parse, reload_interval, "policy_file", _rule_count)

    def current(self) -> Policy:
        return self._file.value

    async def start(self) -> None:
        try:
            self._file.load()
        except OSError as exc:
            raise PolicyError(
                f"{self._file.path}: cannot read the policy file (setting AUTHZ_POLICY_FILE): "
                f"{exc.strerror}"
            ) from None
        self._file.watch()

    async def close(self) -> None:
        await self._file.close()


def _rule_count(policy: Policy) -> int:
    return len(policy.rules)
