"""The API key format: generation, hashing and the offline checksum.

A key reads ``<prefix>_<body><check>``: ``prefix`` is 1-16 lower-case letters or digits starting
with a letter, ``body`` is 32 random base62 characters (about 190 bits of entropy) and ``check``
is the CRC32 of ``<prefix>_<body>`` written as 6 base62 characters, most significant first,
zero-padded. The checksum lets a malformed or mistyped key be rejected without any lookup, and
lets secret scanners recognise leaked keys, as with GitHub's token format.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import zlib

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BODY_LENGTH = 32
CHECK_LENGTH = 6
DEFAULT_PREFIX = "azk"
PREFIX_PATTERN = re.compile(r"[a-z][a-z0-9]{0,15}")

_CHECKSUMMED = re.compile(
    rf"(?P<payload>[a-z][a-z0-9]{{0,15}}_[0-9A-Za-z]{{{BODY_LENGTH}}})"
    rf"(?P<check>[0-9A-Za-z]{{{CHECK_LENGTH}}})"
)


def generate(prefix: str = DEFAULT_PREFIX) -> str:
    """Return a new random key in the checksummed format."""
    if not PREFIX_PATTERN.fullmatch(prefix):
        raise ValueError(f"invalid key prefix {prefix!r}: expected {PREFIX_PATTERN.pattern}")
    payload = f"{prefix}_{''.join(secrets.choice(BASE62) for _ in range(BODY_LENGTH))}"
    return payload + _checksum(payload)


def has_valid_checksum(key: str, prefix: str | None = None) -> bool:
    """True when ``key`` has the checksummed format (with ``prefix``, if given) and its
    checksum matches."""
    match = _CHECKSUMMED.fullmatch(key)
    return (
        match is not None
        and (prefix is None or match["payload"].startswith(prefix + "_"))
        and _checksum(match["payload"]) == match["check"]
    )


def has_format(key: str, prefix: str) -> bool:
    """True when ``key`` is as long as a checksummed key with ``prefix`` and starts with it:
    such a key can only be valid if it is one, checksum included."""
    return len(key) == len(prefix) + 1 + BODY_LENGTH + CHECK_LENGTH and key.startswith(prefix + "_")


def digest(key: str) -> bytes:
    """The SHA-256 of a key: the only form in which keys are stored or cached."""
    return hashlib.sha256(key.encode()).digest()


KEY_ID_LENGTH = 12  # hex digits of a key's SHA-256 that name it in logs and listings


def key_id(digest: bytes | str) -> str:
    """The name of a key in logs and listings: the first hex digits of its SHA-256 (raw or
    hex). Not secret, as the hash is not."""
    if isinstance(digest, bytes):
        return digest[: KEY_ID_LENGTH // 2].hex()
    return digest[:KEY_ID_LENGTH].lower()


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as files and the registry contract write it."""
    return hashlib.sha256(key.encode()).hexdigest()


# Every two-digit base62 number, so that the six digits of a checksum take three lookups (it is
# computed on every check).
_PAIRS = tuple(a + b for a in BASE62 for b in BASE62)


def _checksum(payload: str) -> str:
    high, rest = divmod(zlib.crc32(payload.encode()), 62**4)
    middle, low = divmod(rest, 62**2)
    return _PAIRS[high] + _PAIRS[middle] + _PAIRS[low]
