"""Retention against a real PostgreSQL: exactly what is older than its setting goes, in
small batches, while ingestion goes on (deploy/README.md "Personal data")."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from daemon.db import privacy
from daemon.db.store import Store
from daemon.metrics import Metrics
from daemon.mqtt.schemas import Inbound, Rejection, TopicKind
from daemon.service.arrival import Arrival
from daemon.service.retention import Retention, RetentionPolicy
from tests.builders import bike_id, end, sample, start
from tests.conftest import shipped_pricing
from tests.integration.test_store import PREFIX, commit, new_ingestion

pytestmark = pytest.mark.integration

# The retention clock, long before anything the other tests write to the shared database:
# whatever is older than a cut-off measured from here is this test's own.
NOW = datetime(2001, 6, 1, tzinfo=UTC)
POLICY = RetentionPolicy(rejection_payload_days=30, outbox_days=7, telemetry_days=400)
BATCH = 5


def bad_message(bike: str, n: int, at: datetime) -> Arrival:
    topic = f"{PREFIX}/bikes/{bike}/telemetry"
    rejection = Rejection(topic, bike, "malformed_json", "payload is not JSON")
    payload = f'{{"n": {n}, '.encode()
    return Arrival(topic, payload, at, Inbound(TopicKind.TELEMETRY, bike, rejection=rejection))


async def ride(
    ingestion: Any, bike: str, at: datetime, samples: int, *, ended: bool = True
) -> None:
    begun = start(bike, at=at)
    commands = [begun, *(sample(begun, seq) for seq in range(1, samples + 1))]
    if ended:
        commands.append(end(begun, samples))
    await commit(ingestion, *commands, now=at + timedelta(minutes=31))


async def counts(pool: asyncpg.Pool, bike: str) -> dict[str, int]:
    topic = f"{PREFIX}/bikes/{bike}/%"
    return {
        "samples": await pool.fetchval("SELECT count(*) FROM telemetry WHERE bike_id = $1", bike),
        "payloads": await pool.fetchval(
            "SELECT count(*) FROM rejected_messages WHERE bike_id = $1 AND length(payload) > 0",
            bike,
        ),
        "rejections": await pool.fetchval(
            "SELECT count(*) FROM rejected_messages WHERE bike_id = $1", bike
        ),
        "outbox": await pool.fetchval("SELECT count(*) FROM outbox WHERE topic LIKE $1", topic),
    }


async def test_retention_removes_exactly_what_is_older_than_its_setting_in_batches(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
):
    batches = new_ingestion(Store(pool), shipped_pricing())
    old, young, riding = bike_id(), bike_id(), bike_id()
    long_ago = NOW - timedelta(days=401)
    for _ in range(4):  # 4 finalized rides of 3 samples: 12 samples to go, in 3 batches
        await ride(batches, old, long_ago, 3)
    await ride(batches, riding, long_ago, 2, ended=False)  # still Active: its samples stay
    for _ in range(2):
        await ride(batches, young, NOW - timedelta(days=399), 2)
    await batches.commit_batch([bad_message(old, n, NOW - timedelta(days=31)) for n in range(7)])
    await batches.commit_batch([bad_message(young, n, NOW - timedelta(days=29)) for n in range(3)])
    # The rides' outbox rows were published 8 (old) and 6 (young) days ago; the answers to
    # the rejections are not published yet, however old: they stay.
    for bike, days in ((old, 8), (young, 6)):
        await pool.execute(
            "UPDATE outbox SET published_at = $2 WHERE topic LIKE $1 AND event <> 'rejection'",
            f"{PREFIX}/bikes/{bike}/%",
            NOW - timedelta(days=days),
        )
    before = {bike: await counts(pool, bike) for bike in (old, young, riding)}
    assert before[old] == {"samples": 12, "payloads": 7, "rejections": 7, "outbox": 8 + 7}

    ingested = 0

    async def ingested_more_than(n: int) -> None:
        async with asyncio.timeout(10):
            while ingested <= n:  # noqa: ASYNC110 - a counter another task bumps, polled
                await asyncio.sleep(0.005)

    seen_while_running: list[int] = []
    for name in ("empty_rejection_payloads", "delete_published_outbox", "delete_telemetry"):
        job = getattr(privacy, name)

        async def counted(*args: Any, _job: Any = job) -> int:
            # Each batch waits for one more ride to be committed: ingestion is not held up
            # between batches (a job that kept its locks would time out here).
            await ingested_more_than(seen_while_running[-1] if seen_while_running else 0)
            seen_while_running.append(ingested)
            return int(await _job(*args))

        monkeypatch.setattr(privacy, name, counted)
    retention = Retention(pool, Metrics(), POLICY, batch=BATCH, pause_s=0.01, clock=lambda: NOW)

    async def ingest() -> None:
        nonlocal ingested
        while True:
            await ride(batches, bike_id(), NOW - timedelta(hours=1), 2)
            ingested += 1

    # On a hypertable TimescaleDB's retention policy drops telemetry's chunks, not the job.
    hypertable = await privacy.telemetry_is_hypertable(pool)
    ingestion = asyncio.create_task(ingest())
    try:
        removed = await retention.run_once()
    finally:
        if ingestion.done():
            ingestion.result()  # a failed ingestion is this test's failure, said as such
        ingestion.cancel()

    telemetry = {} if hypertable else {"telemetry": 12}
    assert removed == {"rejection_payloads": 7, "outbox": 8, **telemetry}
    # Each kind in batches of at most 5, the last one short: 2 + 2 + 3 calls (the rows found
    # when the batch was full, then the one that found fewer).
    assert len(seen_while_running) == 2 + 2 + (0 if hypertable else 3)
    assert seen_while_running == sorted(set(seen_while_running)), "ingestion went on meanwhile"
    after = {bike: await counts(pool, bike) for bike in (old, young, riding)}
    samples_left = 12 if hypertable else 0
    assert after[old] == {"samples": samples_left, "payloads": 0, "rejections": 7, "outbox": 7}
    assert after[young] == before[young]
    assert after[riding] == before[riding]
    redacted = await pool.fetch(
        "SELECT DISTINCT payload_redacted, payload_size > 0 AS had_payload"
        " FROM rejected_messages WHERE bike_id = $1",
        old,
    )
    assert [tuple(r) for r in redacted] == [("retention", True)]
    # The fixed record does not depend on its samples.
    totals = await pool.fetch(
        "SELECT DISTINCT energy_wh, telemetry_count FROM sessions WHERE bike_id = $1", old
    )
    assert [tuple(r) for r in totals] == [(30, 3)]
    monkeypatch.undo()  # the jobs as they are, now that ingestion has stopped
    assert await retention.run_once() == {
        "rejection_payloads": 0,
        "outbox": 0,
        **dict.fromkeys(telemetry, 0),
    }
    if hypertable:
        drop_after = await pool.fetchval(
            "SELECT config->>'drop_after' FROM timescaledb_information.jobs"
            " WHERE proc_name = 'policy_retention' AND hypertable_name = 'telemetry'"
        )
        assert drop_after == "400 days"


async def test_only_the_retention_job_may_delete_telemetry(pool: asyncpg.Pool):
    batches = new_ingestion(Store(pool), shipped_pricing())
    bike = bike_id()
    await ride(batches, bike, NOW - timedelta(days=500), 1)
    await batches.commit_batch([bad_message(bike, 1, NOW - timedelta(days=500))])

    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="append-only"):
        await pool.execute("DELETE FROM telemetry WHERE bike_id = $1", bike)
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="append-only"):
        await pool.execute("DELETE FROM rejected_messages WHERE bike_id = $1", bike)
    assert await pool.fetchval("SELECT count(*) FROM telemetry WHERE bike_id = $1", bike) == 1
