"""CHARGEFLOW_TIMESCALEDB=auto|on|off against the real PostgreSQL at hand.

Which case a server is in depends on the server: without the extension's files (this project's
CI) the plain case; installed but not preloaded (right after installing the package); usable.
Each test states what must hold in whichever case it meets, from what the server says.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import asyncpg
import pytest

from daemon.db.migrate import TIMESCALE_STEP, TimescaleUnavailable, migrate, timescale_problem

pytestmark = pytest.mark.integration


async def _hypertable(conn: asyncpg.Connection) -> bool:
    if not await conn.fetchval("SELECT to_regclass('timescaledb_information.hypertables')"):
        return False
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM timescaledb_information.hypertables"
            " WHERE hypertable_name = 'telemetry'"
        )
    )


async def test_auto_uses_the_extension_exactly_when_it_can_be_loaded(fresh):
    problem = await timescale_problem(fresh)

    applied = await migrate(fresh, timescaledb="auto")

    assert (TIMESCALE_STEP in applied) == (problem is None)
    assert await _hypertable(fresh) == (problem is None)
    assert await fresh.fetchval("SELECT count(*) FROM telemetry") == 0  # the schema is there


async def test_on_refuses_in_one_line_what_to_fix_when_the_extension_cannot_be_loaded(fresh):
    problem = await timescale_problem(fresh)
    if problem is None:
        assert TIMESCALE_STEP in await migrate(fresh, timescaledb="on")
        return

    with pytest.raises(TimescaleUnavailable) as refused:
        await migrate(fresh, timescaledb="on")

    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("CHARGEFLOW_TIMESCALEDB=on, but the timescaledb extension is")
    assert ("shared_preload_libraries" in message) == ("preloaded" in problem)
    # Nothing was half-applied: the refusal comes before any migration.
    assert await fresh.fetchval("SELECT to_regclass('schema_migrations')") is None


async def test_off_never_touches_the_extension(fresh):
    applied = await migrate(fresh, timescaledb="off")

    assert TIMESCALE_STEP not in applied
    assert not await fresh.fetchval(
        "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
    )


async def test_plain_tables_move_to_a_hypertable_once_the_extension_is_usable(fresh):
    """Migrating off, then auto: the same as an operator preloading the extension later."""
    await migrate(fresh, timescaledb="off")
    problem = await timescale_problem(fresh)

    applied = await migrate(fresh, timescaledb="auto")

    assert applied == ([TIMESCALE_STEP] if problem is None else [])
    assert await _hypertable(fresh) == (problem is None)


async def test_stored_sessions_keep_their_telemetry_and_guards_when_moved_to_a_hypertable(
    fresh, fresh_url
):
    """An operator ran on plain tables for a while, then preloaded TimescaleDB: finalized and
    Active sessions' samples move into chunks, and the append-only guard still holds."""
    from daemon.db.pricing import PricingRecords
    from daemon.db.store import Store
    from tests.builders import bike_id, end, sample, start
    from tests.conftest import shipped_pricing
    from tests.integration.test_store import NOW, commit, new_ingestion

    await migrate(fresh, timescaledb="off")
    pool = await asyncpg.create_pool(fresh_url, min_size=1, max_size=2)
    try:
        store = Store(pool)
        await PricingRecords(store.pool).record(shipped_pricing(), NOW)
        ingestion = new_ingestion(store, shipped_pricing())
        done, active = start(bike_id()), start(bike_id())
        await commit(ingestion, done, sample(done, 1, "1.5"), sample(done, 2, "2"), end(done, 2))
        await ingestion.expire([done.bike_id], NOW + timedelta(minutes=5))
        await commit(ingestion, active, sample(active, 1, "4"))
        problem = await timescale_problem(fresh)

        applied = await migrate(fresh, timescaledb="auto")

        assert applied == ([TIMESCALE_STEP] if problem is None else [])
        assert await _hypertable(fresh) == (problem is None)
        sums = dict(await fresh.fetch(
            "SELECT session_id, sum(energy_wh) FROM telemetry GROUP BY session_id"))  # fmt: skip
        assert sums == {done.session_id: Decimal("3.5"), active.session_id: Decimal(4)}
        with pytest.raises(asyncpg.PostgresError, match="not active"):
            await fresh.execute(
                "INSERT INTO telemetry (telemetry_id, session_id, bike_id, seq, emitted_at,"
                " energy_wh, received_at) VALUES ($1, $2, $3, 3, $4, 1, $4)",
                uuid.uuid4(), done.session_id, done.bike_id, NOW,
            )  # fmt: skip
        ingestion.reset()
        await commit(ingestion, sample(active, 2, "1"))  # the Active one goes on taking samples
        assert await fresh.fetchval(
            "SELECT energy_wh FROM sessions WHERE session_id = $1", active.session_id
        ) == Decimal(5)
    finally:
        await pool.close()
