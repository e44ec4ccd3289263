"""CHARGEFLOW_TIMESCALEDB=auto|on|off against the real PostgreSQL at hand.

Which case a server is in depends on the server: without the extension's files (this project's
CI) the plain case; installed but not preloaded (right after installing the package); usable.
Each test states what must hold in whichever case it meets, from what the server says.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from daemon.db.migrate import TIMESCALE_STEP, TimescaleUnavailable, migrate, timescale_problem

pytestmark = pytest.mark.integration


@pytest.fixture
async def fresh(postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    name = f"chargeflow_ts_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(urlunsplit(urlsplit(postgres_url)._replace(path=f"/{name}")))
    try:
        yield conn
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


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
