"""The pipelined commit on a real PostgreSQL: a batch is written and committed while the next
is decided, and a failure of either costs nothing already accepted, in any order."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import timedelta
from decimal import Decimal
from importlib import resources

import asyncpg
import pytest
from structlog.testing import capture_logs

from daemon.db.store import Store
from daemon.metrics import Metrics
from daemon.mqtt.delivery import Delivery
from daemon.pricing_text import parse_pricing
from daemon.service.arrival import Arrival
from daemon.service.ingestion import Ingestion
from daemon.service.pipeline import Pipeline, PipelineConfig
from domain.session_values import SessionPolicy
from tests.builders import T0, bike_id, end, sample, start
from tests.integration.test_store import NOW, PREFIX, payload_of

pytestmark = pytest.mark.integration


class Acks:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def ack(self, message: Delivery) -> bool:
        self.sent.append(message.mid)
        return True


def pipeline(pool: asyncpg.Pool) -> Pipeline:
    text = resources.files("daemon").joinpath("pricing.toml").read_text()
    pricing = parse_pricing(text, "daemon/pricing.toml")
    policy = SessionPolicy(pricing_version=pricing.version)
    ingestion = Ingestion(Store(pool), policy, pricing, prefix=PREFIX, max_payload_bytes=16_384)
    return Pipeline(ingestion, Metrics(), PipelineConfig(PREFIX, pipelined=True), clock=lambda: NOW)


def deliveries(acks: Acks, first_mid: int, *commands) -> list[Delivery]:
    out = []
    for mid, command in enumerate(commands, start=first_mid):
        kind = "lifecycle" if not hasattr(command, "sample") else "telemetry"
        topic = f"{PREFIX}/bikes/{command.bike_id}/{kind}"
        out.append(Delivery(topic, payload_of(command), mid, 1, acks, NOW))  # type: ignore[arg-type]
    return out


def _arrival(p: Pipeline, d: Delivery) -> Arrival:
    return Arrival(d.topic, d.payload, d.received_at, p._decode(p.intake.read(d)))


async def totals(pool: asyncpg.Pool, session_id: uuid.UUID) -> tuple[Decimal, int, list[int]]:
    row = await pool.fetchrow(
        "SELECT energy_wh, telemetry_count, seq_ranges FROM sessions WHERE session_id = $1",
        session_id,
    )
    return row["energy_wh"], row["telemetry_count"], list(row["seq_ranges"])


async def test_consecutive_batches_overlap_and_are_acknowledged_in_order(pool):
    acks = Acks()
    p = pipeline(pool)
    a = start(bike_id(), at=T0)
    first = deliveries(acks, 1, a, sample(a, 1, "1.5"))
    second = deliveries(acks, 3, sample(a, 2, "2.5"), sample(a, 3, "3"))
    await p.process(p.read(first))  # begun and committing in the background
    await p.process(p.read(second))  # begun while the first commits; the bike waits in PostgreSQL
    await p.finish_in_flight()
    assert acks.sent == [1, 2, 3, 4]
    assert await totals(pool, a.session_id) == (Decimal("7.0"), 3, [1, 3])


async def test_a_batch_that_fails_to_commit_is_decided_again_with_the_one_begun_after_it(pool):
    acks = Acks()
    p = pipeline(pool)
    a, b = start(bike_id(), at=T0), start(bike_id(), at=T0)
    poison = sample(a, 2, "100")
    constraint = f"test_poison_{uuid.uuid4().hex[:8]}"
    await pool.execute(
        f"ALTER TABLE telemetry ADD CONSTRAINT {constraint}"
        f" CHECK (telemetry_id <> '{poison.sample.telemetry_id}') NOT VALID"
    )
    try:
        first = deliveries(acks, 1, a, sample(a, 1, "1"), poison, b)
        # Begun while the first is committing, on what the first decided (a's session).
        second = deliveries(
            acks, 5, sample(a, 3, "3", at=T0 + timedelta(seconds=3)), sample(b, 1, "10")
        )
        with capture_logs() as logs:
            await p.process(p.read(first))
            await p.process(p.read(second))
            await p.finish_in_flight()
    finally:
        await pool.execute(f"ALTER TABLE telemetry DROP CONSTRAINT {constraint}")
    assert [e["event"] for e in logs if "pipelined" in e["event"]] == [
        "pipelined batch not committed; deciding it again"
    ]
    assert acks.sent == [1, 2, 3, 4, 5, 6]
    assert await totals(pool, a.session_id) == (Decimal(4), 2, [1, 1, 3, 3])
    assert await totals(pool, b.session_id) == (Decimal(10), 1, [1, 1])
    kept = await pool.fetchval(
        "SELECT reason FROM rejected_messages WHERE telemetry_id = $1",
        poison.sample.telemetry_id,
    )
    assert kept == "schema_violation"
    assert p.metrics.dropped.labels("commit_failed")._value.get() == 0


async def test_a_batch_of_cached_bikes_is_decided_without_waiting_for_the_one_before(pool):
    """The second batch's bikes are locked by the first's open transaction; decided ahead on
    the cache, it does not wait for them, and its lock finds the versions it expected."""
    acks = Acks()
    p = pipeline(pool)
    a = start(bike_id(), at=T0)
    await p.process(p.read(deliveries(acks, 1, a)))
    await p.finish_in_flight()  # a is cached now
    ingestion = p.commits.batches
    first = ingestion.decide_ahead(
        [_arrival(p, d) for d in deliveries(acks, 2, sample(a, 1, "1.5"))]
    )
    second = ingestion.decide_ahead(
        [_arrival(p, d) for d in deliveries(acks, 3, sample(a, 2, "2.5"))]
    )
    assert first is not None and second is not None
    assert first.uow is None and second.uow is None  # neither holds a lock yet
    assert second.expected == {a.bike_id: first.expected[a.bike_id] + 1}
    await ingestion.finish_batch(first)
    await ingestion.finish_batch(second)
    assert await totals(pool, a.session_id) == (Decimal("4.0"), 2, [1, 2])


async def test_a_batch_with_a_bike_new_to_the_cache_waits_for_the_one_before_to_commit(pool):
    """The first batch is decided on the cache and locks its bike only when written; the
    second needs the store (a new bike) and must not lock the first's bike before then, or
    each would wait for the other."""
    acks = Acks()
    p = pipeline(pool)
    a = start(bike_id(), at=T0)
    await p.process(p.read(deliveries(acks, 1, a)))
    await p.finish_in_flight()
    c = start(bike_id(), at=T0)
    await p.process(p.read(deliveries(acks, 2, sample(a, 1, "1.5"))))
    assert (
        p.commits.batches.decide_ahead([_arrival(p, d) for d in deliveries(Acks(), 9, c)]) is None
    )
    await asyncio.wait_for(p.process(p.read(deliveries(acks, 3, sample(a, 2, "2.5"), c))), 20)
    await asyncio.wait_for(p.finish_in_flight(), timeout=20)
    assert acks.sent == [1, 2, 3, 4]
    assert await totals(pool, a.session_id) == (Decimal("4.0"), 2, [1, 2])


async def test_a_batch_decided_ahead_that_another_writer_overtook_is_decided_again(pool):
    acks = Acks()
    p = pipeline(pool)
    a = start(bike_id(), at=T0)
    await p.process(p.read(deliveries(acks, 1, a, sample(a, 1, "1"))))
    await p.finish_in_flight()
    # Another instance takes the bike (and adds a sample) behind this one's back.
    other = pipeline(pool)
    await other.process(other.read(deliveries(Acks(), 1, sample(a, 2, "2"))))
    await other.finish_in_flight()
    with capture_logs() as logs:
        await p.process(
            p.read(deliveries(acks, 3, sample(a, 3, "3", at=T0 + timedelta(seconds=3))))
        )
        await p.process(
            p.read(deliveries(acks, 4, sample(a, 4, "4", at=T0 + timedelta(seconds=4))))
        )
        await p.finish_in_flight()
    assert any("not committed" in e["event"] for e in logs)
    assert acks.sent == [1, 2, 3, 4]
    assert await totals(pool, a.session_id) == (Decimal(10), 4, [1, 4])


async def test_a_batch_of_starts_of_new_bikes_begins_while_the_one_before_commits(pool):
    """A morning's first rides: each batch is starts of bikes the cache has never held; the
    second locks its own (new) bikes and decides while the first is written, and both are
    committed and acknowledged in order."""
    acks = Acks()
    p = pipeline(pool)
    ingestion = p.commits.batches
    beside: list[bool] = []
    begins_beside = ingestion.begins_beside

    def spy(arrivals, in_flight):
        beside.append(begins_beside(arrivals, in_flight))
        return beside[-1]

    ingestion.begins_beside = spy  # type: ignore[method-assign]
    first = [start(bike_id(), at=T0) for _ in range(3)]
    second = [start(bike_id(), at=T0) for _ in range(3)]
    await p.process(p.read(deliveries(acks, 1, *first)))  # begun, committing in the background
    await p.process(p.read(deliveries(acks, 4, *second)))
    await p.finish_in_flight()
    assert beside == [True]
    assert acks.sent == [1, 2, 3, 4, 5, 6]
    stored = await pool.fetchval(
        "SELECT count(*) FROM sessions WHERE session_id = ANY($1::uuid[])",
        [s.session_id for s in first + second],
    )
    assert stored == 6


async def test_a_session_id_reused_by_a_start_begun_beside_is_refused_as_in_order(pool):
    """Begun beside the batch in flight, the second start cannot see the first's session
    yet; the store's key refuses it when written, and both are decided again in order: the
    second bike is told its session id is another bike's, exactly as one batch after the
    other would have it."""
    acks = Acks()
    p = pipeline(pool)
    a = start(bike_id(), at=T0)
    b = start(bike_id(), at=T0, session_id=a.session_id)
    ingestion = p.commits.batches
    finish_batch = ingestion.finish_batch

    async def slow_finish(batch, underway=lambda: None, before=None):  # a commits after b decided
        underway()  # the pipeline goes on to b at once
        await asyncio.sleep(0.3)
        await finish_batch(batch, before=before)

    ingestion.finish_batch = slow_finish  # type: ignore[method-assign]
    await p.process(p.read(deliveries(acks, 1, a)))
    with capture_logs() as logs:
        await p.process(p.read(deliveries(acks, 2, b)))  # begun beside a's batch
        await p.finish_in_flight()
    assert "pipelined batch not committed; deciding it again" in [e["event"] for e in logs]
    assert acks.sent == [1, 2]
    owner = await pool.fetchval("SELECT bike_id FROM sessions WHERE session_id = $1", a.session_id)
    assert owner == a.bike_id
    reason = await pool.fetchval(
        "SELECT reason FROM rejected_messages WHERE bike_id = $1", b.bike_id
    )
    assert reason == "session_id_conflict"
    assert p.metrics.dropped.labels("commit_failed")._value.get() == 0


async def test_what_waits_in_the_inbox_is_decoded_while_the_batch_in_flight_commits(pool):
    """While the batch in flight waits (here for another writer's lock on its bike), the
    messages behind it in the inbox are decoded, once each; taken later, they are decided
    from that decoding, in order."""
    acks = Acks()
    p = pipeline(pool)
    a = start(bike_id(), at=T0)
    await p.process(p.read(deliveries(acks, 1, a)))
    await p.finish_in_flight()
    samples = [sample(a, seq, "1", at=T0 + timedelta(seconds=seq)) for seq in range(1, 8)]
    first, waiting = samples[:1], samples[1:]
    decodes = 0
    decode = p._decode

    def counted(taken):
        nonlocal decodes
        decodes += 1
        return decode(taken)

    p._decode = counted  # type: ignore[method-assign]
    async with pool.acquire() as blocker, blocker.transaction():
        # The first batch's lock waits for this transaction: it stays in flight meanwhile.
        await blocker.execute("SELECT 1 FROM bikes WHERE bike_id = $1 FOR UPDATE", a.bike_id)
        in_flight = asyncio.create_task(p.process(p.read(deliveries(acks, 2, *first))))
        await asyncio.sleep(0.05)
        for d in deliveries(acks, 3, *waiting):
            p.deliver(d)
        for _ in range(200):
            if all(t.inbound is not None for t in p.intake.inbox):
                break
            await asyncio.sleep(0.01)
        decoded_ahead = [t.inbound.command for t in p.intake.inbox if t.inbound is not None]
        assert acks.sent == [1]  # the first batch still waits for its lock
    await in_flight
    await p.process(p.next_batch())
    await p.finish_in_flight()
    assert decoded_ahead == waiting
    assert decodes == len(samples)  # each message decoded once
    assert acks.sent == [1, *range(2, 9)]
    assert await totals(pool, a.session_id) == (Decimal(7), 7, [1, 7])


async def test_a_batch_of_samples_for_other_bikes_is_written_beside_the_one_in_flight(pool):
    """Decided ahead, samples of bikes the batch in flight does not touch are written on a
    second connection while that one is still open, and commit after it, in order."""
    acks = Acks()
    p = pipeline(pool)
    a, b = start(bike_id(), at=T0), start(bike_id(), at=T0)
    await p.process(p.read(deliveries(acks, 1, a, b)))
    await p.finish_in_flight()
    store = p.commits.batches.store
    write_rows = store.write_rows
    written: list[tuple[str, list[int]]] = []

    async def traced(conn, rows):
        whose = "a" if rows.running[0][0] == a.session_id else "b"
        await write_rows(conn, rows)
        written.append((whose, list(acks.sent)))
        if whose == "a":
            await asyncio.sleep(0.3)  # a's transaction stays open, written, not committed

    store.write_rows = traced  # type: ignore[method-assign]
    await p.process(p.read(deliveries(acks, 3, sample(a, 1, "1"))))
    await p.process(p.read(deliveries(acks, 4, sample(b, 1, "2"))))
    await p.finish_in_flight()
    assert written == [("a", [1, 2]), ("b", [1, 2])]  # b written before a was acknowledged
    assert acks.sent == [1, 2, 3, 4]
    assert await totals(pool, a.session_id) == (Decimal(1), 1, [1, 1])
    assert await totals(pool, b.session_id) == (Decimal(2), 1, [1, 1])


async def test_only_samples_and_ends_sharing_no_telemetry_id_are_written_beside(pool):
    acks = Acks()
    p = pipeline(pool)
    a, b = start(bike_id(), at=T0), start(bike_id(), at=T0)
    await p.process(p.read(deliveries(acks, 1, a, b)))
    await p.finish_in_flight()
    ingestion = p.commits.batches

    def arrivals(*commands):
        return [_arrival(p, d) for d in deliveries(Acks(), 9, *commands)]

    in_flight = arrivals(sample(a, 1, "1"))
    assert ingestion.decide_ahead(in_flight) is not None
    taken_id = in_flight[0].inbound.command.sample.telemetry_id
    later = sample(b, 2, "2", at=T0 + timedelta(seconds=2))
    clash = dataclasses.replace(
        later, sample=dataclasses.replace(later.sample, telemetry_id=taken_id)
    )
    cases = [
        (arrivals(sample(b, 1, "2")), True),  # samples of another bike
        (arrivals(clash), False),  # a telemetry id the batch in flight carries
        # emitted before its session started: refused, a rejection row to write
        (arrivals(sample(b, 3, "1", at=T0 - timedelta(hours=1))), False),
        (arrivals(end(b, 3)), True),  # an end
    ]
    for batch, beside in cases:
        opened = ingestion.decide_ahead(batch)
        assert opened is not None
        assert ingestion.writes_beside(batch, opened, in_flight) is beside
