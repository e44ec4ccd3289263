"""The expiry sweep: finalize sessions whose grace ran out or that went dark, and settle
overdue waiting messages, for whichever bikes the store says are due (any instance may have
written them)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

import structlog

from daemon.metrics import Metrics
from daemon.service.commits import UNAVAILABLE, Batches
from daemon.service.events import report

__all__ = ["Expiry"]

log = structlog.get_logger(__name__)

_COUNT_EVERY_S = 5.0  # how often chargeflow_active_sessions is counted again


async def _nothing() -> None:
    return None


class Expiry:
    """Sweeps the bikes this instance takes; sessions gone dark are looked for less often."""

    def __init__(
        self,
        batches: Batches,
        metrics: Metrics,
        takes: Callable[[str | None], bool],
        *,
        abandon_check_s: float,
        on_commit: Callable[[], None],
    ) -> None:
        self.batches = batches
        self.metrics = metrics
        self.takes = takes
        self.abandon_check_s = abandon_check_s
        self.on_commit = on_commit
        self._abandon_checked = float("-inf")
        self._counted_at = float("-inf")
        self._asking: asyncio.Future[tuple[datetime, list[str]]] | None = None

    async def sweep(
        self, now: datetime, before_expiring: Callable[[], Awaitable[None]] = _nothing
    ) -> None:
        """One sweep at ``now``, whole: the store asked which bikes are due, then those
        expired (``ask`` and ``apply``, awaited one after the other)."""
        self.ask(now)
        await self.apply(before_expiring)

    def ask(self, now: datetime) -> None:
        """Ask the store, in the background, which bikes are due at ``now``: the pipeline
        goes on with its batches meanwhile (the look for sessions gone dark is a scan of
        every Active session: 45 ms at 100,000 on an idle machine, longer under load, and the
        batches had waited for it). ``apply`` expires what it named."""
        if self._asking is None:
            self._asking = asyncio.ensure_future(self._due(now))

    @property
    def answered(self) -> bool:
        """The store has answered what ``ask`` asked (``apply`` then waits for nothing)."""
        return self._asking is not None and self._asking.done()

    @property
    def answer(self) -> asyncio.Future[tuple[datetime, list[str]]] | None:
        """The answer to the question out (answered or not) that ``apply`` has not taken yet,
        to wait for beside other things (never cancel it); None when none is out."""
        return self._asking

    async def apply(self, before_expiring: Callable[[], Awaitable[None]] = _nothing) -> None:
        """Expire the bikes the store named (waiting for its answer if need be); a failure is
        logged and the next sweep tries again. ``before_expiring`` is awaited once the store
        named bikes to expire, before they are (the pipeline: the batch in flight committed
        first; most sweeps find none, and the batch in flight goes on committing while the
        store is asked)."""
        asking, self._asking = self._asking, None
        if asking is None:
            return
        try:
            now, due = await asking
            if due:
                await before_expiring()
                events = await self.batches.expire(due, now)
                report(self.metrics, events)
                if events:
                    self.on_commit()
            if time.monotonic() - self._counted_at >= _COUNT_EVERY_S:
                # A walk of every cached bike (4 ms at 100,000): not at every sweep.
                self.metrics.active_sessions.set(self.batches.active_count())
                self._counted_at = time.monotonic()
            self.metrics.database_up.set(1)
        except Exception as exc:
            # Nothing was committed; the cache may be ahead of the store, so drop it.
            self.batches.reset()
            if isinstance(exc, UNAVAILABLE):
                self.metrics.database_up.set(0)
            log.warning("expiry sweep failed; will retry", error=repr(exc))

    def cancel(self) -> None:
        """Stop asking (shutdown): nothing was expired by the question alone."""
        asking, self._asking = self._asking, None
        if asking is not None and not asking.cancel() and not asking.cancelled():
            asking.exception()  # answered with a failure nobody will apply: taken, not logged

    async def _due(self, now: datetime) -> tuple[datetime, list[str]]:
        """The bikes this instance takes that are due at ``now``, as the store says."""
        policy = self.batches.policy
        # Sessions gone dark are looked for every 30 s, or a twentieth of the abandon time if
        # that is shorter: the look is a scan of every Active session.
        every = min(self.abandon_check_s, policy.abandon_after.total_seconds() / 20)
        abandon = now - policy.abandon_after
        look_for_dark = time.monotonic() - self._abandon_checked >= every
        due = await self.batches.due_bikes(
            now - policy.finalize_grace, abandon if look_for_dark else None
        )
        if look_for_dark:
            self._abandon_checked = time.monotonic()
        return now, [bike_id for bike_id in due if self.takes(bike_id)]
