"""Riders' personal data in store: erasure of one rider, and retention in small batches.

A ride's session refers to its rider by a pseudonym; ``riders`` maps it to the rider id and
is what erasure deletes (migration 006). Nothing else about a finalized session changes, so
its bill and every analytics figure stay byte for byte the same. deploy/README.md
"Personal data" maps every place the rider id is kept, and for how long.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from daemon.db.store import Conn
from daemon.documents import FinalizedPayload, RejectionPayload

__all__ = [
    "ERASED",
    "Erasure",
    "RiderStillActive",
    "delete_published_outbox",
    "delete_telemetry",
    "empty_rejection_payloads",
    "erase_rider",
    "telemetry_is_hypertable",
]

ERASED = "[erased]"  # what stands where a rider id was, in kept bytes and texts


class RiderStillActive(Exception):
    """The rider has a ride or a message in flight; the message says when to erase again."""


@dataclass(frozen=True, slots=True)
class Erasure:
    """What one erasure did (what ``rider_erasures`` records: never the rider id)."""

    pseudonym: str | None  # the mapping removed, None when there was none
    sessions: int  # the rides that now show their rider as erased
    rejections_redacted: int
    outbox_redacted: int

    @property
    def nothing_left(self) -> bool:
        return self.pseudonym is None and not (self.rejections_redacted or self.outbox_redacted)


async def erase_rider(conn: Conn, rider_id: str) -> Erasure:
    """Erase one rider in one transaction: the pseudonym's mapping, the rider id in kept
    rejections and in outbox rows (published or not); recorded once. Idempotent."""
    async with conn.transaction():
        pseudonym = await conn.fetchval(
            "DELETE FROM riders WHERE rider_id = $1 RETURNING pseudonym", rider_id
        )
        await _refuse_while_active(conn, rider_id, pseudonym)
        sessions = 0
        if pseudonym is not None:
            sessions = await conn.fetchval(
                "SELECT count(*) FROM sessions WHERE kind = 'ride' AND party_id = $1", pseudonym
            )
        rejections = await _redact_rejections(conn, rider_id)
        outbox = await _redact_outbox(conn, rider_id)
        erasure = Erasure(pseudonym, sessions, rejections, outbox)
        if not erasure.nothing_left:
            await conn.execute(
                "INSERT INTO rider_erasures (pseudonym, sessions, rejections_redacted,"
                " outbox_redacted) VALUES ($1, $2, $3, $4)",
                pseudonym,
                sessions,
                rejections,
                outbox,
            )
        return erasure


async def _refuse_while_active(conn: Conn, rider_id: str, pseudonym: str | None) -> None:
    """An Active ride (or a start still waiting) would carry the rider id into a finalized
    message still to come: such an erasure is refused, and rolled back, until it is done."""
    if pseudonym is not None:
        active = await conn.fetchval(
            "SELECT session_id FROM sessions"
            " WHERE kind = 'ride' AND state = 'active' AND party_id = $1 LIMIT 1",
            pseudonym,
        )
        if active is not None:
            raise RiderStillActive(
                f"the rider has an Active ride (session {active}); erase again once it is "
                "finalized (it ends, or times out after CHARGEFLOW_ABANDON_AFTER_S)"
            )
    waiting = await conn.fetchval(
        "SELECT count(*) FROM waiting_messages WHERE position($1::bytea IN payload) > 0",
        json.dumps(rider_id).encode(),
    )
    if waiting:
        raise RiderStillActive(
            f"{waiting} message(s) naming the rider are waiting for what they depend on; "
            "erase again once they are settled (at the latest after CHARGEFLOW_ABANDON_AFTER_S)"
        )


async def _redact_rejections(conn: Conn, rider_id: str) -> int:
    """Every occurrence of the rider id in kept rejections' payloads and details becomes
    ERASED; the row (its reason, size, hash and time) stays."""
    needle = rider_id.encode()
    rows = await conn.fetch(
        "SELECT id, payload, detail FROM rejected_messages"
        " WHERE position($1::bytea IN payload) > 0 OR strpos(detail, $2) > 0",
        needle,
        rider_id,
    )
    await conn.executemany(
        "UPDATE rejected_messages SET payload = $2, detail = $3, payload_redacted = 'erasure'"
        " WHERE id = $1",
        [
            (
                r["id"],
                bytes(r["payload"]).replace(needle, ERASED.encode()),
                r["detail"].replace(rider_id, ERASED),
            )
            for r in rows
        ],
    )
    return len(rows)


async def _redact_outbox(conn: Conn, rider_id: str) -> int:
    """The rider's finalized messages are rendered again without the rider (as replay
    renders them now); answers to rejections lose the id from their detail."""
    rows = await conn.fetch(
        "SELECT id, event, payload FROM outbox WHERE position($1::bytea IN payload) > 0",
        rider_id.encode(),
    )
    redacted = []
    for row in rows:
        payload = _without_rider(row["event"], bytes(row["payload"]), rider_id)
        if payload is not None:
            redacted.append((row["id"], payload))
    await conn.executemany("UPDATE outbox SET payload = $2 WHERE id = $1", redacted)
    return len(redacted)


def _without_rider(event: str, payload: bytes, rider_id: str) -> bytes | None:
    """An outbox payload without the rider id, or None when it is not about this rider (a
    short id can occur inside another document's bytes)."""
    document = json.loads(payload)
    if event == "session_finalized":
        if document.get("rider_id") != rider_id:
            return None
        del document["rider_id"]
        return FinalizedPayload.model_validate({**document, "rider_erased": True}).encode()
    if event == "rejection" and rider_id in document.get("detail", ""):
        document["detail"] = document["detail"].replace(rider_id, ERASED)
        return RejectionPayload.model_validate(document).encode()
    return None


# -- retention: each call one short transaction of at most ``limit`` rows ------------------


async def empty_rejection_payloads(pool: asyncpg.Pool, before: datetime, limit: int) -> int:
    """Empty the raw payloads of rejections received before ``before`` (the row, its reason,
    detail, size and hash are kept); how many were emptied."""
    result = await pool.execute(
        "UPDATE rejected_messages SET payload = ''::bytea, payload_redacted = 'retention'"
        " WHERE id IN (SELECT id FROM rejected_messages"
        "  WHERE payload_redacted IS DISTINCT FROM 'retention' AND received_at < $1"
        "  ORDER BY received_at LIMIT $2)",
        before,
        limit,
    )
    return _count(result)


async def delete_published_outbox(pool: asyncpg.Pool, before: datetime, limit: int) -> int:
    """Delete outbox rows published before ``before``; how many."""
    result = await pool.execute(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox"
        "  WHERE published_at < $1 ORDER BY id LIMIT $2)",
        before,
        limit,
    )
    return _count(result)


async def delete_telemetry(pool: asyncpg.Pool, before: datetime, limit: int) -> int:
    """Delete samples of finalized sessions emitted before ``before`` (on a plain table; on
    TimescaleDB the retention policy drops whole chunks); how many."""
    async with pool.acquire() as conn, conn.transaction():
        # The telemetry guard lets this transaction, and only it, delete below the cut-off.
        await conn.execute(
            "SELECT set_config('chargeflow.telemetry_cutoff', $1, true)", before.isoformat()
        )
        result = await conn.execute(
            "DELETE FROM telemetry t USING (SELECT o.telemetry_id, o.emitted_at"
            "  FROM telemetry o JOIN sessions s ON s.session_id = o.session_id"
            "  WHERE o.emitted_at < $1 AND s.state = 'finalized' LIMIT $2) old"
            " WHERE t.telemetry_id = old.telemetry_id AND t.emitted_at = old.emitted_at",
            before,
            limit,
        )
    return _count(result)


async def telemetry_is_hypertable(pool: asyncpg.Pool) -> bool:
    """Whether TimescaleDB's retention policy keeps telemetry (the daemon's job then does not)."""
    return bool(
        await pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE name = 'timescale')"
        )
    )


def _count(status: str) -> int:
    """Rows touched, from a command status such as ``DELETE 12`` or ``UPDATE 3``."""
    return int(status.rsplit(" ", 1)[-1])
