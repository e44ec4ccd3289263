"""The store and the schema against a real PostgreSQL: migrations, invariants, round trips."""

from __future__ import annotations

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
from daemon.db.store import RejectedMessage, Store
from daemon.mqtt.schemas import Rejection
from domain.billing import PricingRules, parse_pricing
from domain.commands import Command
from domain.events import SessionFinalized
from domain.fleet import Fleet
from domain.session import Session
from domain.session_values import EndReason
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
}


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pricing() -> PricingRules:
    text = resources.files("daemon").joinpath("pricing.toml").read_text()
    return parse_pricing(text, "daemon/pricing.toml")


@pytest.fixture
def store(pool: asyncpg.Pool, pricing: PricingRules) -> Store:
    return Store(pool, PREFIX, pricing)


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


def handle(fleet: Fleet, command: Command, now: datetime = NOW) -> None:
    if command.bike_id not in fleet.bikes:
        fleet.load_bike(command.bike_id, None)
    fleet.handle(command, now)


def snapshot(session: Session) -> tuple[Any, ...]:
    """Everything a session is made of, so that two sessions compare by value."""
    return (
        type(session),
        session.session_id,
        session.bike_id,
        session.party_id,
        session.started_at,
        session.last_heard_at,
        session.end,
        session.samples,
        session.finalized,
        session.state,
    )


def finalized_events(events: list[Any]) -> list[SessionFinalized]:
    return [e for e in events if isinstance(e, SessionFinalized)]


async def commit_finalized_ride(store: Store, bike: str) -> uuid.UUID:
    """A ride of 1000 + 234.5 Wh, ended and complete, committed in one batch."""
    fleet = Fleet()
    begun = start(bike)
    for command in (begun, sample(begun, 1, "1000"), sample(begun, 2, "234.5"), end(begun, 2)):
        handle(fleet, command)
    await store.commit(fleet.pop_events(), [])
    return begun.session_id


async def commit_bike(store: Store, heard_at: datetime, end_received_at: datetime | None) -> str:
    """A bike whose Active session was last heard at `heard_at`, its end pending or not."""
    bike = bike_id()
    fleet = Fleet()
    begun = start(bike)
    handle(fleet, begun, now=heard_at)
    if end_received_at is not None:
        handle(fleet, end(begun, last_seq=1), now=end_received_at)
    await store.commit(fleet.pop_events(), [])
    return bike


async def insert_active(conn: Any, bike: str) -> uuid.UUID:
    session_id = uuid.uuid4()
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
        " telemetry_count = 0, missing_samples = 0, end_reason = 'ended', finalized_at = $2"
        " WHERE session_id = $1",
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


def rejected(
    bike: str | None, payload: bytes = b'{"seq": ', topic: str | None = None
) -> RejectedMessage:
    topic = topic or f"{PREFIX}/bikes/{bike}/telemetry"
    return RejectedMessage(
        Rejection(topic, bike, "malformed_json", "payload is not JSON"), payload, NOW
    )


async def outbox_rows(conn: Any, topic: str) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM outbox WHERE topic = $1 ORDER BY id", topic)


def is_of(topic: str, bikes: list[str]) -> bool:
    return any(topic.startswith(f"{PREFIX}/bikes/{bike}/") for bike in bikes)


async def pending_ids(store: Store, conn: Any, ids: set[int]) -> list[int]:
    return [r.id for r in await store.pending_outbox(conn, PENDING_LIMIT) if r.id in ids]


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


@pytest.mark.parametrize("missing", sorted(FIXED_TOTALS))
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


async def test_a_finalized_session_with_its_totals_is_accepted(conn):
    columns = ", ".join(FIXED_TOTALS)
    values = ", ".join(f"${i}" for i in range(4, 4 + len(FIXED_TOTALS)))
    session_id = uuid.uuid4()

    await conn.execute(
        "INSERT INTO sessions (session_id, bike_id, started_at, kind, party_id, state,"
        f" received_at, last_heard_at, {columns}) VALUES ($1, $2, $3, 'ride', 'rider-1',"
        f" 'finalized', $3, $3, {values})",
        session_id,
        bike_id(),
        T0,
        *FIXED_TOTALS.values(),
    )

    state = await conn.fetchval("SELECT state FROM sessions WHERE session_id = $1", session_id)
    assert state == "finalized"


# -- committing and loading ------------------------------------------------------------------


async def test_an_active_session_with_its_end_pending_loads_back_equal(store):
    bike = bike_id()
    fleet = Fleet()
    begun = start(bike)
    handle(fleet, begun)
    handle(fleet, sample(begun, 1, "12.5", distance="40", soc="81"))
    handle(fleet, sample(begun, 2, "7"), now=NOW + timedelta(seconds=1))
    handle(fleet, end(begun, last_seq=3), now=NOW + timedelta(seconds=2))
    await store.commit(fleet.pop_events(), [])

    by_bike, _ = await store.load([bike], [begun.session_id])

    loaded = by_bike[bike]
    assert loaded is not None
    assert loaded.end is not None
    assert snapshot(loaded) == snapshot(fleet.sessions[begun.session_id])


async def test_a_sample_heard_minutes_later_moves_the_stored_last_heard_at(store):
    # Minutes, not seconds: the store may skip rewriting last_heard_at for a few seconds' news.
    bike = bike_id()
    fleet = Fleet()
    begun = start(bike)
    handle(fleet, begun)
    handle(fleet, sample(begun, 1), now=NOW + timedelta(seconds=1))
    handle(fleet, sample(begun, 2), now=NOW + timedelta(minutes=10))
    await store.commit(fleet.pop_events(), [])

    by_bike, _ = await store.load([bike], [])

    loaded = by_bike[bike]
    assert loaded is not None
    assert loaded.last_heard_at == NOW + timedelta(minutes=10)


async def test_a_session_finalized_in_a_later_batch_loads_back_equal_to_its_finalized_event(store):
    bike = bike_id()
    fleet = Fleet()
    begun = start(bike)
    handle(fleet, begun)
    handle(fleet, sample(begun, 1, "1000", distance="500"))
    await store.commit(fleet.pop_events(), [])
    handle(fleet, sample(begun, 2, "234.5"), now=NOW + timedelta(seconds=1))
    handle(fleet, end(begun, last_seq=2), now=NOW + timedelta(seconds=2))
    events = fleet.pop_events()
    (finalized,) = finalized_events(events)
    await store.commit(events, [])

    by_bike, named = await store.load([bike], [begun.session_id])

    assert by_bike == {bike: None}
    (loaded,) = named
    assert loaded.finalized == finalized.session
    assert snapshot(loaded) == snapshot(fleet.sessions[begun.session_id])


async def test_an_abandoned_session_loads_back_finalized_without_an_end(store):
    bike = bike_id()
    fleet = Fleet()
    begun = start(bike)
    handle(fleet, begun)
    handle(fleet, sample(begun, 1, "3"))
    await store.commit(fleet.pop_events(), [])
    (finalized,) = fleet.expire(NOW + timedelta(hours=25))
    await store.commit(fleet.pop_events(), [])

    _, (loaded,) = await store.load([], [begun.session_id])

    assert finalized.session.end_reason is EndReason.TIMED_OUT
    assert loaded.end is None
    assert loaded.finalized == finalized.session


async def test_a_start_during_the_grace_period_commits_with_the_old_sessions_finalization(store):
    bike = bike_id()
    fleet = Fleet()
    first = start(bike)
    handle(fleet, first)
    handle(fleet, end(first, last_seq=1))
    await store.commit(fleet.pop_events(), [])
    second = start(bike, at=T0 + timedelta(minutes=40))
    handle(fleet, second, now=NOW + timedelta(seconds=1))
    await store.commit(fleet.pop_events(), [])

    by_bike, (old,) = await store.load([bike], [first.session_id])

    active = by_bike[bike]
    assert active is not None
    assert active.session_id == second.session_id
    assert old.finalized is not None


async def test_committing_a_finalized_session_writes_one_finalized_outbox_row(store, conn):
    bike = bike_id()
    session_id = await commit_finalized_ride(store, bike)

    rows = await outbox_rows(conn, f"{PREFIX}/bikes/{bike}/sessions/finalized")

    assert [r["event"] for r in rows] == ["session_finalized"]
    document = json.loads(rows[0]["payload"])
    assert document["session_id"] == str(session_id)
    assert document["energy_wh"] == "1234.5"


async def test_committing_a_finalized_ride_of_1234_5_wh_writes_one_billing_row_of_0_37(store, conn):
    bike = bike_id()
    session_id = await commit_finalized_ride(store, bike)

    rows = await outbox_rows(conn, f"{PREFIX}/bikes/{bike}/billing")

    assert [r["event"] for r in rows] == ["billing"]
    document = json.loads(rows[0]["payload"])
    assert document["session_id"] == str(session_id)
    assert document["billable_energy_wh"] == "1234.5"
    assert (document["amount"], document["currency"]) == ("0.37", "EUR")


# -- sessions due for expiry -----------------------------------------------------------------


async def test_due_bikes_include_a_bike_whose_end_grace_ran_out(store):
    bike = await commit_bike(
        store, heard_at=NOW, end_received_at=GRACE_CUTOFF - timedelta(seconds=1)
    )

    assert bike in await store.due_bikes(GRACE_CUTOFF, ABANDON_CUTOFF, loaded=[])


async def test_due_bikes_include_a_bike_that_went_dark(store):
    bike = await commit_bike(
        store, heard_at=ABANDON_CUTOFF - timedelta(seconds=1), end_received_at=None
    )

    assert bike in await store.due_bikes(GRACE_CUTOFF, ABANDON_CUTOFF, loaded=[])


async def test_due_bikes_leave_out_bikes_already_loaded(store):
    ended = await commit_bike(
        store, heard_at=NOW, end_received_at=GRACE_CUTOFF - timedelta(seconds=1)
    )
    dark = await commit_bike(
        store, heard_at=ABANDON_CUTOFF - timedelta(seconds=1), end_received_at=None
    )

    due = await store.due_bikes(GRACE_CUTOFF, ABANDON_CUTOFF, loaded=[ended, dark])

    assert ended not in due
    assert dark not in due


async def test_due_bikes_leave_out_fresh_bikes(store):
    heard = await commit_bike(store, heard_at=GRACE_CUTOFF, end_received_at=None)
    ending = await commit_bike(
        store, heard_at=GRACE_CUTOFF, end_received_at=GRACE_CUTOFF + timedelta(seconds=1)
    )

    due = await store.due_bikes(GRACE_CUTOFF, ABANDON_CUTOFF, loaded=[])

    assert heard not in due
    assert ending not in due


# -- rejections ------------------------------------------------------------------------------


async def test_a_redelivered_rejected_message_is_kept_once(store, conn):
    message = rejected(bike_id())

    await store.commit([], [message])
    await store.commit([], [message])

    kept = await conn.fetchval(
        "SELECT count(*) FROM rejected_messages WHERE topic = $1", message.rejection.topic
    )
    assert kept == 1


async def test_a_redelivered_rejected_message_is_answered_once(store, conn):
    bike = bike_id()
    message = rejected(bike)

    await store.commit([], [message])
    await store.commit([], [message])

    rows = await outbox_rows(conn, f"{PREFIX}/bikes/{bike}/rejections")
    assert [r["event"] for r in rows] == ["rejection"]
    document = json.loads(rows[0]["payload"])
    assert (document["topic"], document["reason"]) == (message.rejection.topic, "malformed_json")


async def test_a_rejected_payload_is_stored_capped_with_its_real_size(pool, pricing, conn):
    store = Store(pool, PREFIX, pricing, payload_cap=16)
    message = rejected(bike_id(), payload=b"x" * 100)

    await store.commit([], [message])

    row = await conn.fetchrow(
        "SELECT payload, payload_size FROM rejected_messages WHERE topic = $1",
        message.rejection.topic,
    )
    assert (row["payload"], row["payload_size"]) == (b"x" * 16, 100)


async def test_rejected_payloads_that_differ_only_beyond_the_cap_are_both_kept(pool, pricing, conn):
    store = Store(pool, PREFIX, pricing, payload_cap=16)
    bike = bike_id()

    await store.commit([], [rejected(bike, payload=b"x" * 100 + b"1")])
    await store.commit([], [rejected(bike, payload=b"x" * 100 + b"2")])

    kept = await conn.fetchval(
        "SELECT count(*) FROM rejected_messages WHERE topic = $1", rejected(bike).rejection.topic
    )
    assert kept == 2


async def test_a_rejected_message_without_a_bike_is_kept_but_not_answered(store, conn):
    topic = f"elsewhere/{uuid.uuid4().hex}"

    await store.commit([], [rejected(None, topic=topic)])

    kept = await conn.fetchval("SELECT count(*) FROM rejected_messages WHERE topic = $1", topic)
    answered = await conn.fetchval(
        "SELECT count(*) FROM outbox WHERE event = 'rejection'"
        " AND position($1 IN convert_from(payload, 'UTF8')) > 0",
        topic,
    )
    assert (kept, answered) == (1, 0)


# -- the outbox ------------------------------------------------------------------------------


async def test_pending_outbox_returns_rows_in_id_order(store, conn):
    bikes = [bike_id(), bike_id()]
    for bike in bikes:
        await commit_finalized_ride(store, bike)
    mine = [r.id for r in await store.pending_outbox(conn, PENDING_LIMIT) if is_of(r.topic, bikes)]
    # Rewrite the oldest row so that it sits last in the table, and read the table in its own
    # order: only ORDER BY puts that row first again, whatever plan PostgreSQL would pick.
    await conn.execute("UPDATE outbox SET payload = payload WHERE id = $1", min(mine))
    async with conn.transaction():
        await conn.execute("SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off")
        pending = [r.id for r in await store.pending_outbox(conn, PENDING_LIMIT)]

    assert len(mine) == 4
    assert pending == sorted(pending)
    assert [i for i in pending if i in mine] == sorted(mine)


async def test_marking_rows_published_takes_them_out_of_the_pending_set(store, conn):
    bike = bike_id()
    await commit_finalized_ride(store, bike)
    mine = {r.id for r in await store.pending_outbox(conn, PENDING_LIMIT) if is_of(r.topic, [bike])}
    assert len(mine) == 2

    await store.mark_published(conn, sorted(mine), NOW)

    assert await pending_ids(store, conn, mine) == []


async def test_outbox_pending_count_counts_rows_until_they_are_published(store, conn):
    before = await store.outbox_pending_count()
    bike = bike_id()
    await commit_finalized_ride(store, bike)
    after_commit = await store.outbox_pending_count()
    first, _ = sorted(
        r.id for r in await store.pending_outbox(conn, PENDING_LIMIT) if is_of(r.topic, [bike])
    )

    await store.mark_published(conn, [first], NOW)

    assert (after_commit, await store.outbox_pending_count()) == (before + 2, before + 1)
