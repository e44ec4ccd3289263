"""Taking batches of messages: the use cases of ingestion over a unit of work and the cache.

Take a batch (``commit_batch``): in one transaction, lock the bikes it touches (in bike_id
order, bumping their versions), read again those another writer took and what the decisions
need that the cache lacks, decide every message in arrival order, and write telemetry,
summaries, waiting messages, rejections and outbox rows. ``begin_batch``/``finish_batch`` are
its two halves, for the pipeline to overlap; ``decide_ahead`` decides a batch on the cache
alone while the one before commits. Keep messages the database refused as rejections
(``commit_rejections``); expire due sessions (``expire``). Whatever any number of daemon
instances do, each bike's decisions are serialized by PostgreSQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

import asyncpg
import structlog

from daemon.config import ConfigError, Settings
from daemon.db.pricing import PricingRecords
from daemon.db.store import BatchRows, Store
from daemon.metrics import DropReason
from daemon.mqtt.schemas import Rejection
from daemon.service.arrival import Arrival, Settled, message_ref
from daemon.service.events import Rendering, batch_rows, refusal, rejection_row
from daemon.service.fleet_cache import FleetCache
from daemon.service.unit_of_work import UnitOfWork
from domain.billing import PricingRules
from domain.commands import RecordTelemetry, StartSession
from domain.errors import DomainError, Reason
from domain.events import Event, Outcome
from domain.fleet import Fleet
from domain.session_values import SessionPolicy

__all__ = [
    "BatchBeforeFailed",
    "DecidedOnStaleState",
    "Ingestion",
    "OpenBatch",
    "configured_ingestion",
]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class OpenBatch:
    """A decided batch not yet committed: what each message came to, its events, the rows
    ``finish_batch`` writes, and either its unit of work (its bikes locked when it was
    decided) or, decided ahead on the cache, the versions its bikes must have once locked."""

    settled: list[Settled]
    events: list[Event]
    rows: BatchRows
    uow: UnitOfWork | None = None
    expected: dict[str, int] | None = None


class DecidedOnStaleState(Exception):
    """A batch decided ahead found, on locking its bikes, that another writer had been there."""


class BatchBeforeFailed(Exception):
    """A batch written beside the one decided before it was rolled back: that one failed, or
    did not commit within ``BEFORE_WAIT_S``."""


class Ingestion:
    """Commits batches and expiry sweeps, deciding them on a cache of the fleet."""

    def __init__(  # noqa: PLR0913 - keyword-only settings, built in configured_ingestion
        self,
        store: Store,
        policy: SessionPolicy,
        pricing: PricingRules,
        *,
        prefix: str,
        max_payload_bytes: int,
        finalized_cache: int = 1_000,
    ) -> None:
        self.store = store
        self.policy = policy
        self.rendering = Rendering(prefix, pricing)  # what its messages are rendered with
        self.cache = FleetCache(
            policy, prefix=prefix, max_payload_bytes=max_payload_bytes,
            finalized_cache=finalized_cache,
        )  # fmt: skip

    @property
    def fleet(self) -> Fleet:
        """The cached fleet (for tests and benchmarks that look into it)."""
        return self.cache.fleet

    def reset(self) -> None:
        """Forget everything cached: after a failed transaction the store is the truth."""
        self.cache.reset()

    async def commit_batch(self, arrivals: Sequence[Arrival]) -> tuple[list[Settled], list[Event]]:
        """Decide and commit a batch; returns what each message came to and the events.

        A telemetry id that another session's sample already holds is refused by the store's
        key; rather than look every id up on every batch, that refusal makes the batch be
        decided once more with the owners of its ids known, so the domain rejects the clash.
        """
        batch = await self.begin_batch(arrivals)
        try:
            await self.finish_batch(batch)
        except asyncpg.UniqueViolationError as exc:
            if "telemetry_pkey" not in (exc.constraint_name or ""):
                raise
            self.reset()
            log.info("a telemetry id is claimed twice; deciding the batch again", error=str(exc))
            batch = await self.begin_batch(arrivals, telemetry_ids=True)
            await self.finish_batch(batch)
        return batch.settled, batch.events

    async def begin_batch(
        self, arrivals: Sequence[Arrival], telemetry_ids: bool = False
    ) -> OpenBatch:
        """Lock the batch's bikes, load what the cache lacks and decide, in a transaction that
        stays open until ``finish_batch`` writes the batch's rows and commits."""
        commands = [a.inbound.command for a in arrivals if a.inbound.command is not None]
        uow = await UnitOfWork(self.store).begin()
        try:
            await self.cache.lock(uow, {c.bike_id for c in commands})
            await self.cache.load(uow, commands, telemetry_ids)
            settled, events, rows = self._decide_all(arrivals)
        except BaseException:
            await uow.rollback()
            raise
        return OpenBatch(settled, events, rows, uow)

    def decide_ahead(self, arrivals: Sequence[Arrival]) -> OpenBatch | None:
        """Decide a batch on the cache alone, without the database, or None when the store
        holds something the batch needs that the cache lacks (then: ``begin_batch``).

        The pipeline decides the next batch this way while the one before is written and
        committed, so deciding overlaps committing. ``finish_batch`` then locks the bikes and
        checks that each one's version is the one after ours: nobody else wrote it since (the
        batch before is committed by then). A failed check raises ``DecidedOnStaleState``, and
        both batches are decided again, one by one, from the store."""
        commands = [a.inbound.command for a in arrivals if a.inbound.command is not None]
        expected = self.cache.ahead(commands)
        if expected is None:
            return None
        settled, events, rows = self._decide_all(arrivals)
        return OpenBatch(settled, events, rows, expected=expected)

    def begins_beside(self, arrivals: Sequence[Arrival], in_flight: Sequence[Arrival]) -> bool:
        """Whether this batch may lock its bikes and decide while ``in_flight`` (decided
        before it, not committed yet) is written: every message is a start of a bike the
        cache does not hold and the batch in flight does not touch (a morning's first rides,
        a catch-up after an outage). Its decisions then depend on its own bikes alone, which
        nobody in flight writes, and on the session ids it names; a session id reused from
        the batch in flight is refused by the store's key when it is written, and both
        batches are decided again, in order (``Commits``)."""
        commands = [a.inbound.command for a in arrivals if a.inbound.command is not None]
        if not commands or not all(isinstance(c, StartSession) for c in commands):
            return False
        theirs = {a.inbound.command.bike_id for a in in_flight if a.inbound.command is not None}
        mine = {c.bike_id for c in commands}
        return mine.isdisjoint(theirs) and not self.cache.versions.knows_any(mine)

    async def finish_batch(
        self,
        batch: OpenBatch,
        underway: Callable[[], None] = lambda: None,
        before: Awaitable[bool] | None = None,
    ) -> None:
        """Write the batch's rows and commit: the second half of its transaction (for a batch
        decided ahead, all of it: lock, check the versions, write, commit). ``underway`` is
        called once its bikes are locked (a batch begun beside may then lock its own); with
        ``before`` (the batch decided before it, still committing), the commit waits for that
        one's, and the batch is rolled back (``BatchBeforeFailed``) if it was not."""
        uow = batch.uow if batch.uow is not None else await UnitOfWork(self.store).begin()
        try:
            if batch.expected is not None:
                versions = await uow.lock_bikes(batch.expected)
                underway()
                if versions != batch.expected:
                    raise DecidedOnStaleState(
                        f"{sum(versions[b] != v for b, v in batch.expected.items())} of "
                        f"{len(versions)} bikes were written by another writer meanwhile"
                    )
            underway()
            await uow.write(batch.rows)
            if before is not None and not await _committed_within(before, BEFORE_WAIT_S):
                raise BatchBeforeFailed("the batch decided before this one was not committed")
        except BaseException:
            await uow.rollback()
            raise
        await uow.commit()

    def writes_beside(
        self, arrivals: Sequence[Arrival], opened: OpenBatch, in_flight: Sequence[Arrival]
    ) -> bool:
        """Whether a batch decided ahead may write while ``in_flight`` (decided before it) has
        its bikes locked and is writing and committing: whether it writes no row that one
        might write too. It then waits, while holding rows, only for that one's commit, and
        that one never for it. Its bikes are locked after that one's (in PostgreSQL, so a bike
        they share waits there); sessions and waiting messages are per bike; what is left
        is a row of another kind both could write: a new session or rider (a start), a kept
        rejection, a waiting message, or a telemetry id both carry. So: samples and ends
        only, none of whose telemetry ids the batch in flight carries."""
        rows = opened.rows
        if rows.rejections or rows.events.starts or rows.events.deferred or rows.events.settled:
            return False
        return _telemetry_ids(arrivals).isdisjoint(_telemetry_ids(in_flight))

    async def abandon_batch(self, batch: OpenBatch) -> None:
        """Roll a begun batch back (its decisions are to be made again: ``reset`` first)."""
        if batch.uow is not None:
            await batch.uow.rollback()

    async def commit_rejections(self, arrivals: Sequence[Arrival], why: str) -> None:
        """Keep messages the database refused to store as they are, as rejections."""
        rows = []
        for a in arrivals:
            command = a.inbound.command
            rejection = (
                Rejection(a.topic, a.inbound.bike_id, Reason.SCHEMA_VIOLATION, why)
                if command is None
                else refusal(command, a.topic, Reason.SCHEMA_VIOLATION, why)
            )
            rows.append(rejection_row(self.rendering, a, rejection))
        async with UnitOfWork(self.store) as uow:
            await uow.write(BatchRows.of(rejections=rows))

    async def due_bikes(
        self, grace_cutoff: datetime, abandon_cutoff: datetime | None = None
    ) -> list[str]:
        """The bikes the store says are due for a sweep (``Store.due_bikes``)."""
        return await self.store.due_bikes(grace_cutoff, abandon_cutoff)

    def active_count(self) -> int:
        """Active sessions in the cache."""
        return self.cache.active_count()

    async def expire(self, bike_ids: Iterable[str], now: datetime) -> list[Event]:
        """Finalize these bikes' due sessions and settle their overdue waiting messages."""
        ids = sorted(set(bike_ids))
        async with UnitOfWork(self.store) as uow:
            await self.cache.lock(uow, ids)
            self.cache.expire(now, ids)
            decided = self.cache.decided()
            await uow.write(batch_rows(self.rendering, decided))
        return decided[0]

    # -- deciding ----------------------------------------------------------------------------

    def _decide_all(
        self, arrivals: Sequence[Arrival]
    ) -> tuple[list[Settled], list[Event], BatchRows]:
        settled = [self._decide(a) for a in arrivals]
        rejections, waiting = [], []
        for a, s in zip(arrivals, settled, strict=True):
            if s.rejection is not None:
                rejections.append(rejection_row(self.rendering, a, s.rejection))
            elif s.outcome is Outcome.DEFERRED:
                waiting.append(a)
        decided = self.cache.decided()
        rows = batch_rows(self.rendering, decided, waiting, rejections)
        if any(s.dropped for s in settled):
            self.reset()  # a command failed half-way through the domain: trust the store
        return settled, decided[0], rows

    def _decide(self, arrival: Arrival) -> Settled:
        inbound = arrival.inbound
        if inbound.rejection is not None:
            return Settled(rejection=inbound.rejection)
        command = inbound.command
        if command is None:
            return Settled(dropped=DropReason.INTERNAL_ERROR)
        ref = message_ref(arrival.topic, arrival.payload)
        try:
            decision = self.cache.handle(command, arrival.received_at, ref)
        except DomainError as exc:
            return Settled(rejection=refusal(command, arrival.topic, exc.reason, exc.detail))
        except Exception:
            # A bug must not stop ingestion: the message is counted as dropped and logged.
            log.exception(
                "message could not be decided",
                topic=arrival.topic,
                bike_id=command.bike_id,
                session_id=str(command.session_id),
            )
            return Settled(dropped=DropReason.INTERNAL_ERROR)
        return Settled(outcome=decision.outcome)


# How long a batch written beside the one before waits, holding its rows, for that one to
# commit. Waiting in the daemon, not in PostgreSQL, it is a wait the server's deadlock
# detector cannot see: two instances whose batches in flight each wait in PostgreSQL for a
# row the other's batch written beside holds would wait for ever. Past this, the batch is
# rolled back (its rows released) and decided again after the one before, as PostgreSQL
# breaks a deadlock after about its deadlock_timeout.
BEFORE_WAIT_S = 1.0


async def _committed_within(before: Awaitable[bool], seconds: float) -> bool:
    try:
        return await asyncio.wait_for(asyncio.shield(before), seconds)
    except TimeoutError:
        return False


def _telemetry_ids(arrivals: Sequence[Arrival]) -> set[UUID]:
    return {
        command.sample.telemetry_id
        for a in arrivals
        if isinstance(command := a.inbound.command, RecordTelemetry)
    }


async def configured_ingestion(
    settings: Settings, store: Store, pricing: PricingRules | None = None
) -> Ingestion:
    """The ingestion ``chargeflow run`` and ``chargeflow rejections replay`` decide with: the
    configured prices (``pricing``, already read, or the pricing file), recorded in the store
    first, so that bills are derived from the recorded text wherever they are read."""
    pricing = pricing if pricing is not None else settings.load_pricing()
    recorded = await PricingRecords(store.pool).record(pricing, datetime.now(UTC))
    if recorded is None:
        raise ConfigError(
            f"pricing version {pricing.version} is already recorded with other prices;"
            " give the new prices a new version"
        )
    return Ingestion(
        store,
        dataclasses.replace(settings.policy, pricing_version=recorded.version),
        recorded,
        prefix=settings.topic_prefix,
        max_payload_bytes=settings.max_payload_bytes,
    )
