"""The credential rules: which Authorization values yield a key, and why the others are refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz_service import apikeys
from authz_service.credentials import CredentialRules, extract
from authz_service.model import Credential
from authz_service.reasons import Reason

RULES = CredentialRules(max_key_length=64)
KEY = "k3y-With.all_token68~chars+/=="


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        pytest.param((f"ApiKey {KEY}",), KEY, id="canonical"),
        pytest.param((f"apikey {KEY}",), KEY, id="scheme lower case"),
        pytest.param((f"APIKEY {KEY}",), KEY, id="scheme upper case"),
        pytest.param((f"  ApiKey   {KEY}  ",), KEY, id="surrounding and inner spaces"),
        pytest.param((f"ApiKey\t{KEY}",), KEY, id="tab separator"),
    ],
)
def test_a_well_formed_apikey_header_yields_its_key(
    authorization: tuple[str, ...], expected: str
) -> None:
    """The scheme is case-insensitive and surrounding whitespace is tolerated."""
    credential = extract(authorization, RULES)
    assert isinstance(credential, Credential)
    assert credential.key.reveal() == expected
    assert credential.key_hash == apikeys.hash_key(expected)


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        pytest.param((), Reason.MISSING_CREDENTIAL, id="no header"),
        pytest.param(("",), Reason.MISSING_CREDENTIAL, id="empty header"),
        pytest.param(("   ",), Reason.MISSING_CREDENTIAL, id="blank header"),
        pytest.param(("Bearer abc",), Reason.UNSUPPORTED_SCHEME, id="bearer"),
        pytest.param(("Basic dXNlcjpwYXNz",), Reason.UNSUPPORTED_SCHEME, id="basic"),
        pytest.param(("ApiKeyabc",), Reason.UNSUPPORTED_SCHEME, id="no separator"),
        pytest.param(("abc",), Reason.UNSUPPORTED_SCHEME, id="bare key"),
        pytest.param(("ApiKey",), Reason.MALFORMED_CREDENTIAL, id="scheme without key"),
        pytest.param(("ApiKey   ",), Reason.MALFORMED_CREDENTIAL, id="scheme and spaces"),
        pytest.param(("ApiKey a b",), Reason.MALFORMED_CREDENTIAL, id="two tokens"),
        pytest.param(('ApiKey ab"c',), Reason.MALFORMED_CREDENTIAL, id="quote"),
        pytest.param(("ApiKey abc;d",), Reason.MALFORMED_CREDENTIAL, id="semicolon"),
        pytest.param(("ApiKey ab\x00c",), Reason.MALFORMED_CREDENTIAL, id="NUL"),
        pytest.param(("ApiKey ab\ufffdc",), Reason.MALFORMED_CREDENTIAL, id="replaced byte"),
        pytest.param(("ApiKey kéy",), Reason.MALFORMED_CREDENTIAL, id="non-ASCII"),
        pytest.param(("ApiKey a=b",), Reason.MALFORMED_CREDENTIAL, id="padding inside"),
        pytest.param(("ApiKey " + "a" * 65,), Reason.MALFORMED_CREDENTIAL, id="over length"),
        pytest.param(("ApiKey a,ApiKey b",), Reason.MULTIPLE_CREDENTIALS, id="comma-merged"),
        pytest.param(("ApiKey a, b",), Reason.MULTIPLE_CREDENTIALS, id="comma in value"),
        pytest.param(("ApiKey a", "ApiKey a"), Reason.MULTIPLE_CREDENTIALS, id="repeated same"),
        pytest.param(("ApiKey a", "Bearer b"), Reason.MULTIPLE_CREDENTIALS, id="repeated mixed"),
    ],
)
def test_anything_else_is_refused_with_a_stable_reason(
    authorization: tuple[str, ...], reason: Reason
) -> None:
    """Missing, foreign, malformed and multiple credentials each have their own reason."""
    assert extract(authorization, RULES) == reason


def test_the_length_bound_is_inclusive() -> None:
    """A key exactly max_key_length long is accepted."""
    assert isinstance(extract(("ApiKey " + "a" * 64,), RULES), Credential)


def test_checksummed_format_is_enforced_only_when_required() -> None:
    """With require_checksum, only keys whose CRC32 suffix matches get past the offline check."""
    strict = CredentialRules(require_checksum=True)
    good = apikeys.generate()
    tampered = good[:-7] + ("A" if good[-7] != "A" else "B") + good[-6:]
    assert isinstance(extract((f"ApiKey {good}",), strict), Credential)
    assert extract((f"ApiKey {tampered}",), strict) == Reason.MALFORMED_CREDENTIAL
    assert extract(("ApiKey plainkey",), strict) == Reason.MALFORMED_CREDENTIAL
    assert isinstance(extract(("ApiKey plainkey",), CredentialRules()), Credential)


def test_a_credential_never_shows_its_key() -> None:
    """repr() and str() of a Credential redact the key."""
    credential = extract((f"ApiKey {KEY}",), RULES)
    assert KEY not in repr(credential)
    assert KEY not in str(credential)


@given(st.lists(st.text(max_size=200), max_size=3))
def test_no_header_value_can_crash_the_parser_or_smuggle_a_bad_key(values: list[str]) -> None:
    """Any input yields a reason or a key that satisfies every rule."""
    result = extract(tuple(values), RULES)
    if isinstance(result, Credential):
        assert len(values) == 1
        key = result.key.reveal()
        assert 0 < len(key) <= RULES.max_key_length
        assert key.isascii()
        assert not any(c in key for c in ' \t\r\n,;"\x00')
    else:
        assert isinstance(result, Reason)
