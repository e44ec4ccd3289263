"""How the schema's own checks read PostgreSQL, whatever its statistics say.

A server without autovacuum (this project's CI machine, or one whose operator turned it off)
plans from no statistics at all; one with it plans from a sessions table that is nearly all
finalized. Either way a check run on every batch must not come to read every Active session.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from daemon.db.migrate import migrate
from tests.integration.test_store import _copy_telemetry, _telemetry_line

pytestmark = pytest.mark.integration

ACTIVE = 10_000
# Samples of one COPY, each of a different session: a large fleet's batches.
BATCHES = (100, 600, 600)


async def _scans(conn: asyncpg.Connection) -> dict[str, int]:
    """Scans of sessions so far, by index (this backend's counts, flushed first)."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = await conn.fetch(
        "SELECT indexrelname, idx_scan FROM pg_stat_user_indexes WHERE relname = 'sessions'"
        " UNION ALL SELECT 'sequential', seq_scan FROM pg_stat_user_tables"
        " WHERE relname = 'sessions'"
    )
    return {r["indexrelname"]: r["idx_scan"] for r in rows}


async def test_the_telemetry_guard_reads_each_added_samples_session_by_its_key(fresh):
    """The guard once let the planner read every Active session and compare each added
    sample with each of them (a nested loop over the partial index of Active sessions,
    chosen from no statistics: 151 ms for a COPY of 600 at 10,000 Active sessions); it reads
    each sample's session by its primary key, one lookup each, and nothing else."""
    await migrate(fresh)
    now = datetime.now(UTC)
    bikes = [f"plan-{i}" for i in range(ACTIVE)]
    sessions = [uuid.uuid4() for _ in bikes]
    await fresh.execute("INSERT INTO bikes (bike_id) SELECT unnest($1::text[])", bikes)
    await fresh.execute(
        "INSERT INTO sessions (session_id, bike_id, kind, party_id, started_at, received_at,"
        " last_heard_at) SELECT unnest($1::uuid[]), unnest($2::text[]), 'charging', 'st-1',"
        " $3, $3, $3",
        sessions, bikes, now,
    )  # fmt: skip
    first = 0
    for added in BATCHES:
        before = await _scans(fresh)
        await _copy_telemetry(
            fresh,
            *(_telemetry_line(sessions[i], bikes[i], 1) for i in range(first, first + added)),
        )
        first += added
        after = await _scans(fresh)
        scans = {name: after[name] - before[name] for name in after}
        assert scans.pop("sessions_pkey") == added, scans
        assert set(scans.values()) == {0}, f"the guard scanned sessions otherwise: {scans}"
