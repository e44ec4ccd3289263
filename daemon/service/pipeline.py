"""Ordered, batched processing: decode, decide, commit, then acknowledge.

One task takes what has arrived (up to ``max_batch``) and hands it to the unit of work, which
decides every message in arrival order and commits the batch in one transaction; only then are
the batch's messages acknowledged, in order. The policy for failures lives here: the database
away means hold the batch and retry with backoff; a batch refused for another reason is decided
again from the store, then taken apart by bisection so that one message cannot cost its
neighbours, and a single message the database will not store is kept as a rejection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import asyncpg
import structlog
from prometheus_client import Counter

from daemon.backoff import Backoff
from daemon.metrics import DropReason, Metrics
from daemon.mqtt.delivery import Delivery, ReadGate
from daemon.mqtt.schemas import Inbound, Rejection, decode
from daemon.mqtt.topics import TopicKind, topics_for
from daemon.service.events import report
from daemon.service.unit_of_work import Arrival, OpenBatch, Settled
from domain.errors import Reason
from domain.events import Event, Outcome
from domain.session_values import SessionPolicy

__all__ = ["Batches", "Pipeline"]

log = structlog.get_logger(__name__)

# The database is away (down, restarting, overloaded): hold the batch and retry with backoff.
_UNAVAILABLE = (
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
_YIELD_EVERY = 64  # messages decoded between two turns given to the batch in flight


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A batch being written and committed in the background, and what to acknowledge."""

    task: asyncio.Task[bool]
    batch: Sequence[Delivery]
    owned: Sequence[bool]
    arrivals: Sequence[Arrival]


def _bound_counters(metrics: Metrics) -> dict[TopicKind, tuple[Counter, ...]]:
    """Per-message counters by topic kind (received, accepted, duplicate, deferred, not owned),
    their label children bound once: labels() per message was 3 % of the daemon's CPU
    draining a backlog."""
    return {
        kind: (
            metrics.received.labels(kind),
            metrics.accepted.labels(kind),
            metrics.duplicates.labels(kind),
            metrics.deferred.labels(kind),
            metrics.not_owned.labels(kind),
        )
        for kind in TopicKind
    }


class Batches(Protocol):
    """What the pipeline asks of a unit of work (``UnitOfWork``; faked in its unit tests)."""

    policy: SessionPolicy

    def reset(self) -> None: ...
    async def commit_batch(
        self, arrivals: Sequence[Arrival]
    ) -> tuple[list[Settled], list[Event]]: ...
    def decide_ahead(self, arrivals: Sequence[Arrival]) -> OpenBatch | None: ...
    async def begin_batch(self, arrivals: Sequence[Arrival]) -> OpenBatch: ...
    async def finish_batch(self, batch: OpenBatch) -> None: ...
    async def abandon_batch(self, batch: OpenBatch) -> None: ...
    async def commit_rejections(self, arrivals: Sequence[Arrival], why: str) -> None: ...
    async def due_bikes(
        self, grace_cutoff: datetime, abandon_cutoff: datetime | None = None
    ) -> list[str]: ...
    async def expire(self, bike_ids: Iterable[str], now: datetime) -> list[Event]: ...
    def active_count(self) -> int: ...


class Pipeline:
    """Turns deliveries into committed state and outbox rows; acknowledges after commit."""

    def __init__(  # noqa: PLR0913 - keyword-only limits with defaults, set in app.Daemon._wire
        self,
        unit_of_work: Batches,
        metrics: Metrics,
        *,
        prefix: str,
        max_batch: int = 1000,
        max_payload_bytes: int = 16_384,
        sweep_every_s: float = 0.5,
        abandon_check_s: float = 30.0,
        max_inbox: int = 1000,
        max_inbox_bytes: int = 8 * 1024 * 1024,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_commit: Callable[[], None] = lambda: None,
        gate: ReadGate | None = None,
        takes: Callable[[str | None], bool] = lambda _bike_id: True,
        pipelined: bool = False,
    ) -> None:
        self.uow = unit_of_work
        self.metrics = metrics
        self.topics = topics_for(prefix)
        self.max_batch = max_batch
        self.max_payload_bytes = max_payload_bytes
        self.sweep_every_s = sweep_every_s
        self.abandon_check_s = abandon_check_s
        self._abandon_checked = float("-inf")
        self.clock = clock
        self.on_commit = on_commit
        # Bike-affine instances (daemon.partition): the messages of bikes this instance does
        # not take are acknowledged in order with the batch, from the topic alone.
        self.takes = takes
        # Pipelined: a batch's rows are written and committed while the next batch is decoded,
        # locked and decided (UnitOfWork.begin_batch / finish_batch); acknowledged in order.
        self.pipelined = pipelined
        self._tail: _InFlight | None = None
        self._busy_at = time.monotonic()
        # Bounded memory whatever the broker sends: past max_inbox messages or max_inbox_bytes
        # of payload (a stream of 60 KiB garbage is 60 times a stream of samples), stop
        # reading the broker (closing the link's gate) until half of both is taken.
        self.max_inbox = max_inbox
        self.max_inbox_bytes = max_inbox_bytes
        self._inbox_bytes = 0
        self.gate = gate if gate is not None else ReadGate()
        self.inbox: deque[Delivery] = deque()
        self._counters = _bound_counters(metrics)
        self._arrivals: dict[Counter, int] = defaultdict(int)
        self._arrived = asyncio.Event()
        self.accepting = True
        self._stopping = False
        # The most recent batch sizes, for `chargeflow bench` (bounded: the daemon runs for months).
        self.batch_sizes: deque[int] = deque(maxlen=100_000)

    def deliver(self, delivery: Delivery) -> None:
        """Called by the MQTT link for every message; after shutdown began, leave it unacked."""
        if self.accepting:
            parsed = self.topics.parse(delivery.topic)
            if not parsed.outbound:  # an outbound topic heard back is no inbound message
                counters = self._counters[parsed.kind]
                # Tallied here, added to the counters as the batch is taken: a counter's inc()
                # takes a lock, and this runs for every message.
                self._arrivals[counters[0] if self.takes(parsed.bike_id) else counters[4]] += 1
            self.inbox.append(delivery)
            self._inbox_bytes += len(delivery.payload)
            self._arrived.set()
            if not self.gate.closed and (
                len(self.inbox) >= self.max_inbox or self._inbox_bytes >= self.max_inbox_bytes
            ):
                self.metrics.intake_paused.set(1)
                self.gate.close()

    async def run(self) -> None:
        """Process batches until stopped; sweep expired sessions every ``sweep_every_s``."""
        last_sweep = time.monotonic()
        while not self._stopping:
            if not self.inbox:
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), timeout=self.sweep_every_s)
            if time.monotonic() - last_sweep >= self.sweep_every_s:
                await self.sweep()
                last_sweep = time.monotonic()
            if self.inbox:
                await self.process(self._next_batch())
        await self.finish_in_flight()

    def idle_s(self) -> float:
        """How long nothing has waited in the inbox (0 while something does)."""
        return 0.0 if self.inbox else time.monotonic() - self._busy_at

    def _next_batch(self) -> list[Delivery]:
        """What has arrived, in arrival order, up to max_batch."""
        self._busy_at = time.monotonic()
        self._count_arrivals()
        count = min(len(self.inbox), self.max_batch)
        batch = [self.inbox.popleft() for _ in range(count)]
        self._inbox_bytes -= sum(len(d.payload) for d in batch)
        if (
            self.gate.closed
            and len(self.inbox) <= self.max_inbox // 2
            and self._inbox_bytes <= self.max_inbox_bytes // 2
        ):
            self.metrics.intake_paused.set(0)
            self.gate.open()
        return batch

    def _count_arrivals(self) -> None:
        for counter, count in self._arrivals.items():
            counter.inc(count)
        self._arrivals.clear()

    def stop(self) -> None:
        """Take no new messages; ``run`` returns after the batch in hand is committed."""
        self.accepting = False
        self._stopping = True

    async def drain(self, timeout_s: float = 20.0) -> None:
        """Commit and acknowledge what has arrived but is not processed yet (SIGTERM)."""
        self.stop()
        deadline = time.monotonic() + timeout_s
        while self.inbox and time.monotonic() < deadline:
            await asyncio.wait_for(
                self.process(self._next_batch()), timeout=max(0.1, deadline - time.monotonic())
            )
        await asyncio.wait_for(
            self.finish_in_flight(), timeout=max(0.1, deadline - time.monotonic())
        )

    # -- one batch ---------------------------------------------------------------------

    async def process(self, batch: Sequence[Delivery]) -> None:
        """Decide and commit a batch (retrying, bisecting), then acknowledge it in order."""
        parse, takes, decode = self.topics.parse, self.takes, self._decode
        owned = [not (p := parse(d.topic)).outbound and takes(p.bike_id) for d in batch]
        arrivals = []
        for i, (d, mine) in enumerate(zip(batch, owned, strict=True), start=1):
            if mine:
                arrivals.append(Arrival(d.topic, d.payload, d.received_at, decode(d)))
            if i % _YIELD_EVERY == 0 and self._tail is not None:
                # Let the batch in flight take its next round trip to PostgreSQL: its write
                # and commit overlap this decoding only if it gets a turn of the loop.
                await asyncio.sleep(0)
        if self.pipelined and arrivals:
            await self._pipelined(batch, owned, arrivals)
            return
        await self.finish_in_flight()  # acknowledged in order: the batch in flight first
        await self._one_by_one(batch, owned, arrivals)

    async def _one_by_one(
        self, batch: Sequence[Delivery], owned: Sequence[bool], arrivals: Sequence[Arrival]
    ) -> None:
        settled = await self._commit(arrivals) if arrivals else []
        if settled is None:
            return  # shutting down with the database away: the broker redelivers
        if arrivals:
            self.metrics.database_up.set(1)
        self._acknowledge(batch, owned, arrivals, settled)

    async def _pipelined(
        self, batch: Sequence[Delivery], owned: Sequence[bool], arrivals: Sequence[Arrival]
    ) -> None:
        """Decide this batch on the cache while the one before is written and committed; once
        that one is in, write and commit this one in the background.

        A batch that needs the store (a bike or a session the cache lacks) waits for the one
        before to commit before it locks anything: the one before locks its bikes only when
        it is written, and would otherwise wait for this one's locks while this one waits for
        it. If either fails, whatever is open is rolled back, the cache is dropped and both
        are decided again one by one, with the usual retries (this one was decided on what
        the one before had decided)."""
        started = time.perf_counter()
        opened: OpenBatch | None = None
        try:
            opened = self.uow.decide_ahead(arrivals)
        except Exception as exc:  # the domain refused half-way: decided again from the store
            log.info("batch could not be decided ahead; deciding it again", error=repr(exc))
            self.uow.reset()
        tail, self._tail = self._tail, None
        committed = tail is None or await tail.task
        if opened is None and committed:
            started = time.perf_counter()
            try:
                opened = await self.uow.begin_batch(arrivals)
            except Exception as exc:
                log.info("batch could not be begun; deciding it again", error=repr(exc))
                committed = False
        begun_s = time.perf_counter() - started
        if opened is not None and committed:
            task = asyncio.create_task(self._finish(opened, begun_s, batch, owned, arrivals))
            self._tail = _InFlight(task, batch, owned, arrivals)
            await asyncio.sleep(0)  # its first round trip goes out before the next batch
            return
        if opened is not None:
            await self.uow.abandon_batch(opened)
        await self._decide_again(tail, batch, owned, arrivals)

    async def _decide_again(
        self,
        tail: _InFlight | None,
        batch: Sequence[Delivery],
        owned: Sequence[bool],
        arrivals: Sequence[Arrival],
    ) -> None:
        """Drop the cache and decide again, one by one, the batch in flight if it failed and
        then this one."""
        self.uow.reset()
        if tail is not None and not await tail.task:
            await self._one_by_one(tail.batch, tail.owned, tail.arrivals)
        await self._one_by_one(batch, owned, arrivals)

    async def _finish(
        self,
        opened: OpenBatch,
        begun_s: float,
        batch: Sequence[Delivery],
        owned: Sequence[bool],
        arrivals: Sequence[Arrival],
    ) -> bool:
        """Write and commit a begun batch, then acknowledge it (the batch before it is
        acknowledged already); False, rolled back, when it could not be committed."""
        started = time.perf_counter()
        try:
            await self.uow.finish_batch(opened)
        except Exception as exc:
            log.info("pipelined batch not committed; deciding it again", error=repr(exc))
            return False
        self._committed(opened.settled, opened.events, begun_s + time.perf_counter() - started)
        self.metrics.database_up.set(1)
        self._acknowledge(batch, owned, arrivals, opened.settled)
        return True

    async def finish_in_flight(self) -> None:
        """Wait for the batch being committed in the background (it acknowledges itself); if
        it failed, decide it again one by one."""
        tail, self._tail = self._tail, None
        if tail is None or await tail.task:
            return
        self.uow.reset()
        await self._one_by_one(tail.batch, tail.owned, tail.arrivals)

    async def _commit(self, arrivals: Sequence[Arrival]) -> list[Settled] | None:
        attempt = 0
        backoff = Backoff()
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                settled, events = await self.uow.commit_batch(arrivals)
            except _UNAVAILABLE as exc:
                self.uow.reset()
                self.metrics.database_up.set(0)
                if self._stopping:
                    log.warning(
                        "database unavailable at shutdown; batch left to redelivery",
                        batch=len(arrivals),
                    )
                    return None
                wait = backoff.next_wait()
                log.warning(
                    "database unavailable; batch held unacknowledged",
                    error=repr(exc),
                    retry_in_s=round(wait, 2),
                    batch=len(arrivals),
                )
                await asyncio.sleep(wait)
                continue
            except _TRANSIENT as exc:
                self.uow.reset()
                attempt -= 1
                log.info("batch met another writer; deciding again", error=repr(exc))
                continue
            except Exception as exc:
                # Refused for a reason the edge did not foresee (or a fault of ours): decide
                # again from the store once, then find the culprit by bisection.
                self.uow.reset()
                log.warning(
                    "batch could not be committed",
                    error=repr(exc),
                    attempt=attempt,
                    batch=len(arrivals),
                )
                if attempt < _ATTEMPTS_BEFORE_SPLIT:
                    continue
                return await self._bisect(arrivals, exc)
            self._committed(settled, events, time.perf_counter() - started)
            return settled

    def _committed(self, settled: Sequence[Settled], events: Sequence[Event], took: float) -> None:
        self.metrics.commit_seconds.observe(took)
        self.metrics.batch_size.observe(len(settled))
        self.batch_sizes.append(len(settled))
        report(self.metrics, events)
        if events or any(s.rejection for s in settled):
            self.on_commit()

    async def _bisect(self, arrivals: Sequence[Arrival], error: Exception) -> list[Settled] | None:
        if len(arrivals) > 1:
            half = len(arrivals) // 2
            first = await self._commit(arrivals[:half])
            second = await self._commit(arrivals[half:])
            return None if first is None or second is None else first + second
        arrival = arrivals[0]
        why = f"the database refused to store this message ({type(error).__name__})"
        try:
            await self.uow.commit_rejections(arrivals, why)
        except Exception as exc:
            log.error(
                "message dropped",
                reason=DropReason.COMMIT_FAILED,
                topic=arrival.topic,
                error=repr(exc),
            )
            return [Settled(dropped=DropReason.COMMIT_FAILED)]
        log.warning("message kept as a rejection", topic=arrival.topic, error=repr(error))
        rejection = arrival.inbound.rejection
        if rejection is None:
            rejection = Rejection(
                arrival.topic, arrival.inbound.bike_id, Reason.SCHEMA_VIOLATION, why
            )
        self.on_commit()
        return [Settled(rejection=rejection)]

    def _decode(self, delivery: Delivery) -> Inbound:
        try:
            return decode(delivery.topic, delivery.payload, self.topics, self.max_payload_bytes)
        except Exception as exc:
            # decode answers every bad payload with a rejection; reaching here is our bug. The
            # message is still kept (with its raw payload, for replay once the bug is fixed).
            log.exception("message could not be decoded", topic=delivery.topic)
            parsed = self.topics.parse(delivery.topic)
            why = f"payload could not be decoded ({type(exc).__name__}); kept for replay"
            return Inbound(
                parsed.kind,
                parsed.bike_id,
                rejection=Rejection(delivery.topic, parsed.bike_id, Reason.SCHEMA_VIOLATION, why),
            )

    def _acknowledge(
        self,
        batch: Sequence[Delivery],
        owned: Sequence[bool],
        arrivals: Sequence[Arrival],
        settled: Sequence[Settled],
    ) -> None:
        """Acknowledge the whole batch in arrival order (MQTT-4.6.0-2), the messages of bikes
        this instance does not take included; count what each message came to."""
        m = self.metrics
        counters = self._counters
        # Counted per batch: a counter's inc() takes a lock, a dict's += does not.
        tally: dict[Counter, int] = defaultdict(int)
        decided = iter(zip(arrivals, settled, strict=True))
        for delivery, mine in zip(batch, owned, strict=True):
            delivery.ack()
            if not mine:
                continue  # counted as not owned when it arrived
            arrival, item = next(decided)
            _, accepted, duplicates, deferred, _ = counters[arrival.inbound.kind]
            if item.dropped is not None:
                m.dropped.labels(item.dropped).inc()
            elif item.rejection is not None:
                m.rejected.labels(item.rejection.reason).inc()
                log.info(
                    "message rejected",
                    topic=delivery.topic,
                    bike_id=item.rejection.bike_id,
                    reason=item.rejection.reason,
                    detail=item.rejection.detail,
                    session_id=str(item.rejection.session_id or "") or None,
                )
            elif item.outcome is Outcome.DUPLICATE:
                tally[duplicates] += 1
            elif item.outcome is Outcome.DEFERRED:
                tally[deferred] += 1
            else:
                tally[accepted] += 1
        for counter, count in tally.items():
            counter.inc(count)

    # -- expiry ------------------------------------------------------------------------

    async def sweep(self) -> None:
        """Finalize sessions whose grace ran out or that went dark, and settle overdue waiting
        messages, for whichever bikes the store says are due (any instance may have written
        them).

        "Now" is never later than the oldest message still waiting in the inbox: a sample that
        arrived inside the grace period is not refused because it waited here.
        """
        await self.finish_in_flight()
        now = min(self.clock(), self.inbox[0].received_at) if self.inbox else self.clock()
        policy = self.uow.policy
        try:
            # Sessions gone dark are looked for less often (every 30 s, or a twentieth of the
            # abandon time if that is shorter): the look is a scan of every Active session.
            abandon = None
            every = min(self.abandon_check_s, policy.abandon_after.total_seconds() / 20)
            if time.monotonic() - self._abandon_checked >= every:
                abandon = now - policy.abandon_after
            due = await self.uow.due_bikes(now - policy.finalize_grace, abandon)
            if abandon is not None:
                self._abandon_checked = time.monotonic()
            due = [bike_id for bike_id in due if self.takes(bike_id)]
            if due:
                events = await self.uow.expire(due, now)
                report(self.metrics, events)
                if events:
                    self.on_commit()
            self.metrics.active_sessions.set(self.uow.active_count())
            self.metrics.database_up.set(1)
        except Exception as exc:
            # Nothing was committed; the cache may be ahead of the store, so drop it.
            self.uow.reset()
            if isinstance(exc, _UNAVAILABLE):
                self.metrics.database_up.set(0)
            log.warning("expiry sweep failed; will retry", error=repr(exc))
