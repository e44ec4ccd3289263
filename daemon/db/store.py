"""The write side's SQL for ingestion: lock and load what a batch needs, write what it decided.

Hand-written SQL, explicit row mappers, batches: one statement locks a batch's bikes, one COPY
appends its telemetry, one statement writes every changed session summary. Nothing here
decides or renders: the service layer does (``daemon.service.ingestion``, through the unit
of work). Partition claims, recorded price lists and the outbox relay's reads have modules of
their own (``claims``, ``pricing``, ``outbox``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from domain.events import (
    DeferredMessageSettled,
    Event,
    MessageDeferred,
    SessionStarted,
    TelemetrySampleAccepted,
)
from domain.seqs import SeqRanges
from domain.session import Session, Tally, session_for
from domain.session_values import EndReason, FinalizedSession, SessionEnd, SessionKind
from domain.telemetry import Distance, EmissionTime, EnergyDelta, StateOfCharge, TelemetrySample

__all__ = [
    "BatchRows",
    "Conn",
    "OutboxEntry",
    "RejectionRow",
    "Store",
    "WaitingRow",
    "finalized_from_row",
    "party_of",
    "session_from_row",
]

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
class OutboxEntry:
    """An outbound message to write: what it is, where it goes, its bytes."""

    created_at: datetime
    event: str
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectionRow:
    """A rejected message as it is kept, and the answer published if it is kept for the first
    time (``answer`` is None when the topic names no bike to answer)."""

    received_at: datetime
    topic: str
    bike_id: str | None
    reason: str
    detail: str
    session_id: UUID | None
    telemetry_id: UUID | None
    payload: bytes
    payload_size: int
    payload_sha256: bytes
    answer: OutboxEntry | None


@dataclass(frozen=True, slots=True)
class WaitingRow:
    """A waiting message as stored: raw, so that it is decoded by the edge like any other."""

    bike_id: str
    ref: bytes
    topic: str
    payload: bytes
    received_at: datetime


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


def party_of(row: asyncpg.Record) -> str | None:
    """A session's party from a row of ``session_records``: the station of a charging
    session; the rider of a ride, or None when the rider was erased."""
    party: str | None = row["rider_id"] if row["kind"] == "ride" else row["party_id"]
    return party


def finalized_from_row(row: asyncpg.Record) -> FinalizedSession:
    return FinalizedSession(
        session_id=row["session_id"],
        bike_id=row["bike_id"],
        kind=SessionKind(row["kind"]),
        party_id=party_of(row),
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        energy_wh=row["energy_wh"],
        distance_m=row["distance_m"],
        telemetry_count=row["telemetry_count"],
        missing_samples=row["missing_samples"],
        end_reason=EndReason(row["end_reason"]),
        finalized_at=row["finalized_at"],
        pricing_version=row["pricing_version"],
    )


def session_from_row(row: asyncpg.Record) -> Session:
    """A session's summary as stored; never its samples."""
    end = None
    if row["last_seq"] is not None:
        end = SessionEnd(row["ended_at"], row["last_seq"], row["end_received_at"])
    return session_for(SessionKind(row["kind"]))(
        session_id=row["session_id"],
        bike_id=row["bike_id"],
        party_id=party_of(row),
        started_at=row["started_at"],
        last_heard_at=row["last_heard_at"],
        end=end,
        tally=Tally(
            row["energy_wh"],
            row["distance_m"],
            SeqRanges.from_flat(row["seq_ranges"]),
            row["latest_emitted_at"],
        ),
        finalized=finalized_from_row(row) if row["state"] == "finalized" else None,
    )


def _summary_columns(sessions: Sequence[Session]) -> list[list[Any]]:
    """Column arrays for the one UPDATE that writes the changed summaries of a batch that
    have an end or are finalized."""
    rows = [_summary_row(s) for s in sessions]
    return [list(column) for column in zip(*rows, strict=True)]


def _running_columns(sessions: Sequence[Session]) -> list[list[Any]]:
    """Column arrays for the UPDATE of the changed summaries with no end yet: what samples
    change, and nothing else (the end's and the closing columns are NULL in the store, as
    in the session: 7 arrays to encode and write instead of 15). Sums and instants go as
    text, which PostgreSQL reads back exactly: asyncpg's binary encoding cost 2.2 us a
    numeric and 1.7 us a timestamp, text 0.8 with the conversion (900 of each, measured);
    the sessions of one read share their last-heard instant, converted once."""
    instants: dict[datetime, str] = {}

    def instant(at: datetime | None) -> str | None:
        if at is None:
            return None
        text = instants.get(at)
        if text is None:
            text = instants[at] = at.isoformat()
        return text

    rows = [
        (s.session_id, instant(s.last_heard_at), s.energy_text, s.distance_text,
         len(s.seqs), "{" + ",".join(map(str, s.seqs.flat())) + "}",
         instant(s.latest_emitted_at))
        for s in sessions
    ]  # fmt: skip
    return [list(column) for column in zip(*rows, strict=True)]


_NOT_FINALIZED = ("active", None, None, None, None)


def _summary_row(s: Session) -> tuple[Any, ...]:
    final, end = s.finalized, s.end
    if end is None:
        ended: tuple[Any, ...] = (final.ended_at if final else None, None, None)
    else:
        ended = (final.ended_at if final else end.occurred_at, end.last_seq, end.received_at)
    closing = (
        ("finalized", final.missing_samples, str(final.end_reason), final.finalized_at,
         final.pricing_version)
        if final else _NOT_FINALIZED
    )  # fmt: skip
    return (
        s.session_id,
        s.last_heard_at,
        *ended,
        s.energy_wh,
        s.distance_m,
        len(s.seqs),
        "{" + ",".join(map(str, s.seqs.flat())) + "}",
        s.latest_emitted_at,
        *closing,
    )


def _sample_line(
    event: TelemetrySampleAccepted, received: dict[datetime, str], sessions: dict[UUID, str]
) -> str:
    """One telemetry row in COPY's text format. asyncpg's binary COPY spent 9.7 us of the
    daemon's CPU per row encoding two timestamps and three numerics; this text costs about
    3 (measured side by side, README "Measured"). Nothing here needs escaping: ids are hex,
    bike ids match BIKE_ID_RULE, numbers and ISO 8601 instants have no tab, newline or
    backslash; PostgreSQL reads each back exactly (numeric text keeps its scale)."""
    s = event.sample
    at = event.received_at
    received_text = received.get(at)
    if received_text is None:
        received_text = received[at] = at.isoformat()
    session_text = sessions.get(s.session_id)
    if session_text is None:
        session_text = sessions[s.session_id] = s.session_id.hex
    distance, soc = s.distance, s.soc
    return (
        f"{s.telemetry_id.hex}\t{session_text}\t{event.bike_id}\t{s.seq}\t"
        f"{s.emitted_at.at.isoformat()}\t{s.energy.wh}\t"
        f"{distance.m if distance is not None else _NULL}\t"
        f"{soc.pct if soc is not None else _NULL}\t{received_text}\n"
    )


_NULL = "\\N"


async def _once(data: bytes) -> AsyncIterator[bytes]:
    """COPY's input in one piece (asyncpg reads plain ``bytes`` as a file name)."""
    yield data


@dataclass(slots=True)
class _EventRows:
    """The rows a batch's events become, by table."""

    starts: list[tuple[Any, ...]] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)  # COPY's text lines, _TELEMETRY_COLUMNS
    deferred: list[tuple[Any, ...]] = field(default_factory=list)
    settled: list[tuple[Any, ...]] = field(default_factory=list)
    # Shared text of the samples' columns: a read's messages share their instant, a
    # session's samples its id.
    _received: dict[datetime, str] = field(default_factory=dict)
    _sessions: dict[UUID, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls, events: Sequence[Event], waiting_payloads: dict[bytes, tuple[str, bytes]]
    ) -> _EventRows:
        rows = cls()
        add = _ADD_ROW
        for event in events:
            row_of = add.get(type(event))
            if row_of is not None:
                row_of(rows, event, waiting_payloads)
        return rows

    def _sample(self, event: TelemetrySampleAccepted, _: object) -> None:
        self.samples.append(_sample_line(event, self._received, self._sessions))

    def _start(self, event: SessionStarted, _: object) -> None:
        self.starts.append(
            (
                event.session_id,
                event.bike_id,
                str(event.kind),
                event.party_id,
                event.started_at,
                event.received_at,
            )
        )

    def _deferred(
        self, event: MessageDeferred, waiting_payloads: dict[bytes, tuple[str, bytes]]
    ) -> None:
        w = event.waiting
        topic, payload = waiting_payloads[w.ref]
        sample = getattr(w.command, "sample", None)
        self.deferred.append(
            (
                event.bike_id,
                w.ref,
                topic,
                payload,
                w.received_at,
                w.command.session_id,
                sample.telemetry_id if sample is not None else None,
            )
        )

    def _settled(self, event: DeferredMessageSettled, _: object) -> None:
        self.settled.append((event.bike_id, event.waiting.ref, event.reason, event.detail))


# Which table each kind of event writes to (the events not named write nothing of their own:
# an end or a finalization is in the session's summary row).
_ADD_ROW: dict[type, Callable[[_EventRows, Any, dict[bytes, tuple[str, bytes]]], None]] = {
    TelemetrySampleAccepted: _EventRows._sample,
    SessionStarted: _EventRows._start,
    MessageDeferred: _EventRows._deferred,
    DeferredMessageSettled: _EventRows._settled,
}


@dataclass(frozen=True, slots=True)
class BatchRows:
    """Everything one batch writes, as rows: taken from the decisions at once, so that what is
    written cannot change while the statements run (the next batch may be deciding)."""

    events: _EventRows
    summaries: list[list[Any]]  # _UPDATE_SUMMARIES' columns: sessions with an end
    running: list[list[Any]]  # _UPDATE_RUNNING's columns: sessions without one
    outbox: Sequence[OutboxEntry]
    rejections: Sequence[RejectionRow]

    @classmethod
    def of(
        cls,
        *,
        events: Sequence[Event] = (),
        changed: Sequence[Session] = (),
        outbox: Sequence[OutboxEntry] = (),
        rejections: Sequence[RejectionRow] = (),
        waiting_payloads: dict[bytes, tuple[str, bytes]] | None = None,
    ) -> BatchRows:
        """The rows of a batch: its events, the sessions it changed, its outbound messages
        and kept rejections, and the raw payloads of the messages it set waiting (by ref)."""
        running = [s for s in changed if s.end is None and s.finalized is None]
        ended = [s for s in changed if s.end is not None or s.finalized is not None]
        return cls(
            _EventRows.of(events, waiting_payloads or {}),
            _summary_columns(ended) if ended else [],
            _running_columns(running) if running else [],
            outbox,
            rejections,
        )


class Store:
    """PostgreSQL, as the unit of work and the outbox publisher need it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # -- taking bikes ----------------------------------------------------------------------

    # The version of a bike row that lock_bikes has just created; every later lock bumps it.
    # Sessions and waiting messages refer to their bike's row, so a bike at this version has
    # none of either.
    CREATED_VERSION = 1

    async def lock_bikes(self, conn: Conn, bike_ids: Iterable[str]) -> dict[str, int]:
        """Take these bikes' rows for this transaction, in bike_id order (so that writers never
        deadlock), creating new ones (at ``CREATED_VERSION``), and bump the versions of the
        others; returns the versions."""
        ids = sorted(set(bike_ids))
        if not ids:
            return {}
        rows = await conn.fetch(
            "INSERT INTO bikes (bike_id) SELECT b FROM unnest($1::text[]) AS b ORDER BY b"
            " ON CONFLICT (bike_id) DO UPDATE SET version = bikes.version + 1"
            " RETURNING bike_id, version",
            ids,
        )
        return {r["bike_id"]: r["version"] for r in rows}

    async def load_bikes(
        self, conn: Conn, bike_ids: Sequence[str]
    ) -> tuple[dict[str, Session], list[WaitingRow]]:
        """The Active session summaries and the waiting messages of these bikes."""
        active = await conn.fetch(
            "SELECT * FROM session_records WHERE bike_id = ANY($1::text[]) AND state = 'active'",
            bike_ids,
        )
        waiting = await conn.fetch(
            "SELECT bike_id, ref, topic, payload, received_at FROM waiting_messages"
            " WHERE bike_id = ANY($1::text[]) ORDER BY received_at, ref",
            bike_ids,
        )
        return (
            {r["bike_id"]: session_from_row(r) for r in active},
            [
                WaitingRow(
                    r["bike_id"], r["ref"], r["topic"], bytes(r["payload"]), r["received_at"]
                )
                for r in waiting
            ],
        )

    async def load_sessions(self, conn: Conn, session_ids: Iterable[UUID]) -> list[Session]:
        rows = await conn.fetch(
            "SELECT * FROM session_records WHERE session_id = ANY($1::uuid[])",
            list(session_ids),
        )
        return [session_from_row(r) for r in rows]

    async def load_samples(
        self, conn: Conn, keys: Iterable[tuple[UUID, int]]
    ) -> list[TelemetrySample]:
        """The stored samples at these (session id, seq): the rare path of a taken seq."""
        pairs = list(keys)
        rows = await conn.fetch(
            "SELECT t.* FROM telemetry t JOIN unnest($1::uuid[], $2::integer[]) AS k(sid, seq)"
            " ON t.session_id = k.sid AND t.seq = k.seq",
            [p[0] for p in pairs],
            [p[1] for p in pairs],
        )
        return [_sample(r) for r in rows]

    async def telemetry_owners(
        self, conn: Conn, keys: Sequence[tuple[UUID, datetime]]
    ) -> list[tuple[UUID, datetime, UUID, int]]:
        """Stored samples holding these (telemetry_id, emitted_at) keys: the rare path of a
        telemetry id claimed by two sessions."""
        rows = await conn.fetch(
            "SELECT t.telemetry_id, t.emitted_at, t.session_id, t.seq FROM telemetry t"
            " JOIN unnest($1::uuid[], $2::timestamptz[]) AS k(id, at)"
            " ON t.telemetry_id = k.id AND t.emitted_at = k.at",
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
        return [(r["telemetry_id"], r["emitted_at"], r["session_id"], r["seq"]) for r in rows]

    async def due_bikes(
        self, grace_cutoff: datetime, abandon_cutoff: datetime | None = None
    ) -> list[str]:
        """Bikes with a session whose grace ran out or an overdue message; with
        ``abandon_cutoff``, also those whose Active session went dark (a scan of every Active
        session: no index on ``last_heard_at``, which every sample updates, so that a sample's
        summary update stays a heap-only tuple update)."""
        if abandon_cutoff is None:
            rows = await self.pool.fetch(_DUE, grace_cutoff)
        else:
            rows = await self.pool.fetch(_DUE_OR_DARK, grace_cutoff, abandon_cutoff)
        return [r["bike_id"] for r in rows]

    # -- writing ---------------------------------------------------------------------------

    async def write_rows(self, conn: Conn, batch: BatchRows) -> None:
        """Write a batch's rows inside the caller's transaction.

        Order matters: new sessions, then their telemetry (only an Active session takes
        samples), then the summaries (which may finalize them), then the waiting room, the
        outbound messages and the kept rejections.
        """
        await self._write_sessions(conn, batch)
        await self._write_waiting_and_answers(conn, batch)

    async def _write_sessions(self, conn: Conn, batch: BatchRows) -> None:
        rows = batch.events
        if rows.starts:
            # One statement; it takes the riders rows in rider order (see _INSERT_STARTS).
            await conn.execute(_INSERT_STARTS, *(list(c) for c in zip(*rows.starts, strict=True)))
        if rows.samples:
            await conn.copy_to_table(
                "telemetry",
                source=_once("".join(rows.samples).encode()),
                columns=_TELEMETRY_COLUMNS,
                format="text",
            )
        if batch.running:
            await conn.execute(_UPDATE_RUNNING, *batch.running)
        if batch.summaries:
            await conn.execute(_UPDATE_SUMMARIES, *batch.summaries)

    async def _write_waiting_and_answers(self, conn: Conn, batch: BatchRows) -> None:
        rows = batch.events
        if rows.deferred:
            await conn.executemany(_INSERT_WAITING, rows.deferred)
        if rows.settled:
            # A settled message leaves the waiting room; a rejected one is kept as a rejection
            # with its raw payload (its answer is in ``outbox``).
            columns = [list(c) for c in zip(*rows.settled, strict=True)]
            await conn.execute(_SETTLE_WAITING, *columns, _PAYLOAD_CAP)
        if batch.outbox:
            await conn.executemany(
                _INSERT_OUTBOX, [(o.created_at, o.event, o.topic, o.payload) for o in batch.outbox]
            )
        if batch.rejections:
            await conn.executemany(_KEEP_REJECTION, [_rejection_args(r) for r in batch.rejections])

    async def waiting_count(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM waiting_messages"))


_DUE = (
    "SELECT bike_id FROM sessions WHERE state = 'active' AND end_received_at <= $1"
    " UNION SELECT bike_id FROM waiting_messages WHERE received_at <= $1"
)
_DUE_OR_DARK = (
    "SELECT bike_id FROM sessions WHERE state = 'active' AND end_received_at <= $1"
    " UNION SELECT bike_id FROM waiting_messages WHERE received_at <= $1"
    " UNION SELECT bike_id FROM sessions WHERE state = 'active' AND last_heard_at <= $2"
)
_PAYLOAD_CAP = 4096  # bytes of a rejected payload kept; payload_size says what was received


# -- what a batch writes (Store.write_rows) ----------------------------------------------------

# A ride refers to its rider by pseudonym (migration 006): the first ride of a rider id
# assigns one, a rider erased since gets a new one. DO UPDATE (not DO NOTHING) so that the
# pseudonym is returned whoever inserted it first; a batch takes riders in id order.
_INSERT_STARTS = (
    # One statement for a batch's starts: 100,000 starts from a backlog were 100,000
    # executions of a per-row statement. Riders are taken in rider order (as every other lock
    # of a riders row), once each: ON CONFLICT DO UPDATE may touch a row once per statement.
    "WITH input AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],"
    " $5::timestamptz[], $6::timestamptz[]) AS t(session_id, bike_id, kind, party_id,"
    " started_at, received_at)),"
    " rider AS (INSERT INTO riders (rider_id)"
    " SELECT DISTINCT party_id FROM input WHERE kind = 'ride' ORDER BY party_id"
    " ON CONFLICT (rider_id) DO UPDATE SET rider_id = EXCLUDED.rider_id"
    " RETURNING rider_id, pseudonym)"
    " INSERT INTO sessions (session_id, bike_id, kind, party_id, started_at,"
    " received_at, last_heard_at)"
    " SELECT i.session_id, i.bike_id, i.kind, COALESCE(r.pseudonym, i.party_id),"
    " i.started_at, i.received_at, i.received_at"
    " FROM input i LEFT JOIN rider r ON i.kind = 'ride' AND r.rider_id = i.party_id"
)

_UPDATE_SUMMARIES = (
    "UPDATE sessions s SET last_heard_at = t.last_heard_at, ended_at = t.ended_at,"
    " last_seq = t.last_seq, end_received_at = t.end_received_at,"
    " energy_wh = t.energy_wh, distance_m = t.distance_m,"
    " telemetry_count = t.telemetry_count, seq_ranges = t.seq_ranges::integer[],"
    " latest_emitted_at = t.latest_emitted_at, state = t.state,"
    " missing_samples = t.missing_samples, end_reason = t.end_reason,"
    " finalized_at = t.finalized_at, pricing_version = t.pricing_version"
    " FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::integer[],"
    " $5::timestamptz[], $6::numeric[], $7::numeric[], $8::integer[], $9::text[],"
    " $10::timestamptz[], $11::text[], $12::integer[], $13::text[],"
    " $14::timestamptz[], $15::text[]) AS t(session_id, last_heard_at, ended_at,"
    " last_seq, end_received_at, energy_wh, distance_m, telemetry_count, seq_ranges,"
    " latest_emitted_at, state, missing_samples, end_reason, finalized_at,"
    " pricing_version)"
    " WHERE s.session_id = t.session_id"
)
_UPDATE_RUNNING = (
    "UPDATE sessions s SET last_heard_at = t.last_heard_at::timestamptz,"
    " energy_wh = t.energy_wh::numeric, distance_m = t.distance_m::numeric,"
    " telemetry_count = t.telemetry_count, seq_ranges = t.seq_ranges::integer[],"
    " latest_emitted_at = t.latest_emitted_at::timestamptz"
    " FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],"
    " $5::integer[], $6::text[], $7::text[]) AS t(session_id, last_heard_at,"
    " energy_wh, distance_m, telemetry_count, seq_ranges, latest_emitted_at)"
    " WHERE s.session_id = t.session_id"
)
_INSERT_WAITING = (
    "INSERT INTO waiting_messages (bike_id, ref, topic, payload, received_at,"
    " session_id, telemetry_id) VALUES ($1, $2, $3, $4, $5, $6, $7)"
    " ON CONFLICT DO NOTHING"
)
_SETTLE_WAITING = (
    "WITH gone AS (DELETE FROM waiting_messages w"
    " USING unnest($1::text[], $2::bytea[], $3::text[], $4::text[])"
    " AS x(bike_id, ref, reason, detail)"
    " WHERE w.bike_id = x.bike_id AND w.ref = x.ref"
    " RETURNING w.*, x.reason, x.detail)"
    " INSERT INTO rejected_messages (received_at, topic, bike_id, reason, detail,"
    " session_id, telemetry_id, payload, payload_size, payload_sha256)"
    " SELECT received_at, topic, bike_id, reason, detail, session_id, telemetry_id,"
    " substring(payload FROM 1 FOR $5), length(payload), sha256(payload)"
    " FROM gone WHERE reason IS NOT NULL"
    " ON CONFLICT ON CONSTRAINT rejected_messages_once DO NOTHING"
)
_INSERT_OUTBOX = "INSERT INTO outbox (created_at, event, topic, payload) VALUES ($1, $2, $3, $4)"
_KEEP_REJECTION = (
    "WITH kept AS (INSERT INTO rejected_messages (received_at, topic, bike_id,"
    " reason, detail, session_id, telemetry_id, payload, payload_size,"
    " payload_sha256) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    " ON CONFLICT ON CONSTRAINT rejected_messages_once DO NOTHING)"
    # Kept once (unique on topic + payload hash), answered every time it arrives: a publisher
    # that sends the same bad bytes again is told again, as the SPEC's "every rejection is
    # published" says.
    " INSERT INTO outbox (created_at, event, topic, payload)"
    " SELECT $1, $13, $11, $12 WHERE $11::text IS NOT NULL"
)


def _rejection_args(r: RejectionRow) -> tuple[object, ...]:
    """A kept rejection's row and, when it names a bike to answer, its outbox message."""
    return (
        r.received_at,
        r.topic,
        r.bike_id,
        r.reason,
        r.detail,
        r.session_id,
        r.telemetry_id,
        r.payload[:_PAYLOAD_CAP],
        r.payload_size,
        r.payload_sha256,
        r.answer.topic if r.answer else None,
        r.answer.payload if r.answer else None,
        r.answer.event if r.answer else None,
    )
