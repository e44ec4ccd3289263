"""Riders' personal data, erased as an operator would on request (deploy/README.md "Personal
data"): the rider leaves every table, the bills and analytics stay byte for byte the same."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from typing import Any

import asyncpg
import pytest

from daemon.db.privacy import ERASED, RiderStillActive, erase_rider
from daemon.service.replay import replay
from tests.e2e.helpers import Bike, Outbound, wait_until

pytestmark = pytest.mark.e2e


async def get(daemon: Any, path: str) -> bytes:
    url = f"http://127.0.0.1:{daemon.http.bound_port}{path}"

    def read() -> bytes:
        with urllib.request.urlopen(url, timeout=10) as response:
            return bytes(response.read())

    return await asyncio.to_thread(read)


async def tables_holding(pool: asyncpg.Pool, needle: str) -> list[str]:
    """Every table.column (text, varchar, text[], jsonb or bytea, in every base table of the
    database, hypertables' chunks included) whose value contains ``needle``."""
    columns = await pool.fetch(
        "SELECT quote_ident(c.table_schema) || '.' || quote_ident(c.table_name) AS tab,"
        " quote_ident(c.column_name) AS col, c.table_name, c.column_name, c.data_type"
        " FROM information_schema.columns c JOIN information_schema.tables t"
        " USING (table_schema, table_name)"
        " WHERE t.table_type = 'BASE TABLE'"
        " AND c.table_schema NOT IN ('pg_catalog', 'information_schema')"
        " AND c.data_type IN ('text', 'character varying', 'ARRAY', 'jsonb', 'bytea')"
    )
    found = []
    for c in columns:
        # Identifiers quoted by PostgreSQL itself; the needle is a parameter.
        if c["data_type"] == "bytea":
            where = f"position(convert_to($1, 'UTF8') IN {c['col']}) > 0"
        else:
            where = f"strpos({c['col']}::text, $1) > 0"
        if await pool.fetchval(f"SELECT count(*) FROM {c['tab']} WHERE {where}", needle):
            found.append(f"{c['table_name']}.{c['column_name']}")
    return found


async def ride(bike: Bike, rider: str, energy: list[int]) -> str:
    session_id = await bike.start(party=rider)
    for seq, wh in enumerate(energy, start=1):
        await bike.sample(session_id, seq, wh)
    await bike.end(session_id, len(energy))
    return session_id


async def test_erasing_a_rider_leaves_no_trace_and_every_bill_as_it_was(
    daemon, bike: Bike, outbound: Outbound, pool: asyncpg.Pool
):
    rider = f"rider-{uuid.uuid4().hex}"
    first = await ride(bike, rider, [120, 80])
    await outbound.wait_for(bike.bike_id, "billing", 1)
    second = await ride(bike, rider, [300])
    # A start that is rejected keeps the rider id in its raw payload.
    await bike.send(
        "lifecycle",
        {"event": "ride_started", "session_id": "not-a-uuid", "rider_id": rider,
         "occurred_at": "2026-12-06T08:00:00Z"},
    )  # fmt: skip
    await outbound.wait_for(bike.bike_id, "billing", 2)
    await outbound.wait_for(bike.bike_id, "rejections", 1)
    await wait_until(
        lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL"),
        what="the outbox published",
    )
    assert "outbox.payload" in await tables_holding(pool, rider)
    analytics = f"/analytics?bike_id={bike.bike_id}"
    before = {
        "analytics": await get(daemon, analytics),
        "sessions": {s: json.loads(await get(daemon, f"/sessions/{s}")) for s in (first, second)},
        "rows": await pool.fetch(
            "SELECT to_jsonb(s) AS row FROM sessions s WHERE bike_id = $1 ORDER BY session_id",
            bike.bike_id,
        ),
    }

    async with pool.acquire() as conn:
        erasure = await erase_rider(conn, rider)

    assert await tables_holding(pool, rider) == []
    assert (erasure.sessions, erasure.rejections_redacted, erasure.outbox_redacted) == (1 + 1, 1, 2)
    assert await get(daemon, analytics) == before["analytics"]
    rows = await pool.fetch(
        "SELECT to_jsonb(s) AS row FROM sessions s WHERE bike_id = $1 ORDER BY session_id",
        bike.bike_id,
    )
    assert rows == before["rows"]  # the immutable record did not change
    for session_id in (first, second):
        now = json.loads(await get(daemon, f"/sessions/{session_id}"))
        was = before["sessions"][session_id]
        assert now["billing"] == was["billing"]
        assert was["rider_id"] == rider and "rider_erased" not in was
        assert "rider_id" not in now and now["rider_erased"] is True
        assert now["finalized"] == {
            **{k: v for k, v in was["finalized"].items() if k != "rider_id"},
            "rider_erased": True,
        }
    recorded = await pool.fetch(
        "SELECT * FROM rider_erasures WHERE pseudonym = $1", erasure.pseudonym
    )
    assert [(r["sessions"], r["rejections_redacted"], r["outbox_redacted"]) for r in recorded] == [
        (2, 1, 2)
    ]
    kept = await pool.fetchrow(
        "SELECT payload, payload_redacted FROM rejected_messages WHERE bike_id = $1", bike.bike_id
    )
    assert kept["payload_redacted"] == "erasure"
    assert ERASED.encode() in bytes(kept["payload"])

    async with pool.acquire() as conn:
        again = await erase_rider(conn, rider)
    assert again.nothing_left
    assert await pool.fetchval("SELECT count(*) FROM rider_erasures WHERE pseudonym = $1",
                               erasure.pseudonym) == 1  # fmt: skip
    # Erasure touched only what is designed to be erased: the totals are still fixed.
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="immutable"):
        await pool.execute(
            "UPDATE sessions SET energy_wh = energy_wh + 1 WHERE session_id = $1",
            uuid.UUID(first),
        )


async def test_a_ride_after_erasure_is_a_new_pseudonym(
    daemon, bike: Bike, outbound: Outbound, pool: asyncpg.Pool
):
    rider = f"rider-{uuid.uuid4().hex}"
    first = await ride(bike, rider, [10])
    await outbound.wait_for(bike.bike_id, "billing", 1)
    async with pool.acquire() as conn:
        erased = await erase_rider(conn, rider)

    second = await ride(bike, rider, [20])
    (_, finalized) = await outbound.wait_for(bike.bike_id, "sessions/finalized", 2)

    assert finalized["session_id"] == second and finalized["rider_id"] == rider
    parties = dict(
        await pool.fetch(
            "SELECT session_id::text, party_id FROM sessions WHERE bike_id = $1", bike.bike_id
        )
    )
    assert parties[first] == erased.pseudonym != parties[second]
    assert uuid.UUID(parties[second])  # a pseudonym, not the rider id


async def test_a_rider_on_a_ride_is_erased_once_the_ride_is_finalized(
    daemon, bike: Bike, outbound: Outbound, pool: asyncpg.Pool
):
    rider = f"rider-{uuid.uuid4().hex}"
    session_id = await bike.start(party=rider)
    await bike.sample(session_id, 1, 10)
    await wait_until(
        lambda: pool.fetchval("SELECT count(*) FROM telemetry WHERE bike_id = $1", bike.bike_id),
        what="the ride stored",
    )
    async with pool.acquire() as conn:
        with pytest.raises(RiderStillActive, match=f"Active ride \\(session {session_id}\\)"):
            await erase_rider(conn, rider)
    assert await pool.fetchval("SELECT count(*) FROM riders WHERE rider_id = $1", rider) == 1

    await bike.end(session_id, 1)
    (finalized,) = await outbound.wait_for(bike.bike_id, "sessions/finalized")
    assert finalized["rider_id"] == rider
    async with pool.acquire() as conn:
        assert (await erase_rider(conn, rider)).sessions == 1


async def test_a_redacted_rejection_is_not_replayed(daemon, bike: Bike, outbound, pool):
    rider = f"rider-{uuid.uuid4().hex}"
    await bike.send(
        "lifecycle",
        {"event": "ride_started", "session_id": "not-a-uuid", "rider_id": rider,
         "occurred_at": "2026-12-06T08:00:00Z"},
    )  # fmt: skip
    await outbound.wait_for(bike.bike_id, "rejections")
    async with pool.acquire() as conn:
        assert (await erase_rider(conn, rider)).rejections_redacted == 1
    from daemon.db.store import Store
    from daemon.db.views import RejectionFilter

    selection = RejectionFilter(bike_id=bike.bike_id)
    (result,) = await replay(daemon.settings, Store(pool), selection, most=10)
    assert (result.outcome, result.detail) == ("not_replayed", "its payload was redacted (erasure)")
