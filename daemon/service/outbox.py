"""Publishes the outbox: finalized sessions, billing records and rejections, QoS 1, in order.

Runs beside ingestion and never blocks it: rows wait in PostgreSQL while the broker is away and
go out when it returns. One publisher at a time across instances (a PostgreSQL advisory lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import structlog

from daemon.backoff import Backoff
from daemon.db.outbox import OutboxRow, OutboxStore
from daemon.db.store import Conn
from daemon.metrics import Metrics
from daemon.mqtt.delivery import Link, LinkDown

__all__ = ["OutboxPublisher"]

log = structlog.get_logger(__name__)
_LOCK = 0x43_46_4F_42  # "CFOB"


class OutboxPublisher:
    def __init__(  # noqa: PLR0913 - keyword-only tunables with defaults, set in app.Daemon._wire
        self,
        outbox: OutboxStore,
        link: Link,
        metrics: Metrics,
        *,
        wake: asyncio.Event | None = None,
        batch: int = 1000,
        in_flight: int = 100,
        poll_s: float = 1.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.outbox = outbox
        self.link = link
        self.metrics = metrics
        self.batch = batch
        self.in_flight = in_flight
        self.poll_s = poll_s
        self.clock = clock
        # Set when new rows are committed (the pipeline's ``on_commit``): publish them now
        # rather than at the next poll.
        self._wake = wake if wake is not None else asyncio.Event()
        self._last_count = float("-inf")

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            await self.link.connected.wait()
            try:
                async with self.outbox.pool.acquire() as conn:
                    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK):
                        await asyncio.sleep(self.poll_s * 5)  # another instance publishes
                        continue
                    try:
                        await self._publish_until_down(conn)
                    finally:
                        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK)
                backoff.reset()
            except LinkDown as exc:
                log.info("outbox publishing paused: broker unavailable", error=str(exc))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("outbox publishing paused: database unavailable", error=repr(exc))
                await asyncio.sleep(backoff.next_wait())
            except Exception as exc:
                # Outbound trouble must never take ingestion down with it.
                log.exception("outbox publishing failed; retrying", error=repr(exc))
                await asyncio.sleep(backoff.next_wait())

    async def _publish_until_down(self, conn: Conn) -> None:
        while True:
            self._wake.clear()
            rows = await self.outbox.pending(conn, self.batch)
            if not rows:
                self.metrics.outbox_pending.set(0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)
                continue
            done: list[int] = []
            try:
                await self._publish_window(rows, done)
            finally:
                if done:
                    await self.outbox.mark_published(conn, done, self.clock())
            if len(rows) < self.batch:
                self.metrics.outbox_pending.set(0)
            elif time.monotonic() - self._last_count >= 1.0:
                self._last_count = time.monotonic()
                self.metrics.outbox_pending.set(await self.outbox.pending_count())

    async def _publish_window(self, rows: list[OutboxRow], done: list[int]) -> None:
        """Publish in order with up to ``in_flight`` PUBACKs outstanding (a sliding window, not
        stop-and-wait per chunk: a rejection storm's answers keep pace with its intake)."""
        window = asyncio.Semaphore(self.in_flight)
        failure: BaseException | None = None

        async def one(row: OutboxRow) -> None:
            nonlocal failure
            try:
                await self.link.publish(row.topic, row.payload)
                done.append(row.id)
                self.metrics.outbox_published.labels(row.event).inc()
            except Exception as exc:
                failure = failure or exc
            finally:
                window.release()

        tasks = []
        for row in rows:
            await window.acquire()
            if failure is not None:
                window.release()
                break
            # Tasks start in creation order, so paho sends the rows in order.
            tasks.append(asyncio.create_task(one(row)))
        await asyncio.gather(*tasks)
        if failure is not None:
            raise failure
