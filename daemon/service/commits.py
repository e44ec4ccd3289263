"""The commit policy: how a decided batch gets into the store, and what happens when it does
not.

The database away means hold the batch and retry with backoff; another writer in the way
means decide again; a batch refused for another reason is decided again from the store, then
taken apart by bisection so that one message cannot cost its neighbours, and a single message
the database will not store is kept as a rejection. Pipelined (``pipelined=True``): a batch is
decided on the cache while the one before is written and committed in the background, and
acknowledged once committed, in order (``daemon.service.acks``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import structlog

from daemon.backoff import Backoff
from daemon.metrics import DropReason, Metrics
from daemon.mqtt.schemas import Rejection
from daemon.service.arrival import Arrival, Settled
from daemon.service.events import report
from daemon.service.ingestion import OpenBatch
from daemon.service.intake import Taken
from domain.errors import Reason
from domain.events import Event
from domain.session_values import SessionPolicy

__all__ = ["UNAVAILABLE", "Batch", "Batches", "Commits"]

log = structlog.get_logger(__name__)

# The database is away (down, restarting, overloaded): hold the batch and retry with backoff.
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)
# Another writer got in the way: decide again from the store, as often as it takes.
_TRANSIENT = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_ATTEMPTS_BEFORE_SPLIT = 2


class Batches(Protocol):
    """What the pipeline asks of ingestion (``Ingestion``; faked in its unit tests)."""

    policy: SessionPolicy

    def reset(self) -> None: ...
    async def commit_batch(
        self, arrivals: Sequence[Arrival]
    ) -> tuple[list[Settled], list[Event]]: ...
    def decide_ahead(self, arrivals: Sequence[Arrival]) -> OpenBatch | None: ...
    async def begin_batch(self, arrivals: Sequence[Arrival]) -> OpenBatch: ...
    def begins_beside(self, arrivals: Sequence[Arrival], in_flight: Sequence[Arrival]) -> bool: ...
    def writes_beside(
        self, arrivals: Sequence[Arrival], opened: OpenBatch, in_flight: Sequence[Arrival]
    ) -> bool: ...
    async def finish_batch(
        self,
        batch: OpenBatch,
        underway: Callable[[], None] = ...,
        before: Awaitable[bool] | None = None,
    ) -> None: ...
    async def abandon_batch(self, batch: OpenBatch) -> None: ...
    async def commit_rejections(self, arrivals: Sequence[Arrival], why: str) -> None: ...
    async def due_bikes(
        self, grace_cutoff: datetime, abandon_cutoff: datetime | None = None
    ) -> list[str]: ...
    async def expire(self, bike_ids: Iterable[str], now: datetime) -> list[Event]: ...
    def active_count(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch taken from the intake: every delivery, to acknowledge in order, and the
    arrivals (decoded) of those this instance decides."""

    taken: Sequence[Taken]
    arrivals: Sequence[Arrival]


class Commits:
    """Commits batches, in order, with retry, bisection and (optionally) pipelining; each
    committed batch is handed to ``acknowledge``."""

    def __init__(  # noqa: PLR0913 - the collaborators, then the hooks by keyword (Pipeline)
        self,
        batches: Batches,
        metrics: Metrics,
        acknowledge: Callable[[Sequence[Taken], Sequence[Settled]], None],
        *,
        on_commit: Callable[[], None],
        pipelined: bool,
        meanwhile: Callable[[], bool] = lambda: False,
        more: asyncio.Event | None = None,
    ) -> None:
        self.batches = batches
        self.metrics = metrics
        self.acknowledge = acknowledge
        self.on_commit = on_commit
        self.pipelined = pipelined
        # A little of the work the next batch will need (decoding what waits in the inbox),
        # done while this one waits for the batch in flight; False when there is none.
        self.meanwhile = meanwhile
        self.more = more if more is not None else asyncio.Event()  # set: something arrived
        self.stopping = False  # at shutdown, a batch the database will not take is left
        self._tail: tuple[asyncio.Task[bool], Batch] | None = None  # committing meanwhile
        # The most recent batch sizes, for `chargeflow bench` (bounded: the daemon runs for months).
        self.batch_sizes: deque[int] = deque(maxlen=100_000)

    @property
    def in_flight(self) -> bool:
        """A batch is being written and committed in the background."""
        return self._tail is not None

    async def commit(self, batch: Batch) -> None:
        """Commit a decoded batch (in the background when pipelined), then acknowledge it."""
        if self.pipelined and batch.arrivals:
            await self._pipelined(batch)
            return
        await self.finish_in_flight()  # acknowledged in order: the batch in flight first
        await self._one_by_one(batch)

    async def finish_in_flight(self) -> None:
        """Wait for the batch being committed in the background (it acknowledges itself); if
        it failed, decide it again one by one."""
        tail, self._tail = self._tail, None
        if tail is None or await tail[0]:
            return
        self.batches.reset()
        await self._one_by_one(tail[1])

    # -- one batch at a time -------------------------------------------------------------

    async def _one_by_one(self, batch: Batch) -> None:
        settled = await self._retrying(batch.arrivals) if batch.arrivals else []
        if settled is None:
            return  # shutting down with the database away: the broker redelivers
        if batch.arrivals:
            self.metrics.database_up.set(1)
        self.acknowledge(batch.taken, settled)

    async def _retrying(self, arrivals: Sequence[Arrival]) -> list[Settled] | None:
        attempt, backoff = 0, Backoff()
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                settled, events = await self.batches.commit_batch(arrivals)
            except UNAVAILABLE as exc:
                self.batches.reset()
                if not await self._wait_for_database(exc, backoff, len(arrivals)):
                    return None
                continue
            except _TRANSIENT as exc:
                self.batches.reset()
                attempt -= 1
                log.info("batch met another writer; deciding again", error=repr(exc))
                continue
            except Exception as exc:
                # Refused for a reason the edge did not foresee (or a fault of ours): decide
                # again from the store once, then find the culprit by bisection.
                self.batches.reset()
                log.warning("batch could not be committed", error=repr(exc),
                            attempt=attempt, batch=len(arrivals))  # fmt: skip
                if attempt < _ATTEMPTS_BEFORE_SPLIT:
                    continue
                return await self._bisect(arrivals, exc)
            self._committed(settled, events, time.perf_counter() - started)
            return settled

    async def _wait_for_database(self, exc: Exception, backoff: Backoff, size: int) -> bool:
        """The database is away: wait before the next try (False at shutdown: give up)."""
        self.metrics.database_up.set(0)
        if self.stopping:
            log.warning("database unavailable at shutdown; batch left to redelivery", batch=size)
            return False
        wait = backoff.next_wait()
        log.warning("database unavailable; batch held unacknowledged",
                    error=repr(exc), retry_in_s=round(wait, 2), batch=size)  # fmt: skip
        await asyncio.sleep(wait)
        return True

    async def _bisect(self, arrivals: Sequence[Arrival], error: Exception) -> list[Settled] | None:
        if len(arrivals) > 1:
            half = len(arrivals) // 2
            first = await self._retrying(arrivals[:half])
            second = await self._retrying(arrivals[half:])
            return None if first is None or second is None else first + second
        arrival = arrivals[0]
        why = f"the database refused to store this message ({type(error).__name__})"
        try:
            await self.batches.commit_rejections(arrivals, why)
        except Exception as exc:
            log.error("message dropped", reason=DropReason.COMMIT_FAILED,
                      topic=arrival.topic, error=repr(exc))  # fmt: skip
            return [Settled(dropped=DropReason.COMMIT_FAILED)]
        log.warning("message kept as a rejection", topic=arrival.topic, error=repr(error))
        rejection = arrival.inbound.rejection or Rejection(
            arrival.topic, arrival.inbound.bike_id, Reason.SCHEMA_VIOLATION, why
        )
        self.on_commit()
        return [Settled(rejection=rejection)]

    def _committed(self, settled: Sequence[Settled], events: Sequence[Event], took: float) -> None:
        self.metrics.commit_seconds.observe(took)
        self.metrics.batch_size.observe(len(settled))
        self.batch_sizes.append(len(settled))
        report(self.metrics, events)
        if events or any(s.rejection for s in settled):
            self.on_commit()

    # -- pipelined -----------------------------------------------------------------------

    async def _pipelined(self, batch: Batch) -> None:
        """Decide this batch on the cache while the one before is written and committed; once
        that one is in, write and commit this one in the background.

        Decided ahead on the cache alone, a batch that writes no row the one before may write
        (``Batches.writes_beside``: samples and ends, the steady state) is written beside it,
        on a connection of its own, and committed once that one is (``_beside``). A batch that
        needs the store (a bike or a session the cache lacks) waits for the one before to
        commit before it locks anything: the one before locks its bikes only when it is
        written, and would otherwise wait for this one's locks while this one waits for it;
        unless it is only starts of bikes nobody in flight touches
        (``Batches.begins_beside``), which lock no row the one before needs. If either fails,
        whatever is open is rolled back, the cache is dropped and both are decided again one
        by one, with the usual retries (this one was decided on what the one before had
        decided)."""
        tail, self._tail = self._tail, None
        started = time.perf_counter()
        ahead = self._decide_ahead(batch)
        if (
            ahead is not None
            and tail is not None
            and self.batches.writes_beside(batch.arrivals, ahead, tail[1].arrivals)
        ):
            await self._beside(ahead, batch, tail, started)
            return
        opened, committed, begun_s = await self._open(batch, tail, ahead, started)
        if opened is not None and committed:
            finish, underway = self._start_finish(opened, begun_s, batch, None)
            await self._until(underway, finish)
            return
        if opened is not None:
            await self.batches.abandon_batch(opened)
        self.batches.reset()  # decide again, one by one: the batch in flight if it failed
        if tail is not None and not await tail[0]:
            await self._one_by_one(tail[1])
        await self._one_by_one(batch)

    async def _beside(
        self, opened: OpenBatch, batch: Batch, tail: tuple[asyncio.Task[bool], Batch],
        started: float,
    ) -> None:  # fmt: skip
        """A batch decided ahead: its transaction locks, checks and writes while the one in
        flight commits, and commits once that one has (acknowledged in order). Consecutive
        batches of a large fleet touch different bikes, so PostgreSQL writes both at once; a
        bike they share waits in PostgreSQL for the lock of the one before."""
        before, before_batch = tail
        finish, underway = self._start_finish(opened, time.perf_counter() - started, batch, before)
        await self._until(underway, finish)
        if await self._wait_for(before):
            return  # this one commits in the background once it has written
        # The one before failed: this one rolls back (it waits for it); both are decided again.
        self._tail = None
        await finish
        self.batches.reset()
        await self._one_by_one(before_batch)
        await self._one_by_one(batch)

    def _start_finish(
        self, opened: OpenBatch, begun_s: float, batch: Batch, before: asyncio.Task[bool] | None
    ) -> tuple[asyncio.Task[bool], asyncio.Event]:
        underway = asyncio.Event()
        finish = asyncio.create_task(self._finish(opened, begun_s, batch, underway.set, before))
        self._tail = (finish, batch)
        return finish, underway

    async def _until(self, underway: asyncio.Event, finish: asyncio.Task[bool]) -> None:
        """Until this batch has locked its bikes: the next one may then lock its own beside it
        (a bike they share waits for this one in PostgreSQL, never the other way round), and
        is decided in one go, holding the loop, while PostgreSQL writes this one (a BEGIN's
        answer waited for that whole decision: 17 ms of 900 samples)."""
        waiter = asyncio.ensure_future(underway.wait())
        await self._work_until(finish, waiter)
        waiter.cancel()

    async def _open(
        self, batch: Batch, tail: tuple[asyncio.Task[bool], Batch] | None,
        ahead: OpenBatch | None, started: float,
    ) -> tuple[OpenBatch | None, bool, float]:  # fmt: skip
        """The batch decided ahead (nothing in flight), or begun beside the batch in flight,
        or begun once that one is committed; whether that one was; the seconds this took."""
        opened = ahead
        if (
            opened is None
            and tail is not None
            and self.batches.begins_beside(batch.arrivals, tail[1].arrivals)
        ):
            opened = await self._begin(batch)  # while the one before commits
        committed = tail is None or await self._wait_for(tail[0])
        if opened is None and committed:
            started = time.perf_counter()
            opened = await self._begin(batch)
            committed = opened is not None
        return opened, committed, time.perf_counter() - started

    async def _wait_for(self, in_flight: asyncio.Task[bool]) -> bool:
        """Whether the batch in flight committed; until it has, the work of what comes next."""
        await self._work_until(in_flight)
        return await in_flight

    async def _work_until(self, *waits: asyncio.Future[Any]) -> None:
        """Until one of ``waits`` is done, the work of what comes next a piece at a time, with
        a turn of the loop between two (the round trips of the batch in flight then wait for
        a piece at most, not for the whole); with none left, until more arrives."""
        while not any(w.done() for w in waits):
            if self.meanwhile():
                await asyncio.sleep(0)
                continue
            self.more.clear()
            arrival = asyncio.ensure_future(self.more.wait())
            await asyncio.wait([*waits, arrival], return_when=asyncio.FIRST_COMPLETED)
            arrival.cancel()

    def _decide_ahead(self, batch: Batch) -> OpenBatch | None:
        try:
            return self.batches.decide_ahead(batch.arrivals)
        except Exception as exc:  # the domain refused half-way: decided again from the store
            log.info("batch could not be decided ahead; deciding it again", error=repr(exc))
            self.batches.reset()
            return None

    async def _begin(self, batch: Batch) -> OpenBatch | None:
        try:
            return await self.batches.begin_batch(batch.arrivals)
        except Exception as exc:
            log.info("batch could not be begun; deciding it again", error=repr(exc))
            return None

    async def _finish(
        self, opened: OpenBatch, begun_s: float, batch: Batch, underway: Callable[[], None],
        before: asyncio.Task[bool] | None,
    ) -> bool:  # fmt: skip
        """Write and commit a begun batch (once ``before``, if any, has committed), then
        acknowledge it (the batch before it is acknowledged already); False, rolled back,
        when it or the one before could not be committed."""
        started = time.perf_counter()
        try:
            await self.batches.finish_batch(opened, underway, before)
        except Exception as exc:
            if before is not None and not await before:
                # The one before failed (its bikes' versions, its sessions went with it): this
                # one is decided again after it, not for a fault of its own (Commits._beside).
                return False
            log.info("pipelined batch not committed; deciding it again", error=repr(exc))
            return False
        self._committed(opened.settled, opened.events, begun_s + time.perf_counter() - started)
        self.metrics.database_up.set(1)
        self.acknowledge(batch.taken, opened.settled)
        return True
