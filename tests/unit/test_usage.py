"""The usage ledger counts per key and per minute, seals only minutes that have ended, and
delivers each batch once: retries reuse the batch's id, malformed batches are dropped, the
buffer is bounded, and shutdown sends what is left. Time is an injected clock; the registry
is a fake sink, or the stand-in of the usage contract over real HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from authz_service import usage
from authz_service.envoy_codec import UpstreamRecord
from authz_service.model import Client, Decision
from authz_service.reasons import Reason
from authz_service.usage import (
    MAX_BATCH_BYTES,
    MAX_BATCH_ENTRIES,
    Batch,
    BatchRejectedError,
    Flusher,
    RegistryUsage,
    UsageLedger,
    UsageUnavailableError,
)
from tests.usage_registry import UsageRegistry

CLIENT = Client("billing-api", "Billing API")
KEY_ID = "0123456789ab"
OTHER_KEY = "ba9876543210"
MINUTE = 29_935_372  # 2026-12-01T10:52:00Z, in minutes since the epoch


class Clock:
    def __init__(self) -> None:
        self.now = MINUTE * 60 + 5.0

    def __call__(self) -> float:
        return self.now


class FakeSink:
    """The registry, as the flusher sees it: takes batches, or fails as told."""

    def __init__(self) -> None:
        self.sent: list[Batch] = []
        self.failure: Exception | None = None
        self.closed = False

    async def send(self, batch: Batch) -> bool:
        self.sent.append(batch)
        if self.failure is not None:
            raise self.failure
        return False

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(clock: Clock) -> UsageLedger:
    return UsageLedger(max_entries=1000, source="replica-1", clock=clock)


def allow(key_id: str = KEY_ID) -> Decision:
    return Decision.allow(CLIENT, key_id=key_id)


def upstream(status: int, response_bytes: int = 0, key_id: str | None = KEY_ID) -> UpstreamRecord:
    return UpstreamRecord(CLIENT.client_id, status, 7, response_bytes, key_id)


def entries(batches: list[Batch]) -> list[dict[str, Any]]:
    return [entry for batch in batches for entry in json.loads(batch.body)["usage"]]


async def flushed(ledger: UsageLedger, clock: Clock, everything: bool = False) -> list[Batch]:
    """What one flush sends, after the current minute has ended."""
    sink = FakeSink()
    if not everything:
        clock.now += 60
    await Flusher(ledger, sink, interval=10).flush(everything)
    return sink.sent


class TestRecording:
    async def test_checks_are_counted_per_key_and_minute(
        self, ledger: UsageLedger, clock: Clock
    ) -> None:
        """Allowed, and denied by reason, for each key; one entry per key and minute."""
        for _ in range(3):
            ledger.check(allow())
        ledger.check(Decision.deny(Reason.FORBIDDEN, CLIENT, "admin", KEY_ID))
        ledger.check(Decision.deny(Reason.RATE_LIMITED, CLIENT, key_id=KEY_ID))
        ledger.check(allow(OTHER_KEY))
        sent = entries(await flushed(ledger, clock))
        assert sorted(sent, key=lambda e: e["key_id"]) == [
            {
                "key_id": KEY_ID,
                "client_id": "billing-api",
                "minute": "2026-12-01T10:52:00Z",
                "allowed": 3,
                "denied": {"forbidden": 1, "rate_limited": 1},
                "upstream": {},
                "request_bytes": 0,
                "response_bytes": 0,
            },
            {
                "key_id": OTHER_KEY,
                "client_id": "billing-api",
                "minute": "2026-12-01T10:52:00Z",
                "allowed": 1,
                "denied": {},
                "upstream": {},
                "request_bytes": 0,
                "response_bytes": 0,
            },
        ]

    async def test_denials_before_the_client_is_known_are_not_per_key(
        self, ledger: UsageLedger, clock: Clock
    ) -> None:
        """An unknown or revoked key, or no key: nobody to bill."""
        ledger.check(Decision.deny(Reason.MISSING_CREDENTIAL))
        ledger.check(Decision.deny(Reason.UNKNOWN_KEY, key_id=KEY_ID))
        ledger.check(Decision.deny(Reason.KEY_REVOKED, key_id=KEY_ID))
        ledger.check(Decision.allow(None, Reason.NON_HTTP_REQUEST))
        assert await flushed(ledger, clock) == []

    async def test_upstream_responses_are_counted_by_class_with_their_bytes(
        self, ledger: UsageLedger, clock: Clock
    ) -> None:
        for _ in range(4):
            ledger.upstream(upstream(200, 100))
        for _ in range(3):
            ledger.upstream(upstream(503, 50))
        ledger.upstream(upstream(0))  # no response at all (the upstream reset)
        (entry,) = entries(await flushed(ledger, clock))
        assert entry["upstream"] == {"2xx": 4, "5xx": 3, "unknown": 1}
        assert (entry["request_bytes"], entry["response_bytes"]) == (8 * 7, 4 * 100 + 3 * 50)
        assert entry["allowed"] == 0

    @pytest.mark.parametrize(
        "record",
        [
            pytest.param(UpstreamRecord("billing-api", 200, 1, 1, None), id="no key id"),
            pytest.param(UpstreamRecord(None, 200, 1, 1, KEY_ID), id="no client"),
            pytest.param(UpstreamRecord("billing-api", 200, 1, 1, "azk_raw_key"), id="not an id"),
            pytest.param(UpstreamRecord("bad client", 200, 1, 1, KEY_ID), id="bad client id"),
        ],
    )
    async def test_access_log_entries_our_check_did_not_name_are_not_per_key(
        self, ledger: UsageLedger, clock: Clock, record: UpstreamRecord
    ) -> None:
        """Whatever reaches the access-log port, a batch stays within the contract."""
        ledger.upstream(record)
        assert await flushed(ledger, clock) == []

    async def test_recording_from_many_threads_is_exact(self, ledger: UsageLedger) -> None:
        barrier = threading.Barrier(8)

        def record() -> None:
            barrier.wait()
            for _ in range(5000):
                ledger.check(allow())

        threads = [threading.Thread(target=record) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        await ledger.seal(everything=True)
        batch = ledger.next_batch()
        assert batch is not None
        assert json.loads(batch.body)["usage"][0]["allowed"] == 40_000


class TestSealing:
    async def test_only_minutes_that_have_ended_are_sent(
        self, ledger: UsageLedger, clock: Clock
    ) -> None:
        """The current minute stays open; once it ends it is sent, and only once."""
        sink = FakeSink()
        flusher = Flusher(ledger, sink, interval=10)
        ledger.check(allow())
        await flusher.flush()
        assert sink.sent == []
        clock.now += 60
        ledger.check(allow())  # the next minute
        await flusher.flush()
        assert [e["minute"] for e in entries(sink.sent)] == ["2026-12-01T10:52:00Z"]
        await flusher.flush()
        assert len(sink.sent) == 1
        assert ledger.buffered == 1

    async def test_a_batch_is_the_contract_document(self, ledger: UsageLedger) -> None:
        ledger.check(allow())
        await ledger.seal(everything=True)
        batch = ledger.next_batch()
        assert batch is not None
        document = json.loads(batch.body)
        assert set(document) == {"batch_id", "source", "usage"}
        assert document["batch_id"] == batch.batch_id
        assert document["source"] == "replica-1"
        assert (batch.entries, batch.records) == (1, 1)

    async def test_batches_stay_within_ten_thousand_entries(
        self, clock: Clock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """(An entry takes at least 140 bytes, so in practice 1 MiB is reached first.)"""
        monkeypatch.setattr(usage, "MAX_BATCH_BYTES", 1 << 30)
        ledger = UsageLedger(max_entries=30_000, clock=clock)
        for index in range(MAX_BATCH_ENTRIES + 5):
            ledger.check(allow(f"{index:012x}"))
        await ledger.seal(everything=True)
        sizes = []
        while (batch := ledger.next_batch()) is not None:
            sizes.append(batch.entries)
            ledger.acknowledged(batch)
        assert sizes == [MAX_BATCH_ENTRIES, 5]

    async def test_the_event_loop_works_between_slices_of_a_big_minute(self, clock: Clock) -> None:
        """Sealing 5,500 entries gives the loop's other work a turn after each 1,000; the
        batches are whole and in order all the same."""
        ledger = UsageLedger(max_entries=30_000, clock=clock)
        for index in range(5500):
            ledger.check(allow(f"{index:012x}"))
        turns = 0
        sealing = asyncio.create_task(ledger.seal(everything=True))
        while not sealing.done():
            turns += 1
            await asyncio.sleep(0)
        assert turns >= 5
        batch = ledger.next_batch()
        assert batch is not None
        keys = [entry["key_id"] for entry in json.loads(batch.body)["usage"]]
        assert keys == [f"{index:012x}" for index in range(5500)]

    async def test_a_seal_cancelled_midway_loses_nothing(self, clock: Clock) -> None:
        """Cancelled between slices (the flush task, at shutdown), it seals the rest at once."""
        ledger = UsageLedger(max_entries=30_000, clock=clock)
        for index in range(3500):
            ledger.check(allow(f"{index:012x}"))
        sealing = asyncio.create_task(ledger.seal(everything=True))
        await asyncio.sleep(0)  # the first slice
        await asyncio.sleep(0)
        sealing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sealing
        batch = ledger.next_batch()
        assert batch is not None
        assert (batch.entries, batch.records) == (3500, 3500)
        assert ledger.buffered == 3500

    async def test_batches_stay_within_one_mebibyte(self, clock: Clock) -> None:
        """Long client ids and many reasons make big entries: a batch is cut before 1 MiB."""
        ledger = UsageLedger(max_entries=30_000, clock=clock)
        client = Client("c" * 128, "Long")
        for index in range(6000):
            for reason in (Reason.FORBIDDEN, Reason.RATE_LIMITED):
                ledger.check(Decision.deny(reason, client, key_id=f"{index:012x}"))
        await ledger.seal(everything=True)
        bodies = []
        while (batch := ledger.next_batch()) is not None:
            bodies.append(batch.body)
            ledger.acknowledged(batch)
        assert len(bodies) > 1
        assert all(len(body) <= MAX_BATCH_BYTES + 1024 for body in bodies)
        assert sum(len(json.loads(body)["usage"]) for body in bodies) == 6000


class TestDelivery:
    async def test_a_failed_batch_is_retried_with_the_same_id_and_body(
        self, ledger: UsageLedger, clock: Clock
    ) -> None:
        """The registry counts a batch once however often it arrives."""
        sink = FakeSink()
        flusher = Flusher(ledger, sink, interval=10)
        ledger.check(allow())
        clock.now += 60
        sink.failure = UsageUnavailableError("HTTP 503")
        assert await flusher.flush() is False
        ledger.check(allow())  # meanwhile, the minute after
        clock.now += 60
        sink.failure = None
        assert await flusher.flush() is True
        first, retried, second = sink.sent
        assert retried == first
        assert second.batch_id != first.batch_id
        assert ledger.flushed_entries == 2
        assert ledger.failures == {"unavailable": 1, "rejected": 0}
        assert ledger.buffered == 0

    async def test_the_wait_grows_while_the_registry_is_down_and_is_bounded(
        self, ledger: UsageLedger, clock: Clock
    ) -> None:
        """The interval; then 2x, 4x at most (jittered by +-20%); the interval again after."""
        sink = FakeSink()
        jitter = iter([0.5, 0.5, 0.5, 0.0])
        flusher = Flusher(ledger, sink, interval=10, rand=lambda: next(jitter))
        ledger.check(allow())
        clock.now += 60
        sink.failure = UsageUnavailableError("HTTP 503")
        waits = [flusher.delay()]
        for _ in range(4):
            await flusher.flush()
            waits.append(flusher.delay())
        assert waits == [10, 20, 40, 40, pytest.approx(32)]
        sink.failure = None
        await flusher.flush()
        assert flusher.delay() == 10

    async def test_a_batch_the_registry_refuses_is_dropped_counted_and_logged(
        self, ledger: UsageLedger, clock: Clock, caplog: pytest.LogCaptureFixture
    ) -> None:
        sink = FakeSink()
        ledger.check(allow())
        ledger.check(allow())
        clock.now += 60
        sink.failure = BatchRejectedError("the registry refused the batch: HTTP 400")
        with caplog.at_level(logging.ERROR):
            assert await Flusher(ledger, sink, interval=10).flush() is True
        assert ledger.dropped["rejected"] == 2
        assert ledger.failures["rejected"] == 1
        assert ledger.buffered == 0
        assert any(
            getattr(r, "fields", {}).get("event") == "usage_batch_rejected" for r in caplog.records
        )

    async def test_a_full_buffer_drops_new_records_and_says_how_many(
        self, clock: Clock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Entries already held are kept (they may be mid-delivery); new key-minutes are
        not counted, and the drop is counted and logged once per flush."""
        ledger = UsageLedger(max_entries=2, clock=clock)
        ledger.check(allow("000000000001"))
        ledger.check(allow("000000000002"))
        for _ in range(3):
            ledger.check(allow("000000000003"))
        ledger.check(allow("000000000001"))  # an entry that exists still counts
        assert ledger.dropped["buffer_full"] == 3
        with caplog.at_level(logging.ERROR):
            await Flusher(ledger, FakeSink(), interval=10).flush()
        (record,) = [
            r for r in caplog.records if getattr(r, "fields", {}).get("event") == "usage_dropped"
        ]
        assert record.fields["records"] == 3  # type: ignore[attr-defined]

    async def test_shutdown_sends_every_minute_the_current_one_too(
        self, ledger: UsageLedger, clock: Clock
    ) -> None:
        sink = FakeSink()
        ledger.check(allow())
        await Flusher(ledger, sink, interval=10).finish()
        assert [e["allowed"] for e in entries(sink.sent)] == [1]
        assert sink.closed

    async def test_what_shutdown_cannot_deliver_is_lost_counted_and_logged(
        self, ledger: UsageLedger, caplog: pytest.LogCaptureFixture
    ) -> None:
        sink = FakeSink()
        sink.failure = UsageUnavailableError("connection refused")
        for _ in range(3):
            ledger.check(allow())
        with caplog.at_level(logging.ERROR):
            await Flusher(ledger, sink, interval=10).finish(within=0.3)
        assert ledger.dropped["shutdown"] == 3
        assert ledger.buffered == 0
        assert len(sink.sent) > 1  # retried until the time was up
        assert {b.batch_id for b in sink.sent} == {sink.sent[0].batch_id}
        assert any(getattr(r, "fields", {}).get("event") == "usage_lost" for r in caplog.records)


@pytest.fixture
def stand_in() -> Iterator[UsageRegistry]:
    registry = UsageRegistry()
    registry.start()
    yield registry
    registry.stop()


class TestOverHttp:
    async def test_the_registry_takes_a_batch_once(
        self, ledger: UsageLedger, stand_in: UsageRegistry
    ) -> None:
        """A replayed batch is a duplicate: the registry's totals count it once."""
        ledger.check(allow())
        ledger.upstream(upstream(200, 100))
        await ledger.seal(everything=True)
        batch = ledger.next_batch()
        assert batch is not None
        sink = RegistryUsage(stand_in.url, stand_in.token)
        try:
            assert await sink.send(batch) is False
            assert await sink.send(batch) is True
        finally:
            await sink.close()
        totals = stand_in.key("billing-api", KEY_ID)
        assert (totals.allowed, totals.upstream["2xx"], totals.response_bytes) == (1, 1, 100)

    async def test_a_lost_answer_is_retried_and_counted_once(
        self, ledger: UsageLedger, clock: Clock, stand_in: UsageRegistry
    ) -> None:
        """The registry counted the batch but its answer never arrived: the retry, under the
        same id, is a duplicate."""
        stand_in.lose_answers = 1
        flusher = Flusher(ledger, RegistryUsage(stand_in.url, stand_in.token), interval=10)
        for _ in range(5):
            ledger.check(allow())
        clock.now += 60
        assert await flusher.flush() is False
        assert await flusher.flush() is True
        await flusher.finish()
        assert stand_in.batch_ids[0] == stand_in.batch_ids[1]
        assert stand_in.key("billing-api", KEY_ID).allowed == 5

    @pytest.mark.parametrize(
        ("status", "error"),
        [
            (400, BatchRejectedError),
            (413, BatchRejectedError),
            (500, UsageUnavailableError),
            (503, UsageUnavailableError),
            (401, UsageUnavailableError),
            (404, UsageUnavailableError),
            (429, UsageUnavailableError),
        ],
    )
    async def test_only_a_malformed_batch_is_refused_for_good(
        self, ledger: UsageLedger, stand_in: UsageRegistry, status: int, error: type[Exception]
    ) -> None:
        """400, 413, 415, 422 are the batch's fault; anything else may mend, and is retried."""
        stand_in.fail_with = status
        ledger.check(allow())
        await ledger.seal(everything=True)
        batch = ledger.next_batch()
        assert batch is not None
        sink = RegistryUsage(stand_in.url, stand_in.token)
        try:
            with pytest.raises(error):
                await sink.send(batch)
        finally:
            await sink.close()

    async def test_every_batch_the_ledger_makes_is_within_the_contract(
        self, clock: Clock, stand_in: UsageRegistry
    ) -> None:
        """Every reason, every status class, long ids: the stand-in's validation accepts all."""
        ledger = UsageLedger(max_entries=100_000, clock=clock)
        client = Client("c:" + "x" * 126, "Long")
        for index in range(7_000):
            key_id = f"{index:012x}"
            ledger.check(Decision.allow(client, key_id=key_id))
            for reason in (Reason.FORBIDDEN, Reason.RATE_LIMITED, Reason.INVALID_ROUTE_POLICY):
                ledger.check(Decision.deny(reason, client, key_id=key_id))
            for status in (101, 204, 302, 404, 503, 0):
                ledger.upstream(UpstreamRecord(client.client_id, status, 10**9, 10**9, key_id))
        flusher = Flusher(ledger, RegistryUsage(stand_in.url, stand_in.token), interval=10)
        await flusher.finish(within=30)
        assert stand_in.refusals == []
        assert sum(stand_in.accepted.values()) == 7_000
        assert len(stand_in.accepted) >= 2
