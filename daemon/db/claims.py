"""Instance partitions: each instance's claim (i/N) and heartbeat, in ``instance_partitions``
(``daemon.partition`` decides what they mean)."""

from __future__ import annotations

import asyncpg

from daemon.partition import Partition

__all__ = ["Claims"]


class Claims:
    """The claims of every instance, as the partition registry reads and writes them."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def register(self, client_id: str, partition: Partition) -> list[Partition]:
        """Write this instance's claim; return the claims it held before that are not settled
        (its previous claim, when it changed, and whatever was still pending then)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT part_index, part_count, previous FROM instance_partitions"
                " WHERE client_id = $1 FOR UPDATE",
                client_id,
            )
            held = set()
            if row is not None:
                held = {Partition(row["part_index"], row["part_count"])}
                held |= {Partition.parse(p) for p in row["previous"]}
            held.discard(partition)
            await conn.execute(
                "INSERT INTO instance_partitions (client_id, part_index, part_count, previous)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (client_id) DO UPDATE SET"
                " part_index = $2, part_count = $3, previous = $4, seen_at = now()",
                client_id,
                partition.index,
                partition.count,
                sorted(str(p) for p in held),
            )
        return sorted(held)

    async def live(self, client_id: str, lease_s: float) -> list[Partition]:
        """Refresh this instance's heartbeat; the claims of the others seen within the lease."""
        await self.pool.execute(
            "UPDATE instance_partitions SET seen_at = now() WHERE client_id = $1", client_id
        )
        rows = await self.pool.fetch(
            "SELECT DISTINCT part_index, part_count FROM instance_partitions"
            " WHERE client_id <> $1 AND seen_at > now() - make_interval(secs => $2)",
            client_id,
            lease_s,
        )
        return [Partition(r["part_index"], r["part_count"]) for r in rows]

    async def settle(self, client_id: str) -> None:
        await self.pool.execute(
            "UPDATE instance_partitions SET previous = '{}' WHERE client_id = $1", client_id
        )
