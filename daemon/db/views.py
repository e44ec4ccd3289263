"""The read side: what HTTP and the CLI show, from finalized data and session rows."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from daemon.db.store import Store, finalized_from_row
from daemon.outbound import finalized_message, iso, plain
from domain.billing import PricingHistory
from domain.session_values import FinalizedSession, SessionKind

__all__ = ["ReadModel"]


class ReadModel:
    """Read-only queries for HTTP and the CLI; it never writes and never changes a session.

    Bills are derived here from each session's own pricing version, read from the store with
    every query (a handful of rows), so that versions another instance recorded are known too.
    """

    def __init__(self, pool: asyncpg.Pool, prefix: str) -> None:
        self.pool = pool
        self.prefix = prefix

    async def history(self) -> PricingHistory:
        return (await Store(self.pool).pricing_history())[0]

    async def pricing(self) -> list[dict[str, Any]]:
        """Every pricing version recorded, its prices, and when it was first used."""
        history, first_used = await Store(self.pool).pricing_history()
        return [
            {
                **json.loads(p.canonical()),
                "first_used_at": iso(first_used[p.version]),
            }
            for p in history.versions
        ]

    async def session_view(self, session_id: UUID) -> dict[str, Any] | None:
        return await _session_view(self.pool, self.prefix, await self.history(), session_id)

    async def finalized_sessions(
        self,
        since: datetime | None,
        until: datetime | None,
        bike_id: str | None,
        pricing_version: str | None = None,
    ) -> list[FinalizedSession]:
        return await _finalized_sessions(self.pool, since, until, bike_id, pricing_version)


async def _session_view(
    pool: asyncpg.Pool, prefix: str, history: PricingHistory, session_id: UUID
) -> dict[str, Any] | None:
    """A session, its stored sample count and (when finalized) its billing record."""
    row = await pool.fetchrow("SELECT * FROM sessions WHERE session_id = $1", session_id)
    if row is None:
        return None
    stored = await pool.fetchval("SELECT count(*) FROM telemetry WHERE session_id = $1", session_id)
    view: dict[str, Any] = {
        "session_id": str(row["session_id"]),
        "bike_id": row["bike_id"],
        "kind": row["kind"],
        SessionKind(row["kind"]).party_field: row["party_id"],
        "state": row["state"],
        "started_at": iso(row["started_at"]),
        "stored_telemetry_count": int(stored),
    }
    if row["state"] == "finalized":
        session = finalized_from_row(row)
        view["finalized"] = json.loads(finalized_message(prefix, session)[1])
        view["billing"] = history.bill(session).to_payload()
    else:
        view["last_heard_at"] = iso(row["last_heard_at"])
        view["energy_wh_so_far"] = plain(row["energy_wh"])
        view["telemetry_count_so_far"] = row["telemetry_count"]
        if row["last_seq"] is not None:
            view["end"] = {
                "occurred_at": iso(row["ended_at"]),
                "last_seq": row["last_seq"],
            }
    return view


async def _finalized_sessions(
    pool: asyncpg.Pool,
    since: datetime | None,
    until: datetime | None,
    bike_id: str | None,
    pricing_version: str | None,
) -> list[FinalizedSession]:
    rows = await pool.fetch(
        "SELECT * FROM sessions WHERE state = 'finalized'"
        " AND ($1::timestamptz IS NULL OR started_at >= $1)"
        " AND ($2::timestamptz IS NULL OR started_at < $2)"
        " AND ($3::text IS NULL OR bike_id = $3)"
        " AND ($4::text IS NULL OR pricing_version = $4) ORDER BY started_at, session_id",
        since,
        until,
        bike_id,
        pricing_version,
    )
    return [finalized_from_row(r) for r in rows]
