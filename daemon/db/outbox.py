"""The outbox relay's side of ``outbox``: what is not published yet, and marking it published
(rows are written with their batch, by ``daemon.db.store``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from daemon.db.store import Conn

__all__ = ["OutboxRow", "OutboxStore"]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    event: str
    topic: str
    payload: bytes


class OutboxStore:
    """The outbox rows the relay publishes, oldest first."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def pending(self, conn: Conn, limit: int) -> list[OutboxRow]:
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

    async def pending_count(self) -> int:
        count = await self.pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        return int(count)
