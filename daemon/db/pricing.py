"""Recorded price lists (``pricing_versions``): the running one recorded before ingestion
starts, every one read back to bill a finalized session by the version it names."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from daemon.pricing_text import canonical_pricing, pricing_from_canonical
from domain.billing import PricingHistory, PricingRules

__all__ = ["PricingRecords"]

_PRICING_LOCK = 0x43_46_50_52  # "CFPR": one instance records a price list at a time


class PricingRecords:
    """Every price list ever used, recorded as canonical text."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def record(self, pricing: PricingRules, now: datetime) -> PricingRules | None:
        """Keep the running price list and return it as recorded; None if its version is
        recorded with other prices (equal values written differently are the same prices).

        Sessions finalized before versions were recorded get one here: the version their
        published bill named while the outbox still has it, else the earliest recorded one.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PRICING_LOCK)
            content = await conn.fetchval(
                "SELECT content FROM pricing_versions WHERE version = $1", pricing.version
            )
            if content is None:
                content = canonical_pricing(pricing)
                await conn.execute(
                    "INSERT INTO pricing_versions (version, content, first_used_at)"
                    " VALUES ($1, $2, $3)",
                    pricing.version,
                    content,
                    now,
                )
            recorded = pricing_from_canonical(content)
            if recorded != pricing:
                return None
            await conn.execute(
                "UPDATE sessions s SET pricing_version = COALESCE(("
                " SELECT v.version FROM outbox o JOIN pricing_versions v"
                " ON v.version = convert_from(o.payload, 'UTF8')::jsonb ->> 'pricing_version'"
                " WHERE o.event = 'billing'"
                " AND convert_from(o.payload, 'UTF8')::jsonb ->> 'session_id' = s.session_id::text"
                " ORDER BY o.id LIMIT 1),"
                " (SELECT version FROM pricing_versions ORDER BY first_used_at, version LIMIT 1))"
                " WHERE s.state = 'finalized' AND s.pricing_version IS NULL"
            )
            if not await conn.fetchval(
                "SELECT convalidated FROM pg_constraint"
                " WHERE conname = 'finalized_sessions_name_their_pricing'"
            ):
                await conn.execute(
                    "ALTER TABLE sessions VALIDATE CONSTRAINT finalized_sessions_name_their_pricing"
                )
        return recorded

    async def history(self) -> tuple[PricingHistory, dict[str, datetime]]:
        """Every recorded price list, and when each was first used."""
        rows = await self.pool.fetch(
            "SELECT version, content, first_used_at FROM pricing_versions"
            " ORDER BY first_used_at, version"
        )
        history = PricingHistory(tuple(pricing_from_canonical(r["content"]) for r in rows))
        return history, {r["version"]: r["first_used_at"] for r in rows}
