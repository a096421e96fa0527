"""The key store: digests to clients, compact, shared between reader threads and one writer."""

from __future__ import annotations

import hashlib
import sys
import threading
from dataclasses import dataclass, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz_service.keystore import Expiring, Interner, KeyStore


@dataclass(frozen=True, slots=True)
class Client:
    """Shaped like authz_service.model.Client, which the store does not depend on."""

    client_id: str
    name: str
    roles: tuple[str, ...] = ()
    rate_limit: object | None = None


def digest(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


ALICE = Client("cl_alice", "Alice", ("reader",))
BOB = Client("cl_bob", "Bob", ("admin", "reader"))
KEY_A, KEY_B, KEY_C = digest("a"), digest("b"), digest("c")


def test_a_key_that_was_put_is_found_with_its_client() -> None:
    """get answers the client a key was put with (no valid_until by default)."""
    store = KeyStore[Client]()
    store.put(KEY_A, ALICE)
    assert store.get(KEY_A) is ALICE


def test_a_key_that_was_never_put_is_not_found() -> None:
    """get answers None for any other digest."""
    store = KeyStore[Client]()
    store.put(KEY_A, ALICE)
    assert store.get(KEY_B) is None


def test_a_keys_valid_until_is_kept() -> None:
    """A key with a valid_until maps to an Expiring: its client and that time."""
    store = KeyStore[Client]()
    store.put(KEY_A, ALICE, 1_900_000_000.5)
    store.put(KEY_B, ALICE)
    assert store.get(KEY_A) == Expiring(ALICE, 1_900_000_000.5)
    assert store.get(KEY_B) is ALICE


def test_keys_of_equal_clients_share_one_client_object() -> None:
    """A client is kept once, however many keys it has and however many copies were put."""
    store = KeyStore[Client]()
    store.put(KEY_A, Client("cl_alice", "Alice", ("reader",)))
    store.put(KEY_B, Client("cl_alice", "Alice", ("reader",)), 1_900_000_000.0)
    store.put(KEY_C, Client("cl_alice", "Alice", ("reader",)))
    found = [store.get(key) for key in (KEY_A, KEY_B, KEY_C)]
    clients = [value.client if isinstance(value, Expiring) else value for value in found]
    assert None not in clients
    assert len({id(client) for client in clients}) == 1


def test_a_changed_client_is_served_for_the_keys_put_with_it() -> None:
    """Putting a key with a changed client (same id) changes that key, and find_client."""
    store = KeyStore[Client]()
    store.put(KEY_A, ALICE)
    store.put(KEY_B, ALICE)
    promoted = Client("cl_alice", "Alice", ("admin", "reader"))
    store.put(KEY_A, promoted)
    assert store.get(KEY_A) is promoted
    assert store.get(KEY_B) is ALICE  # until the registry sends that key too
    assert store.find_client("cl_alice") == promoted


def test_put_replaces_what_a_key_maps_to() -> None:
    """A key put again maps to its latest client and valid_until only."""
    store = KeyStore[Client]()
    store.put(KEY_A, ALICE, 1_900_000_000.0)
    store.put(KEY_A, BOB)
    assert store.get(KEY_A) is BOB
    assert len(store) == 1
    assert store.find_client("cl_alice") is None


def test_a_deleted_key_is_not_found() -> None:
    """delete removes the key and only that key; deleting an absent key is a no-op."""
    store = KeyStore[Client]()
    store.put(KEY_A, ALICE)
    store.put(KEY_B, ALICE)
    store.delete(KEY_A)
    store.delete(KEY_C)
    assert store.get(KEY_A) is None
    assert store.get(KEY_B) is ALICE
    assert len(store) == 1


def test_a_client_is_found_by_id_while_it_has_keys() -> None:
    """find_client answers a client until its last key (with or without valid_until) goes."""
    store = KeyStore[Client]()
    store.put(KEY_A, ALICE)
    store.put(KEY_B, ALICE, 1_900_000_000.0)
    store.delete(KEY_A)
    assert store.find_client("cl_alice") == ALICE
    store.delete(KEY_B)
    assert store.find_client("cl_alice") is None
    assert store.find_client("cl_nobody") is None


@given(st.binary(min_size=32, max_size=32), st.integers(0, 255))
def test_a_digest_that_differs_in_any_bit_is_not_found(put: bytes, bit: int) -> None:
    """Every bit of the digest counts: flipping any one of them misses."""
    store = KeyStore[Client]()
    store.put(put, ALICE)
    flipped = bytearray(put)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert store.get(bytes(flipped)) is None


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_a_digest_that_is_not_32_bytes_is_refused(length: int) -> None:
    """Only SHA-256 digests are stored or deleted (a hex digest by mistake is an error)."""
    store = KeyStore[Client]()
    with pytest.raises(ValueError, match="32 bytes"):
        store.put(b"k" * length, ALICE)
    with pytest.raises(ValueError, match="32 bytes"):
        store.delete(b"k" * length)
    assert len(store) == 0


def test_a_hex_digest_is_refused_and_never_found() -> None:
    """The former key form, a hex string, is an error to store and a miss to look up."""
    store = KeyStore[Client]()
    store.put(KEY_A, ALICE)
    with pytest.raises(ValueError, match="32 bytes"):
        store.put(KEY_B.hex()[:32], ALICE)  # type: ignore[arg-type]
    assert store.get(KEY_A.hex()) is None  # type: ignore[arg-type]


def test_a_store_built_in_bulk_equals_one_made_by_puts() -> None:
    """build gives what the same puts in order give, a repeated digest keeping its last entry."""
    entries = [
        (digest(f"key-{n}"), Client(f"cl_{n % 7}", f"Client {n % 7}"), None if n % 3 else 1e9 + n)
        for n in range(100)
    ]
    entries.append((entries[0][0], BOB, None))
    built = KeyStore[Client].build(iter(entries))
    made = KeyStore[Client]()
    for key, client, valid_until in entries:
        made.put(key, client, valid_until)
    assert len(built) == len(made) == 100
    assert all(built.get(key) == made.get(key) for key, _, _ in entries)
    assert all(built.find_client(f"cl_{n}") == made.find_client(f"cl_{n}") for n in range(8))
    assert built.get(entries[0][0]) is BOB


def test_readers_see_whole_records_while_a_writer_changes_keys() -> None:
    """Lookups from other threads during puts and deletes (and the table's resizes) see a
    key's value from before or after a write, never a mix, and keys not written stay found."""
    store = KeyStore[Client]()
    steady = [digest(f"steady-{n}") for n in range(1_000)]
    for key in steady:
        store.put(key, ALICE)
    allowed = {None, ALICE, Expiring(BOB, 1_900_000_000.0)}
    readers = 3
    start = threading.Barrier(readers + 1)
    written = threading.Event()
    seen_wrong: list[object] = []
    lookups = [0] * readers

    def read(reader: int) -> None:
        start.wait()
        while not written.is_set() or lookups[reader] == 0:
            for key in steady:
                if store.get(key) is not ALICE:
                    seen_wrong.append(store.get(key))
            record = store.get(KEY_A)
            if record not in allowed:
                seen_wrong.append(record)
            lookups[reader] += 1

    threads = [threading.Thread(target=read, args=(n,)) for n in range(readers)]
    for thread in threads:
        thread.start()
    start.wait()
    for round_ in range(20):
        for n in range(2_000):  # grows the table, then shrinks it back by deletes
            store.put(digest(f"churn-{round_}-{n}"), BOB)
        store.put(KEY_A, ALICE)
        store.put(KEY_A, BOB, 1_900_000_000.0)
        store.delete(KEY_A)
        for n in range(2_000):
            store.delete(digest(f"churn-{round_}-{n}"))
    written.set()
    for thread in threads:
        thread.join()
    assert seen_wrong == []
    assert len(store) == len(steady)
    assert store.find_client("cl_bob") is None


def test_an_interner_hands_back_one_object_for_equal_values() -> None:
    """Equal values come back as the first one seen; past the limit, as they are."""
    roles = Interner[tuple[str, ...]](limit=1)
    first = tuple(["admin", "reader"])
    assert roles(first) is first
    assert roles(tuple(["admin", "reader"])) is first
    other = tuple(["billing"])
    assert roles(other) is other
    assert roles(tuple(["billing"])) is not other


Op = tuple[str, int, int, float | None]
OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "delete"]),
        st.integers(0, 7),  # which digest
        st.integers(0, 5),  # which client: ids repeat with other roles
        st.sampled_from([None, None, 1_900_000_000.0]),
    ),
    max_size=60,
)
CLIENTS = [Client(f"cl_{n % 3}", f"Client {n % 3}", ("reader",) * (n // 3)) for n in range(6)]
DIGESTS = [digest(f"model-{n}") for n in range(8)]


def expected(client: Client, valid_until: float | None) -> Client | Expiring[Client]:
    return client if valid_until is None else Expiring(client, valid_until)


def client_of(value: Client | Expiring[Client]) -> Client:
    return value.client if isinstance(value, Expiring) else value


@given(OPS)
def test_the_store_behaves_like_a_dict(ops: list[Op]) -> None:
    """After any puts and deletes, lookups, the size and find_client agree with a plain dict."""
    store = KeyStore[Client]()
    model: dict[bytes, Client | Expiring[Client]] = {}
    last_put: dict[str, Client] = {}
    for op, key_index, client_index, valid_until in ops:
        key = DIGESTS[key_index]
        if op == "put":
            client = replace(CLIENTS[client_index])  # an equal copy, as a parser makes
            store.put(key, client, valid_until)
            model[key] = expected(client, valid_until)
            last_put[client.client_id] = client
        else:
            store.delete(key)
            model.pop(key, None)
        assert [store.get(key) for key in DIGESTS] == [model.get(key) for key in DIGESTS]
        assert len(store) == len(model)
        live = {client_of(value).client_id for value in model.values()}
        for client_id in ("cl_0", "cl_1", "cl_2"):
            found = last_put[client_id] if client_id in live else None
            assert store.find_client(client_id) == found


# --- successors: the store a reload builds while the one in use goes on answering ------------

Entry = tuple[int, int, float | None]  # which digest, which client, valid_until
ENTRIES = st.lists(
    st.tuples(st.integers(0, 7), st.integers(0, 5), st.sampled_from([None, None, 1.9e9])),
    max_size=30,
)


def entries_of(drawn: list[Entry]) -> list[tuple[bytes, Client, float | None]]:
    return [(DIGESTS[d], replace(CLIENTS[c]), valid_until) for d, c, valid_until in drawn]


def snapshot_of(store: KeyStore[Client]) -> dict[bytes, object]:
    return {key: store.get(key) for key in DIGESTS if store.get(key) is not None}


@given(ENTRIES, ENTRIES)
def test_a_successor_holds_exactly_its_entries_whatever_it_replaces(
    before: list[Entry], after: list[Entry]
) -> None:
    """A successor equals a store built from its entries alone (lookups, size, find_client),
    and the store it replaces is left as it was."""
    current = KeyStore[Client].build(entries_of(before))
    held = snapshot_of(current)
    successor = current.successor()
    for key, client, valid_until in entries_of(after):
        successor.put(key, client, valid_until)
    reloaded, built = successor.finish(), KeyStore[Client].build(entries_of(after))
    assert snapshot_of(reloaded) == snapshot_of(built)
    assert len(reloaded) == len(built)
    for client_id in ("cl_0", "cl_1", "cl_2"):
        assert reloaded.find_client(client_id) == built.find_client(client_id)
    assert snapshot_of(current) == held
    assert len(current) == len(held)


def test_a_successor_reuses_the_clients_and_digests_it_shares_with_the_store_it_replaces() -> None:
    """Keys and clients both hold cost their memory once: the successor keeps the old digest
    objects and the very client objects it is given."""
    current = KeyStore[Client].build((digest(f"k{n}"), ALICE, None) for n in range(100))
    successor = current.successor()
    for n in range(100):
        successor.put(digest(f"k{n}"), ALICE)  # fresh, equal digest objects
    reloaded = successor.finish()
    old_digests = {id(key) for key in current._keys}
    assert {id(key) for key in reloaded._keys} == old_digests
    assert all(reloaded.get(digest(f"k{n}")) is ALICE for n in range(100))


def test_a_successor_that_dropped_most_keys_is_compacted() -> None:
    """A reload that replaced most keys does not keep the table sized for old and new."""
    current = KeyStore[Client].build((digest(f"old-{n}"), ALICE, None) for n in range(5_000))
    successor = current.successor()
    for n in range(1_000):
        successor.put(digest(f"new-{n}"), BOB)
    reloaded = successor.finish()
    fresh = KeyStore[Client].build((digest(f"new-{n}"), BOB, None) for n in range(1_000))
    assert len(reloaded) == 1_000
    assert sys.getsizeof(reloaded._keys) <= sys.getsizeof(fresh._keys)
    assert reloaded.get(digest("new-7")) is BOB
    assert reloaded.get(digest("old-7")) is None


def test_readers_of_the_store_in_use_are_undisturbed_while_a_successor_is_built() -> None:
    """The store in use answers every key as before, while its successor takes other keys."""
    current = KeyStore[Client].build((digest(f"k{n}"), ALICE, None) for n in range(1_000))
    successor = current.successor()
    for n in range(500, 1_500):
        successor.put(digest(f"k{n}"), BOB, 1.9e9)
    assert all(current.get(digest(f"k{n}")) is ALICE for n in range(1_000))
    assert current.get(digest("k1200")) is None
    reloaded = successor.finish()
    assert reloaded.get(digest("k100")) is None
    assert reloaded.get(digest("k1200")) == Expiring(BOB, 1.9e9)
    assert current.find_client("cl_bob") is None
