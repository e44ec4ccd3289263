"""Retention on a schedule: what is older than its setting goes, a small batch at a time.

Every batch is one short transaction of at most ``CHARGEFLOW_RETENTION_BATCH`` rows, with a
pause between batches, so that ingestion never waits behind one long delete. Several
instances may run it at once: they take different rows or find nothing left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import structlog

from daemon.db import privacy
from daemon.metrics import Metrics

__all__ = ["Retention", "RetentionPolicy"]

log = structlog.get_logger(__name__)

Job = Callable[[asyncpg.Pool, datetime, int], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long each kind of data is kept, in days (the CHARGEFLOW_*_RETENTION_DAYS settings)."""

    rejection_payload_days: int = 30
    outbox_days: int = 7
    telemetry_days: int = 400


class Retention:
    """Runs the policy every ``interval_s``, each kind of data in batches of ``batch``."""

    def __init__(  # noqa: PLR0913 - keyword-only tunables with defaults, set in app.Daemon
        self,
        pool: asyncpg.Pool,
        metrics: Metrics,
        policy: RetentionPolicy,
        *,
        batch: int = 1000,
        pause_s: float = 0.05,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.policy = policy
        self.batch = batch
        self.pause_s = pause_s
        self.clock = clock

    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        """Until ``stop``: one pass now, then one every ``interval_s``; a failed pass is
        logged and counted, and the next one tries again."""
        while not stop.is_set():
            try:
                await self.run_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self.metrics.retention_runs.labels("failed").inc()
                log.warning("retention failed; trying again at the next run", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)

    async def run_once(self) -> dict[str, int]:
        """One pass over every kind of data; how many rows each lost."""
        now = self.clock()
        jobs: list[tuple[str, Job, int]] = [
            (
                "rejection_payloads",
                privacy.empty_rejection_payloads,
                self.policy.rejection_payload_days,
            ),
            ("outbox", privacy.delete_published_outbox, self.policy.outbox_days),
        ]
        if not await privacy.telemetry_is_hypertable(self.pool):
            jobs.append(("telemetry", privacy.delete_telemetry, self.policy.telemetry_days))
        removed = {}
        for data, job, days in jobs:
            removed[data] = await self._in_batches(data, job, now - timedelta(days=days))
        self.metrics.retention_runs.labels("done").inc()
        if any(removed.values()):
            log.info("retention removed what was older than its setting", **removed)
        return removed

    async def _in_batches(self, data: str, job: Job, before: datetime) -> int:
        total = 0
        while True:
            n = await job(self.pool, before, self.batch)
            total += n
            self.metrics.retention_removed.labels(data).inc(n)
            if n < self.batch:
                return total
            await asyncio.sleep(self.pause_s)
