"""Ordered, batched processing: decode, decide, commit, then acknowledge.

One task owns the fleet. It takes what has arrived (up to ``max_batch``), decides every message
in arrival order, commits the batch's rows and outbox entries in one transaction, and only then
acknowledges the batch's messages, in order. A failed commit drops the in-memory cache (the
database is the source of truth) and the batch is decided again from what is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import structlog

from daemon.db.store import RejectedMessage, Store
from daemon.metrics import Metrics
from daemon.mqtt.connection import Delivery
from daemon.mqtt.schemas import Inbound, Rejection, TopicKind, decode
from domain.commands import Command
from domain.errors import DomainError
from domain.events import Event, Outcome, SessionFinalized
from domain.fleet import Fleet
from domain.session_values import SessionPolicy

__all__ = ["Pipeline"]

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


@dataclass(slots=True)
class _Settled:
    """What one message came to, before the batch is committed."""

    delivery: Delivery
    kind: TopicKind
    outcome: Outcome | None = None
    rejection: Rejection | None = None
    dropped: str | None = None


class Pipeline:
    """Turns deliveries into committed state and outbox rows; acknowledges after commit."""

    def __init__(
        self,
        store: Store,
        policy: SessionPolicy,
        metrics: Metrics,
        *,
        prefix: str,
        max_batch: int = 1000,
        max_payload_bytes: int = 16_384,
        sweep_every_s: float = 0.5,
        db_scan_every_s: float = 30.0,
        finalized_cache: int = 1_000,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.metrics = metrics
        self.prefix = prefix
        self.max_batch = max_batch
        self.max_payload_bytes = max_payload_bytes
        self.sweep_every_s = sweep_every_s
        self.db_scan_every_s = db_scan_every_s
        self.finalized_cache = finalized_cache
        self.clock = clock
        self.on_commit = on_commit
        self.fleet = Fleet(policy)
        self.inbox: deque[Delivery] = deque()
        self._arrived = asyncio.Event()
        self.accepting = True
        self._stopping = False
        # The most recent batch sizes, for `chargeflow bench` (bounded: the daemon runs for months).
        self.batch_sizes: deque[int] = deque(maxlen=100_000)
        self._last_db_scan = float("-inf")

    def deliver(self, delivery: Delivery) -> None:
        """Called by the MQTT link for every message; after shutdown began, leave it unacked."""
        if self.accepting:
            self.metrics.received.labels(decode_kind(delivery.topic, self.prefix)).inc()
            self.inbox.append(delivery)
            self._arrived.set()

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
                await self.process(self._take())

    def _take(self) -> list[Delivery]:
        """What has arrived, in arrival order, up to max_batch."""
        count = min(len(self.inbox), self.max_batch)
        return [self.inbox.popleft() for _ in range(count)]

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
                self.process(self._take()), timeout=max(0.1, deadline - time.monotonic())
            )

    # -- one batch ---------------------------------------------------------------------

    async def process(self, batch: Sequence[Delivery]) -> None:
        """Decide and commit a batch, retrying from the store until it is committed."""
        inbound = [self._decode(d) for d in batch]
        attempt = 0
        while True:
            attempt += 1
            try:
                settled = await self._decide_and_commit(batch, inbound)
                break
            except _UNAVAILABLE as exc:
                self.fleet = Fleet(self.policy)
                self.metrics.database_up.set(0)
                if self._stopping:
                    # Shutting down with the database away: leave the batch unacknowledged;
                    # the broker hands it to us again after the restart.
                    log.warning(
                        "database unavailable at shutdown; batch left to redelivery",
                        batch=len(batch),
                    )
                    return
                backoff = min(0.5 * 2 ** min(attempt - 1, 6), 30.0)
                log.warning(
                    "database unavailable; batch held unacknowledged",
                    error=repr(exc),
                    retry_in_s=backoff,
                    batch=len(batch),
                )
                await asyncio.sleep(backoff)
            except Exception as exc:
                # Refused by a database invariant (another writer changed a session under us)
                # or a fault of ours: reload from the store and decide again. A batch that keeps
                # failing is taken apart, so one bad message cannot stall ingestion.
                self.fleet = Fleet(self.policy)
                reason = (
                    "integrity_conflict"
                    if isinstance(exc, asyncpg.IntegrityConstraintViolationError)
                    else "commit_failed"
                )
                log.warning(
                    "batch could not be committed; deciding again",
                    reason=reason,
                    error=repr(exc),
                    attempt=attempt,
                    batch=len(batch),
                )
                if attempt >= 3:
                    if len(batch) > 1:
                        for delivery in batch:
                            await self.process([delivery])
                        return
                    log.error("message dropped", reason=reason, topic=batch[0].topic)
                    settled = [_Settled(batch[0], inbound[0].kind, dropped=reason)]
                    break
        self.metrics.database_up.set(1)
        self._acknowledge(settled)

    def _decode(self, delivery: Delivery) -> Inbound:
        try:
            return decode(delivery.topic, delivery.payload, self.prefix, self.max_payload_bytes)
        except Exception:
            # decode answers every bad payload with a rejection; reaching here is our bug.
            log.exception("message could not be decoded", topic=delivery.topic)
            return Inbound(TopicKind.UNKNOWN, None)

    async def _decide_and_commit(
        self, batch: Sequence[Delivery], inbound: Sequence[Inbound]
    ) -> list[_Settled]:
        commands = [i.command for i in inbound if i.command is not None]
        await self._load(commands)
        settled: list[_Settled] = []
        rejected: list[RejectedMessage] = []
        for delivery, item in zip(batch, inbound, strict=True):
            result = _Settled(delivery, item.kind)
            if item.rejection is not None:
                result.rejection = item.rejection
            elif item.command is None:
                result.dropped = "internal_error"
            else:
                result.outcome, result.rejection, result.dropped = self._decide(
                    item.command, delivery, item.kind
                )
            if result.rejection is not None:
                rejected.append(
                    RejectedMessage(result.rejection, delivery.payload, delivery.received_at)
                )
            settled.append(result)
        await self._commit(self.fleet.pop_events(), rejected)
        self.metrics.batch_size.observe(len(batch))
        self.batch_sizes.append(len(batch))
        if any(item.dropped == "internal_error" for item in settled):
            # A command failed half-way through the domain: trust the store, not the cache.
            self.fleet = Fleet(self.policy)
        elif len(self.fleet.sessions) > 2 * self.finalized_cache + len(self.fleet.bikes):
            self.fleet.evict_finalized(self.finalized_cache)
        return settled

    async def _commit(self, events: Sequence[Event], rejected: Sequence[RejectedMessage]) -> None:
        """Write in one transaction; count what was finalized; wake the outbox publisher."""
        started = time.perf_counter()
        await self.store.commit(events, rejected)
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self._count_finalized(events)
        if events or rejected:
            self.on_commit()

    def _decide(
        self, command: Command, delivery: Delivery, kind: TopicKind
    ) -> tuple[Outcome | None, Rejection | None, str | None]:
        try:
            return self.fleet.handle(command, delivery.received_at).outcome, None, None
        except DomainError as exc:
            sample = getattr(command, "sample", None)
            return (
                None,
                Rejection(
                    delivery.topic,
                    command.bike_id,
                    exc.reason,
                    exc.detail,
                    command.session_id,
                    sample.telemetry_id if sample is not None else None,
                ),
                None,
            )
        except Exception:
            # A bug must not stop ingestion: the message is counted as dropped and logged.
            log.exception(
                "message could not be decided",
                topic=delivery.topic,
                bike_id=command.bike_id,
                session_id=str(command.session_id),
            )
            return None, None, "internal_error"

    async def _load(self, commands: Sequence[Command]) -> None:
        bikes, sessions = self.fleet.missing(commands)
        if not bikes and not sessions:
            return
        by_bike, named = await self.store.load(bikes, sessions)
        for bike_id, active in by_bike.items():
            self.fleet.load_bike(bike_id, active)
        for session in named:
            self.fleet.load_session(session)

    def _acknowledge(self, settled: Sequence[_Settled]) -> None:
        for item in settled:
            item.delivery.acks.ack(item.delivery.message)
            kind = str(item.kind)
            if item.dropped is not None:
                self.metrics.dropped.labels(item.dropped).inc()
            elif item.rejection is not None:
                self.metrics.rejected.labels(item.rejection.reason).inc()
                log.info(
                    "message rejected",
                    topic=item.delivery.topic,
                    bike_id=item.rejection.bike_id,
                    reason=item.rejection.reason,
                    detail=item.rejection.detail,
                    session_id=str(item.rejection.session_id or "") or None,
                )
            elif item.outcome is Outcome.DUPLICATE:
                self.metrics.duplicates.labels(kind).inc()
            else:
                self.metrics.accepted.labels(kind).inc()

    def _count_finalized(self, events: Sequence[object]) -> None:
        for event in events:
            if isinstance(event, SessionFinalized):
                s = event.session
                self.metrics.finalized.labels(str(s.kind), str(s.end_reason)).inc()
                log.info(
                    "session finalized",
                    bike_id=s.bike_id,
                    session_id=str(s.session_id),
                    kind=str(s.kind),
                    energy_wh=str(s.energy_wh),
                    missing_samples=s.missing_samples,
                    end_reason=str(s.end_reason),
                )

    # -- expiry ------------------------------------------------------------------------

    async def sweep(self) -> None:
        """Finalize sessions whose grace ran out or that went dark, in memory and in the store.

        "Now" is never later than the oldest message still waiting: a sample that arrived
        inside the grace period is not refused because it waited in the inbox.
        """
        now = min(self.clock(), self.inbox[0].received_at) if self.inbox else self.clock()
        try:
            if time.monotonic() - self._last_db_scan >= self.db_scan_every_s:
                due = await self.store.due_bikes(
                    now - self.policy.finalize_grace,
                    now - self.policy.abandon_after,
                    list(self.fleet.bikes),
                )
                self._last_db_scan = time.monotonic()
                if due:
                    by_bike, _ = await self.store.load(due, [])
                    for bike_id, active in by_bike.items():
                        self.fleet.load_bike(bike_id, active)
            self.fleet.expire(now)
            events = self.fleet.pop_events()
            if events:
                await self._commit(events, [])
            self.metrics.active_sessions.set(self.fleet.active_count())
            self.metrics.database_up.set(1)
        except Exception as exc:
            # Nothing was committed; the cache may be ahead of the store, so drop it.
            self.fleet = Fleet(self.policy)
            self._last_db_scan = float("-inf")
            if isinstance(exc, _UNAVAILABLE):
                self.metrics.database_up.set(0)
            log.warning("expiry sweep failed; will retry", error=repr(exc))


def decode_kind(topic: str, prefix: str) -> str:
    """The topic kind label for metrics, without decoding the payload."""
    for kind in (TopicKind.LIFECYCLE, TopicKind.TELEMETRY):
        if topic.startswith(f"{prefix}/bikes/") and topic.endswith(f"/{kind}"):
            return str(kind)
    return str(TopicKind.UNKNOWN)
