"""Settings machinery shared by the project's commands: each setting is a dataclass field with a
default, an environment variable, a config-file key, a description and a check.

Precedence: default < config file (YAML, keys are the field names) < environment. An error names
the setting as both its variable and its key. A mistyped config-file key is an error; a mistyped
environment variable cannot be told from one meant for another program, so ``unknown_variables``
lists them for the caller to warn about.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import field, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting is invalid; the message names it."""


def setting(
    default: Any,
    doc: str,
    check: Callable[[Any], str | None] | None = None,
    *,
    secret: bool = False,
) -> Any:
    """A settings field: its default, its description for --help, and an optional check. The
    value of a ``secret`` one (a token, a URL that may carry a password) is never repeated in
    an error."""
    return field(default=default, metadata={"doc": doc, "check": check, "secret": secret})


def address(unix_ok: bool) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if unix_ok and value.startswith("unix:") and len(value) > len("unix:"):
            return None
        host, sep, port = value.rpartition(":")
        if sep and host and port.isdigit() and 0 <= int(port) <= 65535:
            return None
        return "expected host:port" + (" or unix:/path" if unix_ok else "")

    return check


def between(low: float, high: float) -> Callable[[float], str | None]:
    return lambda value: None if low <= value <= high else f"must be between {low} and {high}"


def load(
    cls: type[T],
    prefix: str,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build ``cls`` from its defaults, an optional YAML file and the environment."""
    environ = os.environ if environ is None else environ
    from_file = _read_config(config_file) if config_file else {}
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(from_file) - names)
    if unknown:
        hint = _did_you_mean(str(unknown[0]), names)
        raise SettingsError(f"{config_file}: unknown setting {unknown[0]!r}{hint}")
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        variable = prefix + f.name.upper()
        where = f"{variable} ({f.name})"
        if variable in environ:
            raw: Any = environ[variable]
        elif f.name in from_file:
            raw = from_file[f.name]
        else:
            continue
        got = "the value is not shown" if f.metadata["secret"] else f"got {raw!r}"
        value = _coerce(raw, hints[f.name], where, f.metadata["doc"], got)
        problem = f.metadata["check"](value) if f.metadata["check"] else None
        if problem:
            raise SettingsError(f"{where}: {problem}; {got}")
        values[f.name] = value
    return cls(**values)


class UnknownVariable(NamedTuple):
    """An environment variable with a settings prefix that names no setting."""

    name: str
    suggestion: str | None  # the setting it was probably meant to be

    def __str__(self) -> str:
        hint = f" (did you mean {self.suggestion}?)" if self.suggestion else ""
        return f"{self.name} is not a setting and is ignored{hint}"


def unknown_variables(
    cls: type[Any],
    prefix: str,
    environ: Mapping[str, str] | None = None,
    also_known: frozenset[str] = frozenset(),
) -> list[UnknownVariable]:
    """Variables starting with ``prefix`` that are neither settings nor ``also_known``; only
    their names are reported, since a value may be a secret."""
    environ = os.environ if environ is None else environ
    settings = {prefix + f.name.upper() for f in fields(cls)}
    known = settings | also_known
    return [
        UnknownVariable(name, _closest(name, settings))
        for name in sorted(environ)
        if name.startswith(prefix) and name not in known
    ]


def log_unknown_variables(unknown: list[UnknownVariable], log: logging.Logger) -> None:
    """One warning per unknown variable, for a server's start-up log."""
    for variable in unknown:
        log.warning(
            str(variable),
            extra={
                "fields": {
                    "event": "unknown_setting",
                    "variable": variable.name,
                    "did_you_mean": variable.suggestion,
                }
            },
        )


def _closest(name: str, candidates: set[str]) -> str | None:
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.75)
    return close[0] if close else None


def _did_you_mean(name: str, candidates: set[str]) -> str:
    close = _closest(name, candidates)
    return f" (did you mean {close!r}?)" if close else ""


def describe(cls: type[Any], prefix: str) -> str:
    """One paragraph per setting, for --help."""
    lines = []
    for f in fields(cls):
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(default)
        if default == "":
            default = "(none)"
        lines.append(f"  {prefix}{f.name.upper()}  (config key: {f.name}; default: {default})")
        lines.append(f"      {f.metadata['doc']}")
    return "\n".join(lines)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong in a YAML file, and where, without the text around it: the line PyYAML
    would quote may hold a secret (a key pasted into a keys file, a token in a config file)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return type(exc).__name__


def _read_config(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SettingsError(f"--config {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"--config {path}: not valid YAML: {yaml_problem(exc)}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise SettingsError(f"--config {path}: expected a mapping of setting names to values")
    return document


def _coerce(raw: Any, kind: Any, where: str, doc: str, got: str) -> Any:
    if get_origin(kind) is Literal:
        convert: Callable[[Any], Any] = _choice(get_args(kind))
    elif get_origin(kind) is tuple:
        convert = _names
    elif kind is float and doc.startswith("seconds"):
        # Durations are documented as "seconds ..."; the error says what to write.
        convert = _number(float, "must be a number of seconds")
    else:
        convert = _CONVERTERS[kind]
    try:
        return convert(raw)
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}; {got}") from None


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


def _number(kind: type[int] | type[float], problem: str) -> Callable[[Any], int | float]:
    def convert(raw: Any) -> int | float:
        try:
            # Through str() first, so that YAML's true (an int to Python) is refused as a number.
            return kind(str(raw).strip())
        except ValueError:
            raise ValueError(problem) from None

    return convert


def _names(raw: Any) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else str(raw).split(",")
    return tuple(str(item).strip() for item in items if str(item).strip())


_CONVERTERS: dict[Any, Callable[[Any], Any]] = {
    bool: _bool,
    int: _number(int, "must be a whole number"),
    float: _number(float, "must be a number"),
    str: lambda raw: str(raw).strip(),
    Path: lambda raw: Path(str(raw)),
}
