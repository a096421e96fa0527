"""Settings: defaults, a config file, the environment on top, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz_service import config
from authz_service.config import unknown_variables
from authz_service.settings import ENV_PREFIX, Settings, SettingsError, describe, load
from client_registry.settings import ENV_PREFIX as REGISTRY_PREFIX
from client_registry.settings import RegistrySettings


def test_defaults_need_no_configuration() -> None:
    """With nothing set, the documented defaults apply."""
    settings = load(environ={})
    assert settings == Settings()
    assert settings.grpc_address == "0.0.0.0:9001"
    assert settings.http_address == "0.0.0.0:9090"
    assert settings.keys_file == Path("keys.yaml")


def test_the_environment_overrides_the_config_file(tmp_path: Path) -> None:
    """Precedence is default < file < environment."""
    config = tmp_path / "config.yaml"
    config.write_text("check_timeout: 0.5\nrealm: from-file\nlog_redact_fields: [a, b]\n")
    settings = load(config, environ={"AUTHZ_REALM": "from-env"})
    assert settings.check_timeout == 0.5
    assert settings.realm == "from-env"
    assert settings.log_redact_fields == ("a", "b")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"AUTHZ_GRPC_ADDRESS": "nowhere"},
            "AUTHZ_GRPC_ADDRESS (grpc_address): expected host:port",
        ),
        (
            {"AUTHZ_HTTP_ADDRESS": "unix:/x"},
            "AUTHZ_HTTP_ADDRESS (http_address): expected host:port",
        ),
        (
            {"AUTHZ_CHECK_TIMEOUT": "fast"},
            "AUTHZ_CHECK_TIMEOUT (check_timeout): must be a number of seconds; got 'fast'",
        ),
        (
            {"AUTHZ_GRPC_WORKERS": "many"},
            "AUTHZ_GRPC_WORKERS (grpc_workers): must be a whole number; got 'many'",
        ),
        (
            {"AUTHZ_COLD_LOOKUP_RATE": "lots"},
            "AUTHZ_COLD_LOOKUP_RATE (cold_lookup_rate): must be a number; got 'lots'",
        ),
        ({"AUTHZ_CHECK_TIMEOUT": "0"}, "AUTHZ_CHECK_TIMEOUT (check_timeout): must be between"),
        ({"AUTHZ_MAX_KEY_LENGTH": "8"}, "AUTHZ_MAX_KEY_LENGTH (max_key_length): must be between"),
        ({"AUTHZ_REQUIRE_KEY_CHECKSUM": "maybe"}, "AUTHZ_REQUIRE_KEY_CHECKSUM"),
        (
            {"AUTHZ_NON_HTTP_REQUESTS": "shrug"},
            "AUTHZ_NON_HTTP_REQUESTS (non_http_requests): expected one of deny, allow",
        ),
        ({"AUTHZ_CLIENT_ID_HEADER": "X Client"}, "AUTHZ_CLIENT_ID_HEADER (client_id_header)"),
        ({"AUTHZ_CLIENT_ID_HEADER": "authorization"}, "'authorization' is reserved"),
        ({"AUTHZ_CLIENT_NAME_HEADER": "x-client-id"}, "three different names"),
        ({"AUTHZ_REALM": "é"}, "AUTHZ_REALM (realm): 1-64 printable ASCII"),
        ({"AUTHZ_LOG_LEVEL": "loud"}, "AUTHZ_LOG_LEVEL (log_level): expected one of"),
        (
            {"AUTHZ_USAGE_LEDGER": "true"},
            "AUTHZ_USAGE_LEDGER (usage_ledger): needs AUTHZ_REGISTRY_TOKEN",
        ),
        (
            {"AUTHZ_USAGE_FLUSH_INTERVAL": "0"},
            "AUTHZ_USAGE_FLUSH_INTERVAL (usage_flush_interval): must be between",
        ),
        (
            {"AUTHZ_USAGE_MAX_BUFFERED": "0"},
            "AUTHZ_USAGE_MAX_BUFFERED (usage_max_buffered): must be between",
        ),
    ],
)
def test_invalid_values_are_refused_naming_the_setting(
    environ: dict[str, str], message: str
) -> None:
    """The error says which variable and which key to fix."""
    with pytest.raises(SettingsError) as error:
        load(environ=environ)
    assert message in str(error.value)


def test_the_usage_ledger_works_in_any_registry_mode_given_a_token() -> None:
    """It only needs somewhere to send the ledger: the registry's URL and service token."""
    settings = load(environ={"AUTHZ_USAGE_LEDGER": "true", "AUTHZ_REGISTRY_TOKEN": "t"})
    assert (settings.registry, settings.usage_ledger) == ("static", True)
    assert (settings.rate_limits, settings.rate_limit_headers) == (True, True)


def test_unix_sockets_are_accepted_for_grpc() -> None:
    """Envoy can reach the service over a Unix domain socket."""
    assert load(environ={"AUTHZ_GRPC_ADDRESS": "unix:/run/authz.sock"}).grpc_address == (
        "unix:/run/authz.sock"
    )


def test_an_unparsable_number_is_reported_once_in_our_words() -> None:
    """The value appears once, after the setting's name and what it must be."""
    with pytest.raises(SettingsError) as error:
        load(environ={"AUTHZ_CHECK_TIMEOUT": "abc"})
    assert str(error.value).count("abc") == 1
    assert "could not convert" not in str(error.value)


def test_unknown_variables_with_the_prefix_are_reported_with_the_likely_setting() -> None:
    """A typo is named with a suggestion; settings and other programs' variables are not."""
    environ = {
        "AUTHZ_CHEK_TIMEOUT": "0.2",
        "AUTHZ_COLOUR": "red",
        "AUTHZ_REALM": "mine",
        "PATH": "/bin",
    }
    unknown = unknown_variables(Settings, ENV_PREFIX, environ)
    assert [(u.name, u.suggestion) for u in unknown] == [
        ("AUTHZ_CHEK_TIMEOUT", "AUTHZ_CHECK_TIMEOUT"),
        ("AUTHZ_COLOUR", None),
    ]
    assert str(unknown[0]) == (
        "AUTHZ_CHEK_TIMEOUT is not a setting and is ignored (did you mean AUTHZ_CHECK_TIMEOUT?)"
    )


def test_unknown_variables_never_include_values() -> None:
    """A mistyped token variable's value (a secret) is not repeated."""
    unknown = unknown_variables(Settings, ENV_PREFIX, {"AUTHZ_REGISTRY_TOKN": "s3cret-value"})
    assert "s3cret-value" not in str(unknown)


def test_the_registry_settings_get_the_same_warnings() -> None:
    """The machinery is shared: REGISTRY_ typos are found too, and extra names can be known."""
    environ = {"REGISTRY_ADMN_TOKEN": "x", "REGISTRY_URL": "http://r"}
    unknown = unknown_variables(RegistrySettings, REGISTRY_PREFIX, environ)
    assert [(u.name, u.suggestion) for u in unknown] == [
        ("REGISTRY_ADMN_TOKEN", "REGISTRY_ADMIN_TOKEN"),
        ("REGISTRY_URL", None),
    ]
    known = frozenset({"REGISTRY_URL"})
    assert len(unknown_variables(RegistrySettings, REGISTRY_PREFIX, environ, known)) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour: red", "unknown setting 'colour'$"),
        ("chek_timeout: 1", "unknown setting 'chek_timeout' \\(did you mean 'check_timeout'\\?\\)"),
        ("[1]", "expected a mapping"),
        ("a: [", "not valid YAML"),
    ],
)
def test_a_bad_config_file_is_refused(tmp_path: Path, text: str, message: str) -> None:
    """Unknown keys are errors, not silently ignored typos."""
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=message):
        load(config, environ={})


def test_a_missing_config_file_is_refused(tmp_path: Path) -> None:
    """--config pointing nowhere is an error."""
    with pytest.raises(SettingsError, match="cannot read"):
        load(tmp_path / "none.yaml", environ={})


def test_help_lists_every_setting_with_its_variable_and_default() -> None:
    """--help is generated from the same table the loader uses."""
    text = describe()
    for name in Settings.__dataclass_fields__:
        assert f"AUTHZ_{name.upper()}  (config key: {name}; default: " in text


def test_a_rejected_secret_is_never_repeated() -> None:
    """A token or a URL that may carry a password is named, not shown, when it is refused."""
    with pytest.raises(SettingsError) as error:
        load(environ={"AUTHZ_REDIS_URL": "http://:hunter2-password@host:6379/0"})
    assert str(error.value) == (
        "AUTHZ_REDIS_URL (redis_url): expected redis://host:port/db; the value is not shown"
    )
    with pytest.raises(SettingsError) as error:
        config.load(RegistrySettings, REGISTRY_PREFIX, None, {"REGISTRY_ADMIN_TOKEN": "hunter2"})
    assert "hunter2" not in str(error.value)


def test_a_registry_token_with_a_control_character_is_refused_at_start() -> None:
    """It goes into a header of every registry call, where it could split the request."""
    with pytest.raises(SettingsError) as error:
        load(environ={"AUTHZ_REGISTRY_TOKEN": "hunter2\x00more"})
    assert str(error.value) == (
        "AUTHZ_REGISTRY_TOKEN (registry_token): printable characters only (a token, as "
        "issued); the value is not shown"
    )
