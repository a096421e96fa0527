"""Settings: defaults, a config file, the environment on top, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz_service.settings import Settings, SettingsError, describe, load


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
        ({"AUTHZ_CHECK_TIMEOUT": "fast"}, "AUTHZ_CHECK_TIMEOUT (check_timeout): could not convert"),
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
    ],
)
def test_invalid_values_are_refused_naming_the_setting(
    environ: dict[str, str], message: str
) -> None:
    """The error says which variable and which key to fix."""
    with pytest.raises(SettingsError) as error:
        load(environ=environ)
    assert message in str(error.value)


def test_unix_sockets_are_accepted_for_grpc() -> None:
    """Envoy can reach the service over a Unix domain socket."""
    assert load(environ={"AUTHZ_GRPC_ADDRESS": "unix:/run/authz.sock"}).grpc_address == (
        "unix:/run/authz.sock"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour: red", "unknown setting 'colour'"),
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
