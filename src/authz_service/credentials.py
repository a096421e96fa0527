"""Find and validate the API key in a request. Pure: no I/O, no clock, no registry.

Everything rejected here is rejected before any lookup, so a flood of junk credentials costs
the registry nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from authz_service import apikeys
from authz_service.model import ApiKey, Credential
from authz_service.reasons import Reason

SCHEME = "apikey"  # compared case-insensitively, as RFC 9110 says auth schemes are

# RFC 9110 token68: the syntax HTTP allows for a single-token credential.
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True, slots=True)
class CredentialRules:
    max_key_length: int = 128
    # Keys shaped like the checksummed format with this prefix are refused offline when their
    # checksum is wrong: such a key can never be valid.
    key_prefix: str = apikeys.DEFAULT_PREFIX
    # Refuse every key that is not in the checksummed format with ``key_prefix``.
    require_checksum: bool = False


def extract(authorization: tuple[str, ...], rules: CredentialRules) -> Credential | Reason:
    """Return the request's one API key, or the reason it has none that could be valid."""
    if not authorization:
        return Reason.MISSING_CREDENTIAL
    # Several values (repeated headers, or Envoy's comma-merged form) are refused outright
    # rather than picking one: checking one value and forwarding another is CVE-2021-32777.
    if len(authorization) > 1 or "," in authorization[0]:
        return Reason.MULTIPLE_CREDENTIALS
    parts = authorization[0].split(maxsplit=1)
    if not parts:
        return Reason.MISSING_CREDENTIAL
    if parts[0].lower() != SCHEME:
        return Reason.UNSUPPORTED_SCHEME
    key = parts[1].strip() if len(parts) == 2 else ""
    if (
        not key
        or len(key) > rules.max_key_length
        or not _TOKEN68.fullmatch(key)
        or (
            (rules.require_checksum or apikeys.has_format(key, rules.key_prefix))
            and not apikeys.has_valid_checksum(key, rules.key_prefix)
        )
    ):
        return Reason.MALFORMED_CREDENTIAL
    digest = apikeys.digest(key)
    return Credential(ApiKey(key), digest, apikeys.key_id(digest))
