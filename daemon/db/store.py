"""The store behind the fleet: loads what the fleet needs and commits what it decided.

Hand-written SQL, explicit row mappers, batches: one COPY for a batch's telemetry, one
executemany per kind of row, all in one transaction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from daemon.mqtt.schemas import Rejection
from daemon.outbound import billing_message, finalized_message, rejection_message
from domain.billing import PricingRules, bill
from domain.events import (
    Event,
    SessionEndReceived,
    SessionFinalized,
    SessionStarted,
    TelemetrySampleAccepted,
)
from domain.session import Session, session_for
from domain.session_values import EndReason, FinalizedSession, SessionEnd, SessionKind
from domain.telemetry import Distance, EmissionTime, EnergyDelta, StateOfCharge, TelemetrySample

__all__ = ["Conn", "OutboxRow", "RejectedMessage", "Store"]

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

_TELEMETRY_COLUMNS = [
    "telemetry_id",
    "session_id",
    "bike_id",
    "seq",
    "emitted_at",
    "energy_wh",
    "distance_m",
    "soc_pct",
    "received_at",
]


@dataclass(frozen=True, slots=True)
class RejectedMessage:
    """A rejection as it is kept: what was wrong, and the raw payload (capped)."""

    rejection: Rejection
    payload: bytes
    received_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    event: str
    topic: str
    payload: bytes


def _sample(row: asyncpg.Record) -> TelemetrySample:
    return TelemetrySample(
        telemetry_id=row["telemetry_id"],
        session_id=row["session_id"],
        seq=row["seq"],
        emitted_at=EmissionTime(row["emitted_at"]),
        energy=EnergyDelta(row["energy_wh"]),
        distance=Distance(row["distance_m"]) if row["distance_m"] is not None else None,
        soc=StateOfCharge(row["soc_pct"]) if row["soc_pct"] is not None else None,
    )


def finalized_from_row(row: asyncpg.Record) -> FinalizedSession:
    return FinalizedSession(
        session_id=row["session_id"],
        bike_id=row["bike_id"],
        kind=SessionKind(row["kind"]),
        party_id=row["party_id"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        energy_wh=row["energy_wh"],
        distance_m=row["distance_m"],
        telemetry_count=row["telemetry_count"],
        missing_samples=row["missing_samples"],
        end_reason=EndReason(row["end_reason"]),
        finalized_at=row["finalized_at"],
    )


def _session(row: asyncpg.Record, samples: Iterable[TelemetrySample]) -> Session:
    end = None
    if row["last_seq"] is not None:
        end = SessionEnd(row["ended_at"], row["last_seq"], row["end_received_at"])
    return session_for(SessionKind(row["kind"]))(
        session_id=row["session_id"],
        bike_id=row["bike_id"],
        party_id=row["party_id"],
        started_at=row["started_at"],
        last_heard_at=row["last_heard_at"],
        end=end,
        samples=samples,
        finalized=finalized_from_row(row) if row["state"] == "finalized" else None,
    )


class Store:
    """PostgreSQL, as the fleet and the outbox need it."""

    def __init__(
        self, pool: asyncpg.Pool, prefix: str, pricing: PricingRules, payload_cap: int = 4096
    ) -> None:
        self.pool = pool
        self.prefix = prefix
        self.pricing = pricing
        self.payload_cap = payload_cap

    # -- loading -------------------------------------------------------------------------

    async def _sessions(self, conn: Conn, rows: Sequence[asyncpg.Record]) -> list[Session]:
        ids = [r["session_id"] for r in rows]
        samples: dict[UUID, list[TelemetrySample]] = {i: [] for i in ids}
        if ids:
            for t in await conn.fetch(
                "SELECT * FROM telemetry WHERE session_id = ANY($1::uuid[])", ids
            ):
                samples[t["session_id"]].append(_sample(t))
        return [_session(r, samples[r["session_id"]]) for r in rows]

    async def load(
        self, bike_ids: Iterable[str], session_ids: Iterable[UUID]
    ) -> tuple[dict[str, Session | None], list[Session]]:
        """The Active session of each bike (or None), and the sessions with these ids."""
        bikes, ids = list(bike_ids), list(session_ids)
        async with self.pool.acquire() as conn:
            active_rows = (
                await conn.fetch(
                    "SELECT * FROM sessions WHERE bike_id = ANY($1::text[]) AND state = 'active'",
                    bikes,
                )
                if bikes
                else []
            )
            named_rows = (
                await conn.fetch(
                    "SELECT * FROM sessions WHERE session_id = ANY($1::uuid[])"
                    " AND NOT (bike_id = ANY($2::text[]) AND state = 'active')",
                    ids,
                    bikes,
                )
                if ids
                else []
            )
            active = await self._sessions(conn, active_rows)
            named = await self._sessions(conn, named_rows)
        by_bike: dict[str, Session | None] = dict.fromkeys(bikes)
        for session in active:
            by_bike[session.bike_id] = session
        return by_bike, named

    async def due_bikes(
        self, grace_cutoff: datetime, abandon_cutoff: datetime, loaded: Iterable[str]
    ) -> list[str]:
        """Bikes not in memory whose Active session's grace ran out or that went dark."""
        rows = await self.pool.fetch(
            "SELECT bike_id FROM sessions WHERE state = 'active'"
            " AND (end_received_at <= $1 OR last_heard_at <= $2)"
            " AND NOT (bike_id = ANY($3::text[]))",
            grace_cutoff,
            abandon_cutoff,
            list(loaded),
        )
        return [r["bike_id"] for r in rows]

    # -- committing ----------------------------------------------------------------------

    async def commit(self, events: Sequence[Event], rejected: Sequence[RejectedMessage]) -> None:
        """Write a batch's events and rejections, with their outbox rows, in one transaction."""
        starts: list[tuple[Any, ...]] = []
        samples: list[tuple[Any, ...]] = []
        touches: dict[UUID, list[Any]] = {}
        finals: list[FinalizedSession] = []
        for event in events:
            if isinstance(event, SessionStarted):
                starts.append(
                    (
                        event.session_id,
                        event.bike_id,
                        str(event.kind),
                        event.party_id,
                        event.started_at,
                        event.received_at,
                    )
                )
            elif isinstance(event, TelemetrySampleAccepted):
                s = event.sample
                samples.append(
                    (
                        s.telemetry_id,
                        s.session_id,
                        event.bike_id,
                        s.seq,
                        s.emitted_at.at,
                        s.energy.wh,
                        s.distance.m if s.distance else None,
                        s.soc.pct if s.soc else None,
                        event.received_at,
                    )
                )
                touch = touches.setdefault(
                    s.session_id, [s.session_id, event.received_at, None, None, None]
                )
                touch[1] = max(touch[1], event.received_at)
            elif isinstance(event, SessionEndReceived):
                touch = touches.setdefault(
                    event.session_id, [event.session_id, event.received_at, None, None, None]
                )
                touch[1:] = [
                    max(touch[1], event.received_at),
                    event.ended_at,
                    event.last_seq,
                    event.received_at,
                ]
            elif isinstance(event, SessionFinalized):
                finals.append(event.session)
        outbox: list[tuple[Any, ...]] = []
        for session in finals:
            topic, payload = finalized_message(self.prefix, session)
            outbox.append((session.finalized_at, "session_finalized", topic, payload))
            topic, payload = billing_message(self.prefix, bill(session, self.pricing))
            outbox.append((session.finalized_at, "billing", topic, payload))
        async with self.pool.acquire() as conn, conn.transaction():
            if starts:
                await conn.executemany(
                    "INSERT INTO sessions (session_id, bike_id, kind, party_id, started_at,"
                    " received_at, last_heard_at) VALUES ($1, $2, $3, $4, $5, $6, $6)",
                    starts,
                )
            if samples:
                await conn.copy_records_to_table(
                    "telemetry", records=samples, columns=_TELEMETRY_COLUMNS
                )
            if touches:
                # One statement for the whole batch. last_heard_at only feeds the abandonment
                # timeout (hours), so a row is rewritten for it at most every 30 s.
                columns = list(zip(*touches.values(), strict=True))
                await conn.execute(
                    "UPDATE sessions s SET last_heard_at = GREATEST(s.last_heard_at, t.heard),"
                    " ended_at = COALESCE(t.ended_at, s.ended_at),"
                    " last_seq = COALESCE(t.last_seq, s.last_seq),"
                    " end_received_at = COALESCE(t.end_received_at, s.end_received_at)"
                    " FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[],"
                    " $4::integer[], $5::timestamptz[])"
                    " AS t(session_id, heard, ended_at, last_seq, end_received_at)"
                    " WHERE s.session_id = t.session_id AND (t.last_seq IS NOT NULL"
                    " OR s.last_heard_at < t.heard - INTERVAL '30 seconds')",
                    *[list(c) for c in columns],
                )
            if finals:
                await conn.executemany(
                    "UPDATE sessions SET state = 'finalized', ended_at = $2, energy_wh = $3,"
                    " distance_m = $4, telemetry_count = $5, missing_samples = $6,"
                    " end_reason = $7, finalized_at = $8 WHERE session_id = $1",
                    [
                        (
                            s.session_id,
                            s.ended_at,
                            s.energy_wh,
                            s.distance_m,
                            s.telemetry_count,
                            s.missing_samples,
                            str(s.end_reason),
                            s.finalized_at,
                        )
                        for s in finals
                    ],
                )
            if outbox:
                await conn.executemany(
                    "INSERT INTO outbox (created_at, event, topic, payload)"
                    " VALUES ($1, $2, $3, $4)",
                    outbox,
                )
            if rejected:
                await conn.executemany(
                    "WITH kept AS (INSERT INTO rejected_messages (received_at, topic, bike_id,"
                    " reason, detail, session_id, telemetry_id, payload, payload_size,"
                    " payload_sha256) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                    " ON CONFLICT ON CONSTRAINT rejected_messages_once DO NOTHING RETURNING 1)"
                    " INSERT INTO outbox (created_at, event, topic, payload)"
                    " SELECT $1, 'rejection', $11, $12 FROM kept WHERE $11::text IS NOT NULL",
                    [self._rejection_row(r) for r in rejected],
                )

    def _rejection_row(self, kept: RejectedMessage) -> tuple[Any, ...]:
        r = kept.rejection
        topic: str | None = None
        payload: bytes | None = None
        if r.bike_id:
            topic, payload = rejection_message(
                self.prefix,
                r.bike_id,
                r.topic,
                r.reason,
                r.detail,
                kept.received_at,
                r.session_id,
                r.telemetry_id,
            )
        return (
            kept.received_at,
            r.topic,
            r.bike_id,
            r.reason,
            r.detail,
            r.session_id,
            r.telemetry_id,
            kept.payload[: self.payload_cap],
            len(kept.payload),
            hashlib.sha256(kept.payload).digest(),
            topic,
            payload,
        )

    # -- outbox --------------------------------------------------------------------------

    async def pending_outbox(self, conn: Conn, limit: int) -> list[OutboxRow]:
        rows = await conn.fetch(
            "SELECT id, event, topic, payload FROM outbox WHERE published_at IS NULL"
            " ORDER BY id LIMIT $1",
            limit,
        )
        return [OutboxRow(r["id"], r["event"], r["topic"], bytes(r["payload"])) for r in rows]

    async def mark_published(self, conn: Conn, ids: Sequence[int], at: datetime) -> None:
        await conn.execute(
            "UPDATE outbox SET published_at = $2 WHERE id = ANY($1::bigint[])", list(ids), at
        )

    async def outbox_pending_count(self) -> int:
        count = await self.pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        return int(count)

    async def prune_outbox(self, published_before: datetime) -> None:
        await self.pool.execute("DELETE FROM outbox WHERE published_at < $1", published_before)

    # -- reading (traceability, analytics) -------------------------------------------------

    async def session_view(self, session_id: UUID) -> dict[str, Any] | None:
        """A session, its stored sample count and (when finalized) its billing record."""
        row = await self.pool.fetchrow("SELECT * FROM sessions WHERE session_id = $1", session_id)
        if row is None:
            return None
        stored = await self.pool.fetchval(
            "SELECT count(*) FROM telemetry WHERE session_id = $1", session_id
        )
        view: dict[str, Any] = {
            "session_id": str(row["session_id"]),
            "bike_id": row["bike_id"],
            "kind": row["kind"],
            SessionKind(row["kind"]).party_field: row["party_id"],
            "state": row["state"],
            "started_at": row["started_at"].isoformat(),
            "stored_telemetry_count": int(stored),
        }
        if row["state"] == "finalized":
            session = finalized_from_row(row)
            view["finalized"] = json.loads(finalized_message(self.prefix, session)[1])
            view["billing"] = bill(session, self.pricing).to_payload()
        else:
            view["last_heard_at"] = row["last_heard_at"].isoformat()
            if row["last_seq"] is not None:
                view["end"] = {
                    "occurred_at": row["ended_at"].isoformat(),
                    "last_seq": row["last_seq"],
                }
        return view

    async def finalized_sessions(
        self, since: datetime | None, until: datetime | None, bike_id: str | None
    ) -> list[FinalizedSession]:
        rows = await self.pool.fetch(
            "SELECT * FROM sessions WHERE state = 'finalized'"
            " AND ($1::timestamptz IS NULL OR started_at >= $1)"
            " AND ($2::timestamptz IS NULL OR started_at < $2)"
            " AND ($3::text IS NULL OR bike_id = $3) ORDER BY started_at, session_id",
            since,
            until,
            bike_id,
        )
        return [finalized_from_row(r) for r in rows]
