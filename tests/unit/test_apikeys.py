"""The key format: entropy, alphabet and an offline checksum that catches typos."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz_service import apikeys

KEY_SHAPE = re.compile(r"[a-z][a-z0-9]{0,15}_[0-9A-Za-z]{38}")


def test_generated_keys_carry_at_least_160_bits_of_entropy() -> None:
    """32 random base62 characters give about 190 bits."""
    assert apikeys.BODY_LENGTH * math.log2(len(apikeys.BASE62)) >= 160


@given(st.from_regex(apikeys.PREFIX_PATTERN, fullmatch=True))
def test_generated_keys_have_the_documented_shape_and_a_valid_checksum(prefix: str) -> None:
    """prefix, underscore, 32 body characters and 6 checksum characters; URL-safe throughout."""
    key = apikeys.generate(prefix)
    assert key.startswith(prefix + "_")
    assert KEY_SHAPE.fullmatch(key)
    assert apikeys.has_valid_checksum(key)


@given(st.integers(min_value=4, max_value=41), st.sampled_from(apikeys.BASE62))
def test_changing_any_one_character_breaks_the_checksum(position: int, replacement: str) -> None:
    """A single-character typo anywhere after the prefix is caught offline."""
    key = apikeys.generate()
    if key[position] == replacement:
        return
    typo = key[:position] + replacement + key[position + 1 :]
    assert not apikeys.has_valid_checksum(typo)


def test_keys_are_unique() -> None:
    """Two generated keys never collide (a smoke test of the random source)."""
    assert len({apikeys.generate() for _ in range(1000)}) == 1000


@pytest.mark.parametrize("prefix", ["", "Azk", "1az", "a" * 17, "a-b"])
def test_invalid_prefixes_are_refused(prefix: str) -> None:
    """Prefixes are 1-16 lower-case letters or digits starting with a letter."""
    with pytest.raises(ValueError, match="invalid key prefix"):
        apikeys.generate(prefix)


def test_keys_are_hashed_with_sha256() -> None:
    """The stored form is the hex SHA-256 of the key."""
    assert apikeys.hash_key("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
