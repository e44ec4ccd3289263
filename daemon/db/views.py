"""The read side: what HTTP and the CLI show, from finalized data and session rows."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from daemon import MAX_PAGE
from daemon.db.pricing import PricingRecords
from daemon.db.store import finalized_from_row, session_from_row
from daemon.documents import (
    BillingPayload,
    FinalizedPayload,
    money_text,
    party_fields,
    quantity_text,
    seconds_number,
    utc_text,
)
from daemon.pricing_text import canonical_pricing
from domain.analytics import AnalyticsReport, KindFigures, project
from domain.billing import BillingRecord, PricingHistory
from domain.commands import BIKE_ID_PATTERN, BIKE_ID_RULE
from domain.errors import Reason
from domain.session_values import FinalizedSession, SessionKind

__all__ = ["KeptRejection", "ReadModel", "RejectionFilter", "SessionView", "analytics_document"]


@dataclass(frozen=True, slots=True)
class KeptRejection:
    """A rejected message as it is kept: why, and its raw payload (capped at 64 KiB)."""

    id: int
    received_at: datetime
    topic: str
    bike_id: str | None
    reason: str
    detail: str
    session_id: UUID | None
    telemetry_id: UUID | None
    payload: bytes
    payload_size: int
    # "erasure" (a rider id in it was replaced) or "retention" (emptied), None as received.
    payload_redacted: str | None = None

    def to_document(self) -> dict[str, Any]:
        try:
            text: str | None = self.payload.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        return {
            "id": self.id,
            "received_at": utc_text(self.received_at),
            "topic": self.topic,
            "bike_id": self.bike_id,
            "reason": self.reason,
            "detail": self.detail,
            "session_id": None if self.session_id is None else str(self.session_id),
            "telemetry_id": None if self.telemetry_id is None else str(self.telemetry_id),
            "payload_size": self.payload_size,
            "payload_redacted": self.payload_redacted,
            "payload_text": text,
            "payload_base64": base64.b64encode(self.payload).decode("ascii"),
        }


@dataclass(frozen=True, slots=True)
class SessionView:
    """A session as operators look it up: Active with its running totals, or Finalized with
    its fixed record and its bill (by the pricing version it was finalized under)."""

    session_id: UUID
    bike_id: str
    kind: SessionKind
    party_id: str | None  # None: a ride whose rider was erased
    state: str
    started_at: datetime
    stored_telemetry_count: int
    last_heard_at: datetime
    energy_wh_so_far: Decimal
    telemetry_count_so_far: int
    ended_at: datetime | None
    last_seq: int | None
    finalized: FinalizedSession | None
    bill: BillingRecord | None

    def to_document(self) -> dict[str, Any]:
        """The JSON of HTTP and the CLI; a finalized record as it was published on MQTT."""
        view: dict[str, Any] = {
            "session_id": str(self.session_id),
            "bike_id": self.bike_id,
            "kind": str(self.kind),
            **party_fields(self.kind, self.party_id),
            "state": self.state,
            "started_at": utc_text(self.started_at),
            "stored_telemetry_count": self.stored_telemetry_count,
        }
        if self.finalized is not None and self.bill is not None:
            view["finalized"] = FinalizedPayload.of(self.finalized).document()
            view["billing"] = BillingPayload.of(self.bill).document()
            return view
        view["last_heard_at"] = utc_text(self.last_heard_at)
        view["energy_wh_so_far"] = quantity_text(self.energy_wh_so_far)
        view["telemetry_count_so_far"] = self.telemetry_count_so_far
        if self.last_seq is not None and self.ended_at is not None:
            view["end"] = {"occurred_at": utc_text(self.ended_at), "last_seq": self.last_seq}
        return view


@dataclass(frozen=True, slots=True)
class RejectionFilter:
    """Which kept rejections to read: newest first, ``before`` an id for the next page."""

    bike_id: str | None = None
    reason: Reason | None = None
    since: datetime | None = None
    until: datetime | None = None
    before: int | None = None
    limit: int = 100

    def __post_init__(self) -> None:
        if self.bike_id is not None and not BIKE_ID_PATTERN.fullmatch(self.bike_id):
            raise ValueError(f"bike_id must match {BIKE_ID_RULE}")
        if not 1 <= self.limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}")


class ReadModel:
    """Read-only queries for HTTP and the CLI; it never writes and never changes a session.

    Bills are derived here from each session's own pricing version, read from the store with
    every query (a handful of rows), so that versions another instance recorded are known too.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def history(self) -> PricingHistory:
        return (await PricingRecords(self.pool).history())[0]

    async def pricing(self) -> list[dict[str, Any]]:
        """Every pricing version recorded, its prices, and when it was first used."""
        history, first_used = await PricingRecords(self.pool).history()
        return [
            {
                **json.loads(canonical_pricing(p)),
                "first_used_at": utc_text(first_used[p.version]),
            }
            for p in history.versions
        ]

    async def session_view(self, session_id: UUID) -> SessionView | None:
        """A session, its stored sample count and (once finalized) its record and bill."""
        row = await self.pool.fetchrow(
            "SELECT s.*, (SELECT count(*) FROM telemetry t WHERE t.session_id = s.session_id)"
            " AS stored FROM session_records s WHERE s.session_id = $1",
            session_id,
        )
        if row is None:
            return None
        finalized = bill = None
        if row["state"] == "finalized":
            finalized = finalized_from_row(row)
            bill = (await self.history()).bill(finalized)
        session = session_from_row(row)  # the columns are mapped in one place: the store's
        return SessionView(
            session_id=session.session_id,
            bike_id=session.bike_id,
            kind=session.kind,
            party_id=session.party_id,
            state=row["state"],
            started_at=session.started_at,
            stored_telemetry_count=int(row["stored"]),
            last_heard_at=session.last_heard_at,
            energy_wh_so_far=session.energy_wh,
            telemetry_count_so_far=session.telemetry_count,
            ended_at=row["ended_at"],
            last_seq=row["last_seq"],
            finalized=finalized,
            bill=bill,
        )

    async def rejections(self, f: RejectionFilter) -> list[KeptRejection]:
        """Kept rejections, newest first, one page of ``f.limit``."""
        rows = await self.pool.fetch(
            "SELECT id, received_at, topic, bike_id, reason, detail, session_id, telemetry_id,"
            " payload, payload_size, payload_redacted FROM rejected_messages"
            " WHERE ($1::text IS NULL OR bike_id = $1) AND ($2::text IS NULL OR reason = $2)"
            " AND ($3::timestamptz IS NULL OR received_at >= $3)"
            " AND ($4::timestamptz IS NULL OR received_at < $4)"
            " AND ($5::bigint IS NULL OR id < $5) ORDER BY id DESC LIMIT $6",
            f.bike_id,
            None if f.reason is None else str(f.reason),
            f.since,
            f.until,
            f.before,
            f.limit,
        )
        return [KeptRejection(**{**dict(r), "payload": bytes(r["payload"])}) for r in rows]

    async def analytics(
        self,
        since: datetime | None,
        until: datetime | None,
        bike_id: str | None,
        pricing_version: str | None = None,
    ) -> dict[str, Any]:
        """Analytics over Finalized sessions, each billed by its own pricing version."""
        if bike_id is not None and not BIKE_ID_PATTERN.fullmatch(bike_id):
            raise ValueError(f"bike_id must match {BIKE_ID_RULE}")
        sessions = await self.finalized_sessions(since, until, bike_id, pricing_version)
        history = await self.history()
        bills = [history.bill(s) for s in sessions]
        filters = {
            "from": None if since is None else utc_text(since),
            "to": None if until is None else utc_text(until),
            "bike_id": bike_id,
            "pricing_version": pricing_version,
        }
        return analytics_document(project(sessions, bills), bills, filters)

    async def finalized_sessions(
        self,
        since: datetime | None,
        until: datetime | None,
        bike_id: str | None,
        pricing_version: str | None = None,
    ) -> list[FinalizedSession]:
        return await _finalized_sessions(self.pool, since, until, bike_id, pricing_version)


async def _finalized_sessions(
    pool: asyncpg.Pool,
    since: datetime | None,
    until: datetime | None,
    bike_id: str | None,
    pricing_version: str | None,
) -> list[FinalizedSession]:
    rows = await pool.fetch(
        "SELECT * FROM session_records WHERE state = 'finalized'"
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


def _figures(f: KindFigures) -> dict[str, Any]:
    def dec(value: Decimal | None) -> str | None:
        return None if value is None else quantity_text(value)

    return {
        "count": f.count,
        "energy_wh": quantity_text(f.energy_wh),
        "distance_m": quantity_text(f.distance_m),
        "duration_s": seconds_number(f.duration),
        "average_energy_wh": dec(f.average_energy_wh),
        "average_duration_s": dec(f.average_duration_s),
        "revenue": {cur: money_text(v) for cur, v in f.revenue.items()},
        "average_amount": {cur: money_text(v) for cur, v in f.average_amount.items()},
        "timed_out": f.timed_out,
        "missing_samples": f.missing_samples,
        "session_ids": [str(i) for i in f.session_ids],
    }


def analytics_document(
    report: AnalyticsReport,
    bills: Sequence[BillingRecord],
    filters: dict[str, str | None],
) -> dict[str, Any]:
    by_version: dict[str, dict[str, Any]] = {}
    for record in bills:
        figures = by_version.setdefault(record.pricing_version, {"sessions": 0, "revenue": {}})
        figures["sessions"] += 1
        revenue = figures["revenue"]
        currency = record.amount.currency
        revenue[currency] = revenue.get(currency, Decimal(0)) + record.amount.amount
    return {
        "filters": filters,
        # Each session is billed by the pricing version it was finalized under.
        "by_pricing_version": {
            version: {
                "sessions": f["sessions"],
                "revenue": {cur: money_text(v) for cur, v in f["revenue"].items()},
            }
            for version, f in sorted(by_version.items())
        },
        "rides": _figures(report.rides),
        "charging": _figures(report.charging),
        "revenue": {cur: money_text(v) for cur, v in report.revenue.items()},
    }
