"""The store and the schema against a real PostgreSQL: migrations, invariants, round trips."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from decimal import Decimal
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from daemon.db.migrate import ensure_database, migrate
from daemon.db.outbox import OutboxStore
from daemon.db.pricing import PricingRecords
from daemon.db.store import Store
from daemon.mqtt.schemas import Inbound, Rejection, TopicKind, decode
from daemon.pricing_text import canonical_pricing, parse_pricing
from daemon.service.arrival import Arrival, Settled
from daemon.service.ingestion import Ingestion
from domain.billing import PricingRules
from domain.commands import Command, RecordTelemetry, StartSession
from domain.events import DeferredMessageSettled, Outcome, SessionFinalized
from domain.seqs import SeqRanges
from domain.session import Session
from domain.session_values import EndReason, SessionKind, SessionPolicy
from tests.builders import T0, bike_id, end, sample, start

pytestmark = pytest.mark.integration

PREFIX = "chargeflow/v1"
NOW = T0 + timedelta(hours=1)
# A bike is due when its end was received by GRACE_CUTOFF or it was last heard by ABANDON_CUTOFF.
GRACE_CUTOFF = T0 + timedelta(hours=3)
ABANDON_CUTOFF = T0 + timedelta(hours=2)
PENDING_LIMIT = 100_000  # other tests share the database and may leave rows pending
# What a finalized sessions row must carry (the CHECK constraint's columns).
FIXED_TOTALS = {
    "ended_at": NOW,
    "energy_wh": Decimal(10),
    "distance_m": Decimal(0),
    "telemetry_count": 1,
    "missing_samples": 0,
    "end_reason": "ended",
    "finalized_at": NOW,
    "pricing_version": "2026-01",
}


PRICES = (
    'version = "{version}"\ncurrency = "EUR"\n[ride]\nunit_price = {ride}\n'
    "[charging]\nunit_price = 0.25\n"
)
# Kept from the start (a session's summary), so NOT NULL for every session.
RUNNING_TOTALS = ("energy_wh", "distance_m", "telemetry_count")


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pricing() -> PricingRules:
    text = resources.files("daemon").joinpath("pricing.toml").read_text()
    return parse_pricing(text, "daemon/pricing.toml")


@pytest.fixture
def store(pool: asyncpg.Pool) -> Store:
    return Store(pool)


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> AsyncIterator[Any]:
    async with pool.acquire() as connection:
        yield connection


@pytest.fixture
async def spare_database_url(postgres_url: str) -> AsyncIterator[str]:
    """The URL of a database that does not exist yet; dropped afterwards if a test made it."""
    name = f"chargeflow_spare_{uuid.uuid4().hex[:10]}"
    yield urlunsplit(urlsplit(postgres_url)._replace(path=f"/{name}"))
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def new_ingestion(store: Store, pricing: PricingRules) -> Ingestion:
    policy = SessionPolicy(pricing_version=pricing.version)
    return Ingestion(store, policy, pricing, prefix=PREFIX, max_payload_bytes=16_384)


@pytest.fixture
def ingestion(store: Store, pricing: PricingRules) -> Ingestion:
    return new_ingestion(store, pricing)


def payload_of(command: Command) -> bytes:
    """The JSON a bike would publish for this command."""
    if isinstance(command, RecordTelemetry):
        s = command.sample
        document: dict[str, Any] = {
            "telemetry_id": str(s.telemetry_id),
            "session_id": str(s.session_id),
            "seq": s.seq,
            "emitted_at": s.emitted_at.at.isoformat(),
            "energy_wh": float(s.energy.wh),
        }
        if s.distance is not None:
            document["distance_m"] = float(s.distance.m)
        if s.soc is not None:
            document["soc_pct"] = float(s.soc.pct)
    elif isinstance(command, StartSession):
        document = {
            "event": f"{command.kind}_started",
            "session_id": str(command.session_id),
            command.kind.party_field: command.party_id,
            "occurred_at": command.occurred_at.isoformat(),
        }
    else:
        document = {
            "event": f"{command.kind}_ended",
            "session_id": str(command.session_id),
            "occurred_at": command.occurred_at.isoformat(),
            "last_seq": command.last_seq,
        }
    return json.dumps(document).encode()


def arrival(command: Command, now: datetime = NOW) -> Arrival:
    """A message as the pipeline hands it over: its JSON, decoded by the edge."""
    kind = "telemetry" if isinstance(command, RecordTelemetry) else "lifecycle"
    topic = f"{PREFIX}/bikes/{command.bike_id}/{kind}"
    payload = payload_of(command)
    inbound = decode(topic, payload, PREFIX, 16_384)
    assert inbound.command == command, inbound
    return Arrival(topic, payload, now, inbound)


async def commit_settled(
    ingestion: Ingestion, *commands: Command, now: datetime = NOW
) -> tuple[list[Settled], list[Any]]:
    return await ingestion.commit_batch([arrival(c, now) for c in commands])


async def commit(ingestion: Ingestion, *commands: Command, now: datetime = NOW) -> list[Any]:
    settled, events = await commit_settled(ingestion, *commands, now=now)
    assert all(s.rejection is None and s.dropped is None for s in settled), settled
    return events


def snapshot(session: Session) -> tuple[Any, ...]:
    """Everything a session summary is made of, so that two sessions compare by value."""
    return (
        type(session),
        session.session_id,
        session.bike_id,
        session.party_id,
        session.started_at,
        session.last_heard_at,
        session.end,
        session.energy_wh,
        session.distance_m,
        session.seqs,
        session.latest_emitted_at,
        session.finalized,
        session.state,
    )


def finalized_events(events: list[Any]) -> list[SessionFinalized]:
    return [e for e in events if isinstance(e, SessionFinalized)]


async def commit_finalized_ride(ingestion: Ingestion, bike: str) -> uuid.UUID:
    """A ride of 1000 + 234.5 Wh, ended and complete, committed in one batch."""
    begun = start(bike)
    await commit(
        ingestion, begun, sample(begun, 1, "1000"), sample(begun, 2, "234.5"), end(begun, 2)
    )
    return begun.session_id


async def commit_bike(
    ingestion: Ingestion, heard_at: datetime, end_received_at: datetime | None
) -> str:
    """A bike whose Active session was last heard at `heard_at`, its end pending or not."""
    bike = bike_id()
    begun = start(bike)
    await commit(ingestion, begun, now=heard_at)
    if end_received_at is not None:
        await commit(ingestion, end(begun, last_seq=1), now=end_received_at)
    return bike


async def insert_active(conn: Any, bike: str) -> uuid.UUID:
    session_id = uuid.uuid4()
    await conn.execute("INSERT INTO bikes (bike_id) VALUES ($1) ON CONFLICT DO NOTHING", bike)
    await conn.execute(
        "INSERT INTO sessions (session_id, bike_id, kind, party_id, started_at, received_at,"
        " last_heard_at) VALUES ($1, $2, 'ride', 'rider-1', $3, $3, $3)",
        session_id,
        bike,
        T0,
    )
    return session_id


async def finalize(conn: Any, session_id: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE sessions SET state = 'finalized', ended_at = $2, energy_wh = 0, distance_m = 0,"
        " telemetry_count = 0, missing_samples = 0, end_reason = 'ended', finalized_at = $2,"
        " pricing_version = '2026-01' WHERE session_id = $1",
        session_id,
        NOW,
    )


async def insert_finalized(conn: Any, bike: str) -> uuid.UUID:
    session_id = await insert_active(conn, bike)
    await finalize(conn, session_id)
    return session_id


async def insert_telemetry(conn: Any, session_id: uuid.UUID, bike: str) -> uuid.UUID:
    telemetry_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO telemetry (telemetry_id, session_id, bike_id, seq, emitted_at, energy_wh,"
        " received_at) VALUES ($1, $2, $3, 1, $4, $5, $4)",
        telemetry_id,
        session_id,
        bike,
        T0 + timedelta(seconds=1),
        Decimal(10),
    )
    return telemetry_id


async def insert_rejected(conn: Any) -> int:
    payload = uuid.uuid4().bytes
    row_id: int = await conn.fetchval(
        "INSERT INTO rejected_messages (received_at, topic, bike_id, reason, detail, payload,"
        " payload_size, payload_sha256) VALUES ($1, $2, NULL, 'unknown_topic', 'no such topic',"
        " $3, $4, $5) RETURNING id",
        NOW,
        f"nowhere/{uuid.uuid4().hex}",
        payload,
        len(payload),
        hashlib.sha256(payload).digest(),
    )
    return row_id


def rejected(bike: str | None, payload: bytes = b'{"seq": ', topic: str | None = None) -> Arrival:
    topic = topic or f"{PREFIX}/bikes/{bike}/telemetry"
    rejection = Rejection(topic, bike, "malformed_json", "payload is not JSON")
    return Arrival(topic, payload, NOW, Inbound(TopicKind.TELEMETRY, bike, rejection=rejection))


async def outbox_rows(conn: Any, topic: str) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM outbox WHERE topic = $1 ORDER BY id", topic)


def is_of(topic: str, bikes: list[str]) -> bool:
    return any(topic.startswith(f"{PREFIX}/bikes/{bike}/") for bike in bikes)


async def pending_ids(store: Store, conn: Any, ids: set[int]) -> list[int]:
    return [r.id for r in await OutboxStore(store.pool).pending(conn, PENDING_LIMIT) if r.id in ids]


def sqlstate_of(excinfo: pytest.ExceptionInfo[asyncpg.PostgresError]) -> str:
    return str(excinfo.value.sqlstate)


# -- migrations ------------------------------------------------------------------------------


async def test_migrating_an_up_to_date_database_applies_nothing(database_url):
    connection = await asyncpg.connect(database_url)
    try:
        assert await migrate(connection) == []
    finally:
        await connection.close()


async def test_migrating_a_new_database_applies_the_initial_schema(spare_database_url):
    await ensure_database(spare_database_url)
    connection = await asyncpg.connect(spare_database_url)
    try:
        applied = await migrate(connection)
        tables = await connection.fetchval("SELECT to_regclass('sessions') IS NOT NULL")
    finally:
        await connection.close()

    assert applied[0] == "001_initial"
    assert tables is True


async def test_ensure_database_leaves_an_existing_database_alone(database_url):
    assert await ensure_database(database_url) is False


async def test_ensure_database_creates_a_missing_database(postgres_url, spare_database_url):
    name = urlsplit(spare_database_url).path.lstrip("/")

    created = await ensure_database(spare_database_url)

    admin = await asyncpg.connect(postgres_url)
    try:
        exists = await admin.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name
        )
    finally:
        await admin.close()
    assert created is True
    assert exists is True


async def test_instances_starting_together_create_the_database_once(spare_database_url):
    # `chargeflow run --workers N` starts N processes at once on a missing database: one
    # creates it, the others find it there (PostgreSQL may answer them with a unique violation
    # on pg_database rather than "already exists"), and none fails.
    results = await asyncio.gather(*(ensure_database(spare_database_url) for _ in range(6)))

    assert sorted(results) == [False] * 5 + [True]


async def test_version_2_backfills_summaries_of_sessions_written_by_version_1(spare_database_url):
    await ensure_database(spare_database_url)
    conn = await asyncpg.connect(spare_database_url)
    try:
        folder = resources.files("daemon.db").joinpath("migrations")
        await conn.execute(folder.joinpath("001_initial.sql").read_text())
        await conn.execute(
            "CREATE TABLE schema_migrations (name text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now());"
            " INSERT INTO schema_migrations (name) VALUES ('001_initial')"
        )
        done, active = uuid.uuid4(), uuid.uuid4()
        for session_id, seqs in ((done, (1,)), (active, (1, 2, 3, 5))):
            await conn.execute(
                "INSERT INTO sessions (session_id, bike_id, kind, party_id, started_at,"
                " received_at, last_heard_at) VALUES ($1, 'bike-v1', 'ride', 'r', $2, $2, $2)",
                session_id,
                T0,
            )
            for seq in seqs:
                await conn.execute(
                    "INSERT INTO telemetry (telemetry_id, session_id, bike_id, seq, emitted_at,"
                    " energy_wh, distance_m, received_at) VALUES ($1, $2, 'bike-v1', $3, $4,"
                    " $5, 2, $4)",
                    uuid.uuid4(),
                    session_id,
                    seq,
                    T0 + timedelta(seconds=seq),
                    Decimal("1.25"),
                )
            if session_id == done:  # as version 1 finalized: no pricing version yet
                await conn.execute(
                    "UPDATE sessions SET state = 'finalized', ended_at = $2, energy_wh = 0,"
                    " distance_m = 0, telemetry_count = 0, missing_samples = 0,"
                    " end_reason = 'ended', finalized_at = $2 WHERE session_id = $1",
                    done,
                    NOW,
                )

        applied = await migrate(conn)

        rows = {
            r["session_id"]: r
            for r in await conn.fetch("SELECT * FROM sessions WHERE bike_id = 'bike-v1'")
        }
        bikes = await conn.fetch("SELECT bike_id, version FROM bikes")
    finally:
        await conn.close()
    assert "002_scale_safe_sessions" in applied
    summary = rows[active]
    assert summary["seq_ranges"] == [1, 3, 5, 5]
    assert (summary["energy_wh"], summary["distance_m"], summary["telemetry_count"]) == (
        Decimal(5),
        Decimal(8),
        4,
    )
    assert summary["latest_emitted_at"] == T0 + timedelta(seconds=5)
    # A finalized session keeps its fixed totals (here 0, as finalized) and gets its seqs.
    assert (rows[done]["energy_wh"], rows[done]["seq_ranges"]) == (Decimal(0), [1, 1])
    assert [(b["bike_id"], b["version"]) for b in bikes] == [("bike-v1", 1)]


# -- invariants PostgreSQL enforces by itself --------------------------------------------------


async def test_a_second_active_session_for_a_bike_is_refused_at_commit(conn):
    bike = bike_id()
    transaction = conn.transaction()
    await transaction.start()
    await insert_active(conn, bike)
    await insert_active(conn, bike)  # deferred: not refused yet

    with pytest.raises(asyncpg.ExclusionViolationError):
        await transaction.commit()


async def test_finalizing_the_old_session_then_starting_the_next_commits_in_one_transaction(conn):
    bike = bike_id()
    old = await insert_active(conn, bike)

    async with conn.transaction():
        await finalize(conn, old)
        new = await insert_active(conn, bike)

    active = await conn.fetch(
        "SELECT session_id FROM sessions WHERE bike_id = $1 AND state = 'active'", bike
    )
    assert [r["session_id"] for r in active] == [new]


async def test_starting_the_next_session_then_finalizing_the_old_commits_in_one_transaction(conn):
    bike = bike_id()
    old = await insert_active(conn, bike)

    async with conn.transaction():
        new = await insert_active(conn, bike)
        await finalize(conn, old)

    active = await conn.fetch(
        "SELECT session_id FROM sessions WHERE bike_id = $1 AND state = 'active'", bike
    )
    assert [r["session_id"] for r in active] == [new]


async def test_an_active_session_takes_updates_to_its_progress(conn):
    bike = bike_id()
    session_id = await insert_active(conn, bike)

    await conn.execute(
        "UPDATE sessions SET last_heard_at = $2 WHERE session_id = $1", session_id, NOW
    )

    heard = await conn.fetchval(
        "SELECT last_heard_at FROM sessions WHERE session_id = $1", session_id
    )
    assert heard == NOW


async def test_a_finalized_session_cannot_be_updated(conn):
    session_id = await insert_finalized(conn, bike_id())

    with pytest.raises(asyncpg.IntegrityConstraintViolationError) as refused:
        await conn.execute(
            "UPDATE sessions SET energy_wh = $2 WHERE session_id = $1", session_id, Decimal(99)
        )
    assert sqlstate_of(refused) == "23000"


async def test_a_finalized_session_cannot_be_deleted(conn):
    session_id = await insert_finalized(conn, bike_id())

    with pytest.raises(asyncpg.IntegrityConstraintViolationError) as refused:
        await conn.execute("DELETE FROM sessions WHERE session_id = $1", session_id)
    assert sqlstate_of(refused) == "23000"


async def test_an_active_session_cannot_be_deleted_either(conn):
    session_id = await insert_active(conn, bike_id())

    with pytest.raises(asyncpg.IntegrityConstraintViolationError) as refused:
        await conn.execute("DELETE FROM sessions WHERE session_id = $1", session_id)
    assert sqlstate_of(refused) == "23000"


async def test_an_active_session_cannot_move_to_another_bike(conn):
    session_id = await insert_active(conn, bike_id())

    with pytest.raises(asyncpg.IntegrityConstraintViolationError) as refused:
        await conn.execute(
            "UPDATE sessions SET bike_id = $2 WHERE session_id = $1", session_id, bike_id()
        )
    assert sqlstate_of(refused) == "23000"


async def test_a_telemetry_row_cannot_be_updated(conn):
    bike = bike_id()
    session_id = await insert_active(conn, bike)
    telemetry_id = await insert_telemetry(conn, session_id, bike)

    with pytest.raises(asyncpg.IntegrityConstraintViolationError) as refused:
        await conn.execute(
            "UPDATE telemetry SET energy_wh = $2 WHERE telemetry_id = $1",
            telemetry_id,
            Decimal(99),
        )
    assert sqlstate_of(refused) == "23000"


async def test_a_telemetry_row_cannot_be_deleted(conn):
    bike = bike_id()
    session_id = await insert_active(conn, bike)
    telemetry_id = await insert_telemetry(conn, session_id, bike)

    with pytest.raises(asyncpg.IntegrityConstraintViolationError) as refused:
        await conn.execute("DELETE FROM telemetry WHERE telemetry_id = $1", telemetry_id)
    assert sqlstate_of(refused) == "23000"


async def test_telemetry_for_a_finalized_session_is_refused(conn):
    bike = bike_id()
    session_id = await insert_finalized(conn, bike)

    with pytest.raises(asyncpg.IntegrityConstraintViolationError) as refused:
        await insert_telemetry(conn, session_id, bike)
    assert sqlstate_of(refused) == "23000"


async def test_a_rejected_message_cannot_be_updated(conn):
    row_id = await insert_rejected(conn)

    with pytest.raises(asyncpg.IntegrityConstraintViolationError) as refused:
        await conn.execute("UPDATE rejected_messages SET detail = 'edited' WHERE id = $1", row_id)
    assert sqlstate_of(refused) == "23000"


async def test_a_rejected_message_cannot_be_deleted(conn):
    row_id = await insert_rejected(conn)

    with pytest.raises(asyncpg.IntegrityConstraintViolationError) as refused:
        await conn.execute("DELETE FROM rejected_messages WHERE id = $1", row_id)
    assert sqlstate_of(refused) == "23000"


@pytest.mark.parametrize(
    "missing", sorted(set(FIXED_TOTALS) - set(RUNNING_TOTALS) - {"pricing_version"})
)
async def test_a_finalized_session_without_totals_violates_the_check_constraint(conn, missing):
    totals = {**FIXED_TOTALS, missing: None}
    columns = ", ".join(totals)
    values = ", ".join(f"${i}" for i in range(4, 4 + len(totals)))

    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await conn.execute(
            "INSERT INTO sessions (session_id, bike_id, started_at, kind, party_id, state,"
            f" received_at, last_heard_at, {columns}) VALUES ($1, $2, $3, 'ride', 'rider-1',"
            f" 'finalized', $3, $3, {values})",
            uuid.uuid4(),
            bike_id(),
            T0,
            *totals.values(),
        )
    assert refused.value.constraint_name == "finalized_sessions_have_fixed_totals"


@pytest.mark.parametrize("missing", RUNNING_TOTALS)
async def test_a_session_without_its_running_totals_is_refused_whatever_its_state(conn, missing):
    bike = bike_id()
    await conn.execute("INSERT INTO bikes (bike_id) VALUES ($1)", bike)
    with pytest.raises(asyncpg.NotNullViolationError):
        await conn.execute(
            "INSERT INTO sessions (session_id, bike_id, started_at, kind, party_id,"
            f" received_at, last_heard_at, {missing}) VALUES ($1, $2, $3, 'ride', 'rider-1',"
            " $3, $3, NULL)",
            uuid.uuid4(),
            bike,
            T0,
        )


async def test_a_finalized_session_with_its_totals_is_accepted(conn):
    columns = ", ".join(FIXED_TOTALS)
    values = ", ".join(f"${i}" for i in range(4, 4 + len(FIXED_TOTALS)))
    session_id = uuid.uuid4()
    bike = bike_id()
    await conn.execute("INSERT INTO bikes (bike_id) VALUES ($1)", bike)

    await conn.execute(
        "INSERT INTO sessions (session_id, bike_id, started_at, kind, party_id, state,"
        f" received_at, last_heard_at, {columns}) VALUES ($1, $2, $3, 'ride', 'rider-1',"
        f" 'finalized', $3, $3, {values})",
        session_id,
        bike,
        T0,
        *FIXED_TOTALS.values(),
    )

    state = await conn.fetchval("SELECT state FROM sessions WHERE session_id = $1", session_id)
    assert state == "finalized"


# -- committing and loading through the unit of work --------------------------------------------


async def test_an_active_session_with_its_end_pending_loads_back_as_its_summary(store, ingestion):
    bike = bike_id()
    begun = start(bike)
    await commit(ingestion, begun, sample(begun, 1, "12.5", distance="40", soc="81"))
    await commit(ingestion, sample(begun, 2, "7"), now=NOW + timedelta(seconds=1))
    await commit(ingestion, end(begun, last_seq=4), now=NOW + timedelta(seconds=2))
    cached = ingestion.fleet.bikes[bike].current

    async with store.pool.acquire() as conn:
        active, waiting = await store.load_bikes(conn, [bike])

    assert waiting == []
    assert snapshot(active[bike]) == snapshot(cached)
    assert active[bike].seqs == SeqRanges(((1, 2),))
    assert (active[bike].energy_wh, active[bike].distance_m) == (Decimal("19.5"), Decimal(40))


async def test_a_session_finalized_in_a_later_batch_loads_back_with_its_fixed_record(
    store, ingestion
):
    bike = bike_id()
    begun = start(bike)
    await commit(ingestion, begun, sample(begun, 1, "1000", distance="500"))
    events = await commit(
        ingestion, sample(begun, 2, "234.5"), end(begun, last_seq=2), now=NOW + timedelta(seconds=1)
    )
    (finalized,) = finalized_events(events)

    async with store.pool.acquire() as conn:
        active, _ = await store.load_bikes(conn, [bike])
        (loaded,) = await store.load_sessions(conn, [begun.session_id])

    assert active == {}
    assert loaded.finalized == finalized.session
    assert finalized.session.energy_wh == Decimal("1234.5")
    assert loaded.seqs == SeqRanges(((1, 2),))


async def test_an_abandoned_session_is_finalized_by_the_sweep_without_an_end(store, ingestion):
    bike = bike_id()
    begun = start(bike)
    await commit(ingestion, begun, sample(begun, 1, "3"))

    events = await ingestion.expire([bike], NOW + timedelta(hours=25))

    (finalized,) = finalized_events(events)
    async with store.pool.acquire() as conn:
        (loaded,) = await store.load_sessions(conn, [begun.session_id])
    assert finalized.session.end_reason is EndReason.TIMED_OUT
    assert loaded.end is None
    assert loaded.finalized == finalized.session


async def test_a_start_waiting_out_the_grace_period_commits_with_the_old_sessions_finalization(
    store, ingestion
):
    bike = bike_id()
    first = start(bike)
    await commit(ingestion, first, end(first, last_seq=1))
    second = start(bike, at=T0 + timedelta(minutes=40))
    await commit(ingestion, second, now=NOW + timedelta(seconds=1))  # waits for sample 1
    ingestion.reset()  # whichever instance runs the sweep decides from the store alone
    await ingestion.expire([bike], NOW + timedelta(seconds=6))

    async with store.pool.acquire() as conn:
        active, _ = await store.load_bikes(conn, [bike])
        (old,) = await store.load_sessions(conn, [first.session_id])

    assert active[bike].session_id == second.session_id
    assert old.finalized is not None
    assert old.finalized.missing_samples == 1


async def test_a_redelivered_sample_is_told_from_a_clash_by_loading_only_that_sample(
    store, ingestion
):
    bike = bike_id()
    begun = start(bike)
    once = sample(begun, 1, "10")
    await commit(ingestion, begun, once)
    ingestion.reset()  # a restart: the cache is empty, the store has the summary

    (dup,) = (await commit_settled(ingestion, once))[0]
    (clash,) = (await commit_settled(ingestion, sample(begun, 1, "11")))[0]

    assert dup.outcome is Outcome.DUPLICATE
    assert clash.rejection.reason == "session_id_conflict"


async def test_committing_a_finalized_session_writes_one_finalized_outbox_row(ingestion, conn):
    bike = bike_id()
    session_id = await commit_finalized_ride(ingestion, bike)

    rows = await outbox_rows(conn, f"{PREFIX}/bikes/{bike}/sessions/finalized")

    assert [r["event"] for r in rows] == ["session_finalized"]
    document = json.loads(rows[0]["payload"])
    assert document["session_id"] == str(session_id)
    assert document["energy_wh"] == "1234.5"


async def test_committing_a_finalized_ride_of_1234_5_wh_writes_one_billing_row_of_0_37(
    ingestion, conn
):
    bike = bike_id()
    session_id = await commit_finalized_ride(ingestion, bike)

    rows = await outbox_rows(conn, f"{PREFIX}/bikes/{bike}/billing")

    assert [r["event"] for r in rows] == ["billing"]
    document = json.loads(rows[0]["payload"])
    assert document["session_id"] == str(session_id)
    assert document["billable_energy_wh"] == "1234.5"
    assert (document["amount"], document["currency"]) == ("0.37", "EUR")


# -- several writers -------------------------------------------------------------------------


async def test_two_instances_writing_one_bike_in_turn_keep_exact_totals(store, pricing):
    first, second = new_ingestion(store, pricing), new_ingestion(store, pricing)
    bike = bike_id()
    begun = start(bike)
    await commit(first, begun)
    for seq in range(1, 11):  # round robin, as a shared subscription spreads them
        await commit(first if seq % 2 else second, sample(begun, seq, "1.5"))
    events = await commit(second, end(begun, 10), now=NOW + timedelta(seconds=1))

    (record,) = [e.session for e in finalized_events(events)]
    assert (record.energy_wh, record.telemetry_count, record.missing_samples) == (
        Decimal(15),
        10,
        0,
    )


async def test_a_sample_waiting_on_one_instance_is_applied_where_its_start_arrives(
    store, pricing, conn
):
    first, second = new_ingestion(store, pricing), new_ingestion(store, pricing)
    bike = bike_id()
    begun = start(bike)
    (early,), _ = await commit_settled(first, sample(begun, 1, "42"))
    assert early.outcome is Outcome.DEFERRED
    assert await conn.fetchval("SELECT count(*) FROM waiting_messages WHERE bike_id = $1", bike)

    await commit(second, begun, now=NOW + timedelta(seconds=1))

    async with store.pool.acquire() as c:
        active, waiting = await store.load_bikes(c, [bike])
    assert (active[bike].energy_wh, waiting) == (Decimal(42), [])


async def test_a_waiting_message_whose_grace_ran_out_is_kept_and_answered_as_a_rejection(
    store, ingestion, conn
):
    bike = bike_id()
    orphan = sample(start(bike), 1)
    await commit(ingestion, orphan)

    events = await ingestion.expire([bike], NOW + timedelta(seconds=6))

    assert [e.reason for e in events if isinstance(e, DeferredMessageSettled)] == [
        "unknown_session"
    ]
    kept = await conn.fetchrow("SELECT * FROM rejected_messages WHERE bike_id = $1", bike)
    assert (kept["reason"], kept["telemetry_id"]) == (
        "unknown_session",
        orphan.sample.telemetry_id,
    )
    answers = await outbox_rows(conn, f"{PREFIX}/bikes/{bike}/rejections")
    assert [json.loads(r["payload"])["reason"] for r in answers] == ["unknown_session"]
    assert not await conn.fetchval("SELECT count(*) FROM waiting_messages WHERE bike_id = $1", bike)


async def test_a_writer_holding_a_bike_makes_another_wait_until_it_commits(store, pool):
    bike = bike_id()
    async with pool.acquire() as holder, pool.acquire() as other:
        async with holder.transaction():
            (version,) = (await store.lock_bikes(holder, [bike])).values()
            async with other.transaction():
                await other.execute("SET LOCAL lock_timeout = '200ms'")
                with pytest.raises(asyncpg.LockNotAvailableError):
                    await store.lock_bikes(other, [bike])
        assert await store.lock_bikes(other, [bike]) == {bike: version + 1}


# -- sessions due for expiry -----------------------------------------------------------------


async def test_due_bikes_include_a_bike_whose_end_grace_ran_out(store, ingestion):
    bike = await commit_bike(
        ingestion, heard_at=NOW, end_received_at=GRACE_CUTOFF - timedelta(seconds=1)
    )

    assert bike in await store.due_bikes(GRACE_CUTOFF, ABANDON_CUTOFF)


async def test_due_bikes_include_a_bike_that_went_dark(store, ingestion):
    bike = await commit_bike(
        ingestion, heard_at=ABANDON_CUTOFF - timedelta(seconds=1), end_received_at=None
    )

    assert bike in await store.due_bikes(GRACE_CUTOFF, ABANDON_CUTOFF)
    # Looked for only when asked (every 30 s): the look scans every Active session.
    assert bike not in await store.due_bikes(GRACE_CUTOFF)


async def test_a_samples_summary_update_touches_no_index(store, ingestion, pool):
    bike = await commit_bike(ingestion, heard_at=GRACE_CUTOFF, end_received_at=None)
    indexed = await pool.fetchval(
        "SELECT count(*) FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'sessions'::regclass"
        " AND a.attname IN ('last_heard_at', 'energy_wh', 'distance_m', 'seq_ranges',"
        " 'telemetry_count', 'latest_emitted_at')"
    )
    fillfactor = await pool.fetchval("SELECT reloptions FROM pg_class WHERE relname = 'sessions'")
    assert bike
    assert indexed == 0  # what a sample changes is in no index: heap-only updates
    assert fillfactor == ["fillfactor=70"]  # and each page keeps room for them


async def test_a_bikes_lock_is_a_heap_only_update(pool):
    fillfactor = await pool.fetchval("SELECT reloptions FROM pg_class WHERE relname = 'bikes'")
    indexed = await pool.fetchval(
        "SELECT count(*) FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'bikes'::regclass"
        " AND a.attname = 'version'"
    )
    assert (fillfactor, indexed) == (["fillfactor=50"], 0)


def _telemetry_line(session_id: uuid.UUID, bike: str, seq: int) -> str:
    at = NOW.isoformat()
    return f"{uuid.uuid4().hex}\t{session_id.hex}\t{bike}\t{seq}\t{at}\t1\t\\N\t\\N\t{at}\n"


async def _copy_telemetry(conn: Any, *lines: str) -> None:
    async def source() -> AsyncIterator[bytes]:
        yield "".join(lines).encode()

    await conn.copy_to_table(
        "telemetry", source=source(), format="text",
        columns=["telemetry_id", "session_id", "bike_id", "seq", "emitted_at", "energy_wh",
                 "distance_m", "soc_pct", "received_at"],
    )  # fmt: skip


@pytest.mark.parametrize("which", ["finalized", "unknown"])
async def test_a_copy_naming_a_session_not_active_is_refused_whole(ingestion, pool, which):
    """The schema's own guard, whatever writes: one sample of a finalized or unknown session
    refuses the whole statement, the Active session's sample beside it included."""
    done, active = start(bike_id()), start(bike_id())
    await commit(ingestion, done, sample(done, 1, "1"), end(done, 1), active)
    stray = done.session_id if which == "finalized" else uuid.uuid4()
    before = await pool.fetchval("SELECT count(*) FROM telemetry")

    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="not active"):
            await _copy_telemetry(
                conn,
                _telemetry_line(active.session_id, active.bike_id, 1),
                _telemetry_line(stray, done.bike_id, 2),
            )
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match=str(stray)):
            await conn.execute(
                "INSERT INTO telemetry (telemetry_id, session_id, bike_id, seq, emitted_at,"
                " energy_wh, received_at) VALUES ($1, $2, $3, 2, $4, 1, $4)",
                uuid.uuid4(), stray, done.bike_id, NOW,
            )  # fmt: skip

    assert await pool.fetchval("SELECT count(*) FROM telemetry") == before
    await _copy_telemetry(pool, _telemetry_line(active.session_id, active.bike_id, 1))


async def test_sessions_cannot_be_truncated(pool):
    """No foreign key holds a sample to its session any more (the statement guard checks it
    when the sample is added): sessions are never deleted, so never truncated either."""
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="cannot be truncated"):
        await pool.execute("TRUNCATE sessions CASCADE")


async def test_due_bikes_leave_out_fresh_bikes(store, ingestion):
    heard = await commit_bike(ingestion, heard_at=GRACE_CUTOFF, end_received_at=None)
    ending = await commit_bike(
        ingestion, heard_at=GRACE_CUTOFF, end_received_at=GRACE_CUTOFF + timedelta(seconds=1)
    )

    due = await store.due_bikes(GRACE_CUTOFF, ABANDON_CUTOFF)

    assert heard not in due
    assert ending not in due


# -- rejections ------------------------------------------------------------------------------


async def test_a_redelivered_rejected_message_is_kept_once(ingestion, conn):
    message = rejected(bike_id())

    await ingestion.commit_batch([message])
    await ingestion.commit_batch([message])

    kept = await conn.fetchval(
        "SELECT count(*) FROM rejected_messages WHERE topic = $1", message.topic
    )
    assert kept == 1


async def test_a_repeated_rejected_message_is_answered_every_time(ingestion, conn):
    bike = bike_id()
    message = rejected(bike)

    await ingestion.commit_batch([message])
    await ingestion.commit_batch([message])

    rows = await outbox_rows(conn, f"{PREFIX}/bikes/{bike}/rejections")
    assert [r["event"] for r in rows] == ["rejection", "rejection"]
    for row in rows:
        document = json.loads(row["payload"])
        assert (document["topic"], document["reason"]) == (message.topic, "malformed_json")


async def test_a_rejected_payload_is_stored_capped_with_its_real_size(ingestion, conn):
    message = rejected(bike_id(), payload=b"x" * 5000)

    await ingestion.commit_batch([message])

    row = await conn.fetchrow(
        "SELECT payload, payload_size FROM rejected_messages WHERE topic = $1", message.topic
    )
    assert (row["payload"], row["payload_size"]) == (b"x" * 4096, 5000)


async def test_rejected_payloads_that_differ_only_beyond_the_cap_are_both_kept(ingestion, conn):
    bike = bike_id()

    await ingestion.commit_batch([rejected(bike, payload=b"x" * 5000 + b"1")])
    await ingestion.commit_batch([rejected(bike, payload=b"x" * 5000 + b"2")])

    kept = await conn.fetchval(
        "SELECT count(*) FROM rejected_messages WHERE topic = $1", rejected(bike).topic
    )
    assert kept == 2


async def test_a_rejected_message_without_a_bike_is_kept_but_not_answered(ingestion, conn):
    topic = f"elsewhere/{uuid.uuid4().hex}"

    await ingestion.commit_batch([rejected(None, topic=topic)])

    kept = await conn.fetchval("SELECT count(*) FROM rejected_messages WHERE topic = $1", topic)
    answered = await conn.fetchval(
        "SELECT count(*) FROM outbox WHERE event = 'rejection'"
        " AND position($1 IN convert_from(payload, 'UTF8')) > 0",
        topic,
    )
    assert (kept, answered) == (1, 0)


# -- the outbox ------------------------------------------------------------------------------


async def test_pending_outbox_returns_rows_in_id_order(store, ingestion, conn):
    bikes = [bike_id(), bike_id()]
    for bike in bikes:
        await commit_finalized_ride(ingestion, bike)
    mine = [
        r.id
        for r in await OutboxStore(store.pool).pending(conn, PENDING_LIMIT)
        if is_of(r.topic, bikes)
    ]
    # Rewrite the oldest row so that it sits last in the table, and read the table in its own
    # order: only ORDER BY puts that row first again, whatever plan PostgreSQL would pick.
    await conn.execute("UPDATE outbox SET payload = payload WHERE id = $1", min(mine))
    async with conn.transaction():
        await conn.execute("SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off")
        pending = [r.id for r in await OutboxStore(store.pool).pending(conn, PENDING_LIMIT)]

    assert len(mine) == 4
    assert pending == sorted(pending)
    assert [i for i in pending if i in mine] == sorted(mine)


async def test_marking_rows_published_takes_them_out_of_the_pending_set(store, ingestion, conn):
    bike = bike_id()
    await commit_finalized_ride(ingestion, bike)
    mine = {
        r.id
        for r in await OutboxStore(store.pool).pending(conn, PENDING_LIMIT)
        if is_of(r.topic, [bike])
    }
    assert len(mine) == 2

    await OutboxStore(store.pool).mark_published(conn, sorted(mine), NOW)

    assert await pending_ids(store, conn, mine) == []


async def test_outbox_pending_count_counts_rows_until_they_are_published(store, ingestion, conn):
    before = await OutboxStore(store.pool).pending_count()
    bike = bike_id()
    await commit_finalized_ride(ingestion, bike)
    after_commit = await OutboxStore(store.pool).pending_count()
    first, _ = sorted(
        r.id
        for r in await OutboxStore(store.pool).pending(conn, PENDING_LIMIT)
        if is_of(r.topic, [bike])
    )

    await OutboxStore(store.pool).mark_published(conn, [first], NOW)

    assert (after_commit, await OutboxStore(store.pool).pending_count()) == (before + 2, before + 1)


# -- pricing versions ------------------------------------------------------------------------


async def test_a_recorded_version_is_kept_and_the_same_prices_written_differently_pass(store):
    version = f"v-{uuid.uuid4().hex[:6]}"
    pricing = parse_pricing(PRICES.format(version=version, ride="0.30"))
    relaid = parse_pricing("# relaid\n" + PRICES.format(version=version, ride="0.30"))
    changed = parse_pricing(PRICES.format(version=version, ride="0.31"))

    first = await PricingRecords(store.pool).record(pricing, NOW)
    again = await PricingRecords(store.pool).record(relaid, NOW + timedelta(days=1))
    refused = await PricingRecords(store.pool).record(changed, NOW + timedelta(days=2))

    assert first == again == pricing
    assert refused is None
    history, first_used = await PricingRecords(store.pool).history()
    assert history.rules(version) == pricing
    assert first_used[version] == NOW


async def test_sessions_finalized_before_versions_were_kept_get_their_published_version(
    spare_database_url, pricing
):
    await ensure_database(spare_database_url)
    conn = await asyncpg.connect(spare_database_url)
    folder = resources.files("daemon.db").joinpath("migrations")
    try:
        for name in ("001_initial", "002_scale_safe_sessions"):
            await conn.execute(folder.joinpath(f"{name}.sql").read_text())
        await conn.execute(
            "CREATE TABLE schema_migrations (name text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now());"
            " INSERT INTO schema_migrations (name) VALUES ('001_initial'),"
            " ('002_scale_safe_sessions')"
        )
        billed, unbilled = uuid.uuid4(), uuid.uuid4()
        for n, session_id in enumerate((billed, unbilled)):
            bike = f"bike-old-{n}"
            await conn.execute("INSERT INTO bikes (bike_id) VALUES ($1)", bike)
            await conn.execute(
                "INSERT INTO sessions (session_id, bike_id, kind, party_id, started_at,"
                " received_at, last_heard_at, state, ended_at, missing_samples, end_reason,"
                " finalized_at) VALUES ($1, $2, 'ride', 'r', $3, $3, $3, 'finalized', $3, 0,"
                " 'ended', $3)",
                session_id,
                bike,
                T0,
            )
        await conn.execute(
            "INSERT INTO outbox (created_at, event, topic, payload) VALUES ($1, 'billing', 't', $2)",
            NOW,
            json.dumps({"session_id": str(billed), "pricing_version": "2026-01"}).encode(),
        )
        await migrate(conn)
        # An older version was recorded first (by another instance, say).
        await conn.execute(
            "INSERT INTO pricing_versions (version, content, first_used_at) VALUES ($1, $2, $3)",
            "2025-12",
            canonical_pricing(pricing).replace('"version":"2026-01"', '"version":"2025-12"'),
            T0,
        )
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(spare_database_url, min_size=1, max_size=2)
    try:
        assert await PricingRecords(pool).record(pricing, NOW) == pricing
        named = {
            r["session_id"]: r["pricing_version"]
            for r in await pool.fetch("SELECT session_id, pricing_version FROM sessions")
        }
        validated = await pool.fetchval(
            "SELECT convalidated FROM pg_constraint"
            " WHERE conname = 'finalized_sessions_name_their_pricing'"
        )
        with pytest.raises(asyncpg.IntegrityConstraintViolationError):
            await pool.execute(
                "UPDATE sessions SET pricing_version = '2025-12' WHERE session_id = $1", billed
            )
    finally:
        await pool.close()
    assert named == {billed: "2026-01", unbilled: "2025-12"}
    assert validated is True


async def test_a_telemetry_id_another_session_holds_is_a_conflict_not_a_refused_batch(
    ingestion, pool
):
    first, second = start(bike_id()), start(bike_id())
    shared = uuid.uuid4()
    at = T0 + timedelta(seconds=5)
    await commit(ingestion, first, second, sample(first, 1, "7", at=at, telemetry_id=shared))

    settled, _ = await commit_settled(
        ingestion,
        sample(second, 1, "9", at=at, telemetry_id=shared),  # claimed by another session
        sample(second, 2, "4"),
    )

    assert settled[0].rejection is not None
    assert settled[0].rejection.reason == "session_id_conflict"
    assert f"already sample 1 of session {first.session_id}" in settled[0].rejection.detail
    assert settled[1].outcome is Outcome.ACCEPTED
    energy = await pool.fetchval(
        "SELECT energy_wh FROM sessions WHERE session_id = $1", second.session_id
    )
    assert energy == Decimal(4)


async def test_two_sessions_claiming_one_telemetry_id_in_one_batch_keep_the_first(ingestion, pool):
    first, second = start(bike_id()), start(bike_id())
    shared, at = uuid.uuid4(), T0 + timedelta(seconds=5)
    await commit(ingestion, first, second)

    settled, _ = await commit_settled(
        ingestion,
        sample(first, 1, "7", at=at, telemetry_id=shared),
        sample(second, 1, "9", at=at, telemetry_id=shared),
    )

    assert settled[0].outcome is Outcome.ACCEPTED
    assert settled[1].rejection is not None
    assert settled[1].rejection.reason == "session_id_conflict"
    rows = await pool.fetch("SELECT session_id FROM telemetry WHERE telemetry_id = $1", shared)
    assert [r["session_id"] for r in rows] == [first.session_id]


async def test_one_batch_of_starts_gives_each_rider_one_pseudonym_and_a_charge_its_station(
    ingestion, conn
):
    rider, other = f"rider-{uuid.uuid4().hex[:8]}", f"rider-{uuid.uuid4().hex[:8]}"
    earlier = start(bike_id(), party=other)
    await commit(ingestion, earlier)
    starts = [
        start(bike_id(), party=rider),
        start(bike_id(), party=other),
        start(bike_id(), party=rider),
        start(bike_id(), SessionKind.CHARGING, party="station-9"),
    ]
    await commit(ingestion, *starts)

    rows = await conn.fetch(
        "SELECT session_id, kind, party_id FROM sessions WHERE session_id = ANY($1::uuid[])",
        [s.session_id for s in [earlier, *starts]],
    )
    party = {row["session_id"]: row["party_id"] for row in rows}
    mapped = dict(
        await conn.fetch(
            "SELECT rider_id, pseudonym FROM riders WHERE rider_id = ANY($1::text[])",
            [rider, other],
        )
    )
    assert set(mapped) == {rider, other}
    assert party[starts[0].session_id] == party[starts[2].session_id] == mapped[rider]
    assert party[starts[1].session_id] == party[earlier.session_id] == mapped[other]
    assert party[starts[3].session_id] == "station-9"
    assert rider not in party.values() and other not in party.values()
