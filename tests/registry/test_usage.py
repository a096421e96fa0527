"""The usage ledger's side of the registry, over real HTTP, against SQLite and PostgreSQL alike:
batches counted once (replayed, and raced by two registries on one database), strict
validation, size limits, the usage report at each granularity, and each key's last_used_at."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from authz_service.contract import parse_time
from client_registry import api, usage
from tests.e2e.harness import registry_process
from tests.registry.conftest import ADMIN, SERVICE, Registry, started
from tests.registry.postgres import create_database, seq_scans
from tests.registry.test_feed_and_snapshot import settings_for

pytestmark = pytest.mark.e2e
_ids = itertools.count()
KEY_A, KEY_B = "0123456789ab", "ba9876543210"


def entry(
    minute: str,
    *,
    key_id: str = KEY_A,
    client_id: str = "cl_billed",
    allowed: int = 1,
    denied: dict[str, int] | None = None,
    upstream: dict[str, int] | None = None,
    request_bytes: int = 0,
    response_bytes: int = 0,
) -> dict[str, Any]:
    return {
        "key_id": key_id,
        "client_id": client_id,
        "minute": minute,
        "allowed": allowed,
        "denied": denied or {},
        "upstream": upstream or {},
        "request_bytes": request_bytes,
        "response_bytes": response_bytes,
    }


def batch(*entries: dict[str, Any], batch_id: str | None = None) -> dict[str, Any]:
    return {
        "batch_id": batch_id or f"batch-{next(_ids)}",
        "source": "authz-0",
        "usage": list(entries),
    }


async def send(registry: Registry, document: Any) -> tuple[int, Any]:
    return await registry.call("POST", "/v1/usage", token=SERVICE, json=document)


async def report(registry: Registry, client_id: str, query: str = "") -> dict[str, Any]:
    status, body = await registry.call("GET", f"/clients/{client_id}/usage?{query}")
    assert status == 200, body
    return dict(body)


DAY = "from=2025-01-01T00:00:00Z&to=2025-01-02T00:00:00Z"


def figures(
    allowed: int = 0,
    denied: dict[str, int] | None = None,
    upstream: dict[str, int] | None = None,
    request_bytes: int = 0,
    response_bytes: int = 0,
) -> dict[str, Any]:
    """Figures as the report shows them: every status class, the reasons that occurred."""
    classes = {name: 0 for name in usage.UPSTREAM_CLASSES}
    return {
        "allowed": allowed,
        "denied": denied or {},
        "upstream": {**classes, **(upstream or {})},
        "request_bytes": request_bytes,
        "response_bytes": response_bytes,
    }


class TestCountedOnce:
    async def test_a_replayed_batch_is_acknowledged_and_counts_nothing(
        self, registry: Registry
    ) -> None:
        """200 accepted N; the same batch id again: 200 duplicate, and the totals stay."""
        sent = batch(entry("2025-01-01T10:00:00Z", allowed=3), entry("2025-01-01T10:01:00Z"))
        assert await send(registry, sent) == (200, {"accepted": 2, "duplicate": False})
        for _ in range(2):
            assert await send(registry, sent) == (200, {"accepted": 0, "duplicate": True})
        assert (await report(registry, "cl_billed", DAY))["totals"]["allowed"] == 4

    async def test_a_batch_id_is_the_batch_whatever_it_holds_the_second_time(
        self, registry: Registry
    ) -> None:
        """A batch id counted once is a duplicate even with other figures: retries never
        count twice."""
        await send(registry, batch(entry("2025-01-01T10:00:00Z"), batch_id="same"))
        again = batch(entry("2025-01-01T10:00:00Z", allowed=50), batch_id="same")
        assert (await send(registry, again))[1]["duplicate"] is True
        assert (await report(registry, "cl_billed", DAY))["totals"]["allowed"] == 1

    async def test_two_registries_on_one_database_racing_with_the_same_batches_count_each_once(
        self, registry: Registry
    ) -> None:
        """Each of 20 batches sent to two registries of one database at the same moment: one
        of each pair counts it, the other answers duplicate."""
        async with started(registry.settings) as other:
            batches = [
                batch(entry("2025-01-01T10:00:00Z", allowed=n + 1, response_bytes=10))
                for n in range(20)
            ]
            answers = await asyncio.gather(
                *(send(r, b) for b in batches for r in (registry, other))
            )
        assert {status for status, _ in answers} == {200}
        for first, second in zip(answers[::2], answers[1::2], strict=True):
            assert sorted([first[1]["duplicate"], second[1]["duplicate"]]) == [False, True]
        totals = (await report(registry, "cl_billed", DAY))["totals"]
        assert totals["allowed"] == sum(range(1, 21))
        assert totals["response_bytes"] == 20 * 10


def test_two_registry_processes_on_one_postgresql_racing_count_a_batch_once(
    tmp_path: Path, postgres: str
) -> None:
    """`client-registry serve` twice on one PostgreSQL database; every batch is sent to both
    at once, many times over: each is counted exactly once."""
    env = {
        "REGISTRY_DATABASE_URL": create_database(postgres, "usage_race"),
        "REGISTRY_ADMIN_TOKEN": ADMIN,
        "REGISTRY_SERVICE_TOKEN": SERVICE,
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        registry_process(tmp_path / "a", env=env) as first,
        registry_process(tmp_path / "b", env=env) as second,
    ):

        async def scenario() -> tuple[list[bool], dict[str, Any]]:
            headers = {"Authorization": f"Bearer {SERVICE}"}
            async with aiohttp.ClientSession(headers=headers) as session:

                async def post(url: str, document: dict[str, Any]) -> bool:
                    async with session.post(url + "/v1/usage", json=document) as reply:
                        assert reply.status == 200
                        return bool((await reply.json())["duplicate"])

                batches = [batch(entry("2025-01-01T10:00:00Z", allowed=1)) for _ in range(30)]
                duplicates = await asyncio.gather(
                    *(post(url, b) for b in batches for url in [first.url, second.url] * 2)
                )
                async with session.get(
                    f"{first.url}/clients/cl_billed/usage?{DAY}",
                    headers={"Authorization": f"Bearer {ADMIN}"},
                ) as reply:
                    return duplicates, await reply.json()

        duplicates, body = asyncio.run(scenario())
    assert duplicates.count(False) == 30
    assert body["totals"]["allowed"] == 30


class TestFigures:
    async def test_figures_are_summed_per_key_client_and_minute(self, registry: Registry) -> None:
        """Entries naming the same key, client and minute, in one batch or several (several
        replicas), add up; denial reasons and status classes each on their own."""
        minute = "2025-01-01T10:00:00Z"
        await send(
            registry,
            batch(
                entry(minute, allowed=2, denied={"forbidden": 1}, upstream={"2xx": 2}),
                entry(minute, allowed=1, upstream={"5xx": 1}, request_bytes=5),
            ),
        )
        await send(
            registry,
            batch(
                entry(
                    minute,
                    allowed=0,
                    denied={"forbidden": 2, "rate_limited": 4},
                    response_bytes=7,
                )
            ),
        )
        body = await report(registry, "cl_billed", DAY + "&granularity=minute")
        expected = figures(
            allowed=3,
            denied={"forbidden": 3, "rate_limited": 4},
            upstream={"2xx": 2, "5xx": 1},
            request_bytes=5,
            response_bytes=7,
        )
        assert body["totals"] == expected
        assert body["series"] == [{"start": minute, **expected}]

    async def test_usage_of_a_client_the_registry_does_not_know_is_kept_and_reported(
        self, registry: Registry
    ) -> None:
        """A deleted client's last minutes stay billable: stored under the ids the batch names,
        and reported; a client with neither a record nor usage is 404."""
        created = await registry.create()
        client_id = created["client_id"]
        assert (await registry.call("DELETE", f"/clients/{client_id}"))[0] == 204
        last = entry("2025-01-01T10:00:00Z", key_id=created["key_id"], client_id=client_id)
        assert (await send(registry, batch(last)))[1]["accepted"] == 1
        body = await report(registry, client_id, DAY)
        assert body["totals"]["allowed"] == 1
        assert [k["key_id"] for k in body["keys"]] == [created["key_id"]]
        status, error = await registry.call("GET", "/clients/cl_never/usage")
        assert (status, error["error"]) == (404, "not_found")

    async def test_a_known_client_without_usage_has_an_empty_report(
        self, registry: Registry
    ) -> None:
        """Zero totals, no series, no keys."""
        created = await registry.create()
        body = await report(registry, created["client_id"], DAY)
        assert (body["totals"], body["series"], body["keys"]) == (figures(), [], [])


class TestReport:
    @pytest.fixture
    async def recorded(self, registry: Registry) -> Registry:
        """Key A: two minutes in the 10:00 hour, one at 11:00, one the next day; key B: one
        minute at 10:00; another client: one minute at 10:00."""
        await send(
            registry,
            batch(
                entry("2025-01-01T10:05:00Z", allowed=1, upstream={"2xx": 1}, response_bytes=10),
                entry("2025-01-01T10:59:00Z", allowed=2, upstream={"5xx": 2}),
                entry("2025-01-01T11:00:00Z", allowed=4, denied={"forbidden": 1}),
                entry("2025-01-02T00:30:00Z", allowed=8, request_bytes=3),
                entry("2025-01-01T10:05:00Z", key_id=KEY_B, allowed=16),
                entry("2025-01-01T10:05:00Z", client_id="cl_other", allowed=100),
            ),
        )
        return registry

    RANGE = "from=2025-01-01T10:00:00Z&to=2025-01-02T01:00:00Z"

    @pytest.mark.parametrize(
        ("granularity", "rounded", "client_series", "key_a_series"),
        [
            (
                "minute",
                ("2025-01-01T10:00:00Z", "2025-01-02T01:00:00Z"),
                [
                    ("2025-01-01T10:05:00Z", 17),
                    ("2025-01-01T10:59:00Z", 2),
                    ("2025-01-01T11:00:00Z", 4),
                    ("2025-01-02T00:30:00Z", 8),
                ],
                [
                    ("2025-01-01T10:05:00Z", 1),
                    ("2025-01-01T10:59:00Z", 2),
                    ("2025-01-01T11:00:00Z", 4),
                    ("2025-01-02T00:30:00Z", 8),
                ],
            ),
            (
                "hour",
                ("2025-01-01T10:00:00Z", "2025-01-02T01:00:00Z"),
                [
                    ("2025-01-01T10:00:00Z", 19),
                    ("2025-01-01T11:00:00Z", 4),
                    ("2025-01-02T00:00:00Z", 8),
                ],
                [
                    ("2025-01-01T10:00:00Z", 3),
                    ("2025-01-01T11:00:00Z", 4),
                    ("2025-01-02T00:00:00Z", 8),
                ],
            ),
            (
                "day",
                ("2025-01-01T00:00:00Z", "2025-01-03T00:00:00Z"),
                [("2025-01-01T00:00:00Z", 23), ("2025-01-02T00:00:00Z", 8)],
                [("2025-01-01T00:00:00Z", 7), ("2025-01-02T00:00:00Z", 8)],
            ),
        ],
    )
    async def test_the_report_has_totals_and_a_series_per_key_and_for_the_client(
        self,
        recorded: Registry,
        granularity: str,
        rounded: tuple[str, str],
        client_series: list[tuple[str, int]],
        key_a_series: list[tuple[str, int]],
    ) -> None:
        """Buckets with usage only, in time order, the range rounded to whole buckets; the
        totals are the same at every granularity; another client's usage is not in it."""
        body = await report(recorded, "cl_billed", f"{self.RANGE}&granularity={granularity}")
        assert (body["client_id"], body["granularity"]) == ("cl_billed", granularity)
        assert (body["from"], body["to"]) == rounded
        assert body["totals"] == figures(
            allowed=31,
            denied={"forbidden": 1},
            upstream={"2xx": 1, "5xx": 2},
            request_bytes=3,
            response_bytes=10,
        )
        assert [(p["start"], p["allowed"]) for p in body["series"]] == client_series
        key_a, key_b = body["keys"]
        assert (key_a["key_id"], key_b["key_id"]) == (KEY_A, KEY_B)
        assert [(p["start"], p["allowed"]) for p in key_a["series"]] == key_a_series
        assert key_a["totals"]["allowed"] == 15
        assert key_b["totals"] == figures(allowed=16)

    async def test_each_point_carries_every_figure(self, recorded: Registry) -> None:
        """A point of the series has all the figures of its bucket, not only the counts."""
        body = await report(recorded, "cl_billed", f"{self.RANGE}&granularity=hour")
        first = body["keys"][0]["series"][0]
        assert first == {
            "start": "2025-01-01T10:00:00Z",
            **figures(allowed=3, upstream={"2xx": 1, "5xx": 2}, response_bytes=10),
        }

    async def test_the_range_is_rounded_to_whole_buckets_and_to_is_excluded(
        self, recorded: Registry
    ) -> None:
        """from rounds down and to up to the granularity; a minute at to is outside."""
        body = await report(
            recorded,
            "cl_billed",
            "from=2025-01-01T10:30:00Z&to=2025-01-01T11:00:00Z&granularity=hour",
        )
        assert (body["from"], body["to"]) == ("2025-01-01T10:00:00Z", "2025-01-01T11:00:00Z")
        assert body["totals"]["allowed"] == 19  # 10:05 and 10:59, not 11:00

    async def test_without_a_range_the_report_covers_the_last_day_by_hour(
        self, registry: Registry
    ) -> None:
        """The defaults: granularity hour, to the end of the current hour, from a day before."""
        created = await registry.create()
        before = time.time()
        body = await report(registry, created["client_id"])
        start, end = (parse_time(body[name]) for name in ("from", "to"))
        assert body["granularity"] == "hour"
        assert start is not None
        assert end is not None
        assert end - start == 86400
        assert end % 3600 == 0
        assert before < end <= time.time() + 3600

    @pytest.mark.parametrize(
        ("query", "field"),
        [
            ("granularity=week", "granularity"),
            ("from=yesterday", "from"),
            ("from=2025-01-01T00:00:00", "from"),  # no zone
            ("to=2025-13-01T00:00:00Z", "to"),
            ("from=2025-01-02T00:00:00Z&to=2025-01-01T00:00:00Z", "to"),
            ("from=2025-01-01T00:00:00Z&to=2025-01-01T00:00:00Z", "to"),
            ("from=2025-01-01T00:00:00Z&to=2025-01-03T00:00:00Z&granularity=minute", "from"),
            ("from=2020-01-01T00:00:00Z&to=2025-01-01T00:00:00Z&granularity=day", "from"),
            ("from=1969-12-31T00:00:00Z&to=1970-01-02T00:00:00Z", "from"),
        ],
    )
    async def test_a_report_out_of_bounds_is_refused_naming_the_parameter(
        self, recorded: Registry, query: str, field: str
    ) -> None:
        """400 for a bad granularity or time, a range backwards or empty, or more than 1440
        points."""
        status, body = await recorded.call("GET", f"/clients/cl_billed/usage?{query}")
        assert (status, body["field"]) == (400, field)

    async def test_a_report_of_more_figures_than_allowed_is_refused(
        self, recorded: Registry, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The rows a report reads are bounded too (keys times points)."""
        monkeypatch.setattr(usage, "MAX_ROWS", 4)
        query = f"{self.RANGE}&granularity=minute"
        status, body = await recorded.call("GET", f"/clients/cl_billed/usage?{query}")
        assert (status, body["field"]) == (400, "granularity")
        assert (await report(recorded, "cl_billed", f"{self.RANGE}&granularity=day"))["keys"]


class TestLastUsed:
    async def test_a_key_shows_the_newest_minute_of_its_usage(self, registry: Registry) -> None:
        """null until a batch names the key; then the newest minute, which an older batch
        arriving later does not move back; only the key named changes."""
        created = await registry.create()
        client_id, key_id = created["client_id"], created["key_id"]
        regenerated = (
            await registry.call("POST", f"/clients/{client_id}/api-key", json={"grace_seconds": 60})
        )[1]

        async def last_used() -> dict[str, str | None]:
            _, body = await registry.call("GET", f"/clients/{client_id}")
            return {k["key_id"]: k["last_used_at"] for k in body["keys"]}

        assert await last_used() == {key_id: None, regenerated["key_id"]: None}
        await send(
            registry,
            batch(
                entry("2025-01-01T10:00:00Z", key_id=key_id, client_id=client_id),
                entry("2025-01-01T10:07:00Z", key_id=key_id, client_id=client_id),
            ),
        )
        await send(
            registry, batch(entry("2025-01-01T09:00:00Z", key_id=key_id, client_id=client_id))
        )
        assert await last_used() == {key_id: "2025-01-01T10:07:00Z", regenerated["key_id"]: None}


class TestValidation:
    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"batch_id": ""}, "batch_id"),
            ({"batch_id": "a" * 65}, "batch_id"),
            ({"batch_id": "has space"}, "batch_id"),
            ({"batch_id": 7}, "batch_id"),
            ({"source": "x" * 129}, "source"),
            ({"source": "line\nbreak"}, "source"),
            ({"usage": {}}, "usage"),
            ({"usage": [0] * (usage.MAX_ENTRIES + 1)}, "usage"),
            ({"extra": 1}, "extra"),
        ],
    )
    async def test_a_malformed_batch_is_refused_naming_the_field(
        self, registry: Registry, change: dict[str, Any], field: str
    ) -> None:
        """400 invalid_request with the field at fault."""
        document = {**batch(entry("2025-01-01T10:00:00Z")), **change}
        status, body = await send(registry, document)
        assert (status, body["error"], body.get("field")) == (400, "invalid_request", field)

    async def test_a_batch_without_its_fields_is_refused_naming_them(
        self, registry: Registry
    ) -> None:
        """Each of batch_id, source and usage is required."""
        for missing in ("batch_id", "source", "usage"):
            document = batch(entry("2025-01-01T10:00:00Z"))
            del document[missing]
            status, body = await send(registry, document)
            assert (status, body.get("field")) == (400, missing)

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"key_id": "0123456789AB"}, "key_id"),
            ({"key_id": "0123456789a"}, "key_id"),
            ({"client_id": "-starts-badly"}, "client_id"),
            ({"client_id": None}, "client_id"),
            ({"minute": "2025-01-01T10:00:30Z"}, "minute"),
            ({"minute": "2025-01-01T10:00:00.5Z"}, "minute"),
            ({"minute": "2025-01-01T10:00:00"}, "minute"),
            ({"minute": "2025-01-01T10:00:00+01:00"}, "minute"),
            ({"minute": "2025-02-30T10:00:00Z"}, "minute"),
            ({"minute": "1969-12-31T23:59:00Z"}, "minute"),
            ({"minute": 1735725600}, "minute"),
            ({"allowed": -1}, "allowed"),
            ({"allowed": 1.5}, "allowed"),
            ({"allowed": True}, "allowed"),
            ({"allowed": usage.MAX_FIGURE + 1}, "allowed"),
            ({"request_bytes": "10"}, "request_bytes"),
            ({"response_bytes": None}, "response_bytes"),
            ({"denied": {"Forbidden": 1}}, "denied"),
            ({"denied": {"forbidden": -1}}, "denied.forbidden"),
            ({"denied": [1]}, "denied"),
            ({"denied": {f"r{n}": 1 for n in range(usage.MAX_REASONS + 1)}}, "denied"),
            ({"upstream": {"6xx": 1}}, "upstream"),
            ({"upstream": {"2xx": "1"}}, "upstream.2xx"),
            ({"colour": "red"}, "colour"),
        ],
    )
    async def test_a_malformed_entry_is_refused_naming_it_and_nothing_is_counted(
        self, registry: Registry, change: dict[str, Any], field: str
    ) -> None:
        """The field is named with the entry's index; the valid entry before it is not
        counted either, and the batch id is not used up."""
        good, bad = entry("2025-01-01T10:00:00Z"), {**entry("2025-01-01T10:01:00Z"), **change}
        document = batch(good, bad)
        status, body = await send(registry, document)
        assert (status, body.get("field")) == (400, f"usage[1].{field}")
        assert (await registry.call("GET", "/clients/cl_billed/usage"))[0] == 404
        document["usage"] = [good]
        assert (await send(registry, document))[1] == {"accepted": 1, "duplicate": False}

    async def test_an_entry_without_a_field_is_refused_naming_it(self, registry: Registry) -> None:
        document = batch(entry("2025-01-01T10:00:00Z"))
        del document["usage"][0]["upstream"]
        status, body = await send(registry, document)
        assert (status, body.get("field")) == (400, "usage[0].upstream")

    @pytest.mark.parametrize("data", [b"{not json", b"[1, 2]", b'"batch"', b"\xff\xfe{}"])
    async def test_a_body_that_is_not_a_json_object_is_refused(
        self, registry: Registry, data: bytes
    ) -> None:
        status, body = await registry.call(
            "POST",
            "/v1/usage",
            token=SERVICE,
            data=data,
            headers={"Content-Type": "application/json"},
        )
        assert (status, body["error"]) == (400, "invalid_request")

    async def test_a_body_that_is_not_json_by_its_type_is_415(self, registry: Registry) -> None:
        status, body = await registry.call(
            "POST", "/v1/usage", token=SERVICE, data=b"{}", headers={"Content-Type": "text/plain"}
        )
        assert (status, body["error"]) == (415, "unsupported_media_type")

    @pytest.mark.parametrize(
        ("path", "method", "token"),
        [("/v1/usage", "POST", ADMIN), ("/clients/cl_billed/usage", "GET", SERVICE)],
    )
    async def test_each_usage_endpoint_takes_its_own_token(
        self, registry: Registry, path: str, method: str, token: str
    ) -> None:
        """Batches come with the service token, reports go out with the admin token."""
        status, body = await registry.call(
            method, path, token=token, json=batch(entry("2025-01-01T10:00:00Z"))
        )
        assert (status, body["error"]) == (403, "forbidden")
        assert (await registry.call(method, path, token=None))[0] == 401


class TestSizes:
    async def test_a_batch_far_above_the_general_body_limit_is_accepted(
        self, registry: Registry
    ) -> None:
        """A few thousand entries (hundreds of KiB, the general limit being 16 KiB)."""
        entries = [
            entry(f"2025-01-01T{hour:02d}:{minute:02d}:00Z", allowed=1)
            for hour in range(24)
            for minute in range(60)
        ] * 2
        document = batch(*entries)
        assert len(json.dumps(document)) > 20 * api.MAX_BODY_BYTES
        assert await send(registry, document) == (200, {"accepted": 2880, "duplicate": False})
        body = await report(registry, "cl_billed", DAY + "&granularity=day")
        assert body["totals"]["allowed"] == 2880

    async def test_a_batch_over_1_mib_is_refused_with_413(self, registry: Registry) -> None:
        """By its Content-Length, before the body is read."""
        document = batch(entry("2025-01-01T10:00:00Z"))
        document["source"] = ""
        text = json.dumps(document)
        padded = text[:-1] + " " * (usage.MAX_BATCH_BYTES - len(text) + 1) + "}"
        status, body = await registry.call(
            "POST",
            "/v1/usage",
            token=SERVICE,
            data=io.BytesIO(padded.encode()),
            headers={"Content-Type": "application/json"},
        )
        assert (status, body["error"]) == (413, "payload_too_large")
        fits = text[:-1] + " " * (usage.MAX_BATCH_BYTES - len(text)) + "}"
        status, body = await registry.call(
            "POST",
            "/v1/usage",
            token=SERVICE,
            data=io.BytesIO(fits.encode()),
            headers={"Content-Type": "application/json"},
        )
        assert (status, body["accepted"]) == (200, 1)

    async def test_a_streamed_batch_over_1_mib_is_refused_with_413(
        self, registry: Registry
    ) -> None:
        """Without a Content-Length (chunked), as soon as it has grown past the limit."""

        async def chunks() -> Any:
            yield b'{"batch_id": "big", "source": "", "usage": ['
            for _ in range(20):
                yield b" " * 65536
            yield b"]}"

        status, body = await registry.call(
            "POST",
            "/v1/usage",
            token=SERVICE,
            data=chunks(),
            headers={"Content-Type": "application/json"},
        )
        assert (status, body["error"]) == (413, "payload_too_large")

    @pytest.mark.parametrize(("setting", "value"), [("MAX_USAGE_WAITING", 0), ("USAGE_WAIT", 0.01)])
    async def test_a_batch_that_finds_no_room_to_wait_or_waits_too_long_gets_retry_after(
        self, registry: Registry, monkeypatch: pytest.MonkeyPatch, setting: str, value: float
    ) -> None:
        """With every slot taken: 503 with Retry-After, at once when too many batches wait
        already, or after the longest wait; the ledger sends the same batch again later."""
        monkeypatch.setattr(api, "MAX_USAGE_BATCHES", 0)
        monkeypatch.setattr(api, setting, value)
        async with (
            started(registry.settings) as busy,
            busy.session.post(
                busy.base + "/v1/usage",
                json=batch(entry("2025-01-01T10:00:00Z")),
                headers={"Authorization": f"Bearer {SERVICE}"},
            ) as reply,
        ):
            assert reply.status == 503
            assert int(reply.headers["Retry-After"]) > 0


class TestRetention:
    async def test_batch_ids_are_forgotten_after_the_retention(self, registry: Registry) -> None:
        """Pruning keeps ids younger than the retention (a replay is still a duplicate), and
        forgets older ones (a replay after that counts again)."""
        sent = batch(entry("2025-01-01T10:00:00Z"))
        await send(registry, sent)
        store = registry.running.store
        assert await store.prune_usage_batches(retention=3600) == 0
        assert (await send(registry, sent))[1]["duplicate"] is True
        assert await store.prune_usage_batches(retention=0) == 1
        assert (await send(registry, sent))[1] == {"accepted": 1, "duplicate": False}
        assert (await report(registry, "cl_billed", DAY))["totals"]["allowed"] == 2


USAGE_TABLES = ("usage_minutes", "usage_denied", "usage_batches", "key_last_used")


def test_the_usage_queries_use_indexes(tmp_path: Path, postgres: str) -> None:
    """With sequential scans priced out, recording a batch, a report, a client's keys with
    their last use, and pruning batch ids read the usage tables through indexes only."""
    import psycopg  # noqa: PLC0415

    url = create_database(postgres, "usage_indexed")
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("ALTER DATABASE usage_indexed SET enable_seqscan = off")
    settings = settings_for(url, tmp_path)

    async def prepare() -> dict[str, Any]:
        async with started(settings) as registry:
            return await registry.create()

    async def scenario(created: dict[str, Any]) -> None:
        client_id, key_id = created["client_id"], created["key_id"]
        async with started(settings) as registry:
            await send(
                registry,
                batch(
                    entry(
                        "2025-01-01T10:00:00Z",
                        key_id=key_id,
                        client_id=client_id,
                        denied={"forbidden": 1},
                    ),
                    entry("2025-01-01T10:01:00Z", key_id=key_id, client_id=client_id),
                    entry("2025-01-01T10:01:00Z", client_id="cl_gone"),
                ),
            )
            await report(registry, client_id, DAY + "&granularity=minute")
            await report(registry, "cl_gone", DAY)
            await registry.call("GET", f"/clients/{client_id}")
            await registry.running.store.prune_usage_batches(retention=3600)

    created = asyncio.run(prepare())
    before = seq_scans(url, USAGE_TABLES)
    asyncio.run(scenario(created))
    assert seq_scans(url, USAGE_TABLES) == before
