"""The unit of work: take a batch's bikes, let the aggregates decide, write it all in one go.

In one transaction: lock the rows of the bikes the batch touches (in bike_id order, bumping
their versions), reload the bikes another writer changed since we last wrote them, load the
sessions and the few stored samples the fleet names, decide every message in arrival order,
then write telemetry, summaries, waiting messages, rejections and outbox rows. Whatever any
number of daemon instances do, each bike's decisions are serialized by PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy
from asyncpg.transaction import Transaction

from daemon.config import ConfigError, Settings
from daemon.db.store import BatchRows, Conn, RejectionRow, Store, WaitingRow
from daemon.metrics import DropReason
from daemon.mqtt.messages import rejection_message
from daemon.mqtt.schemas import Inbound, Rejection, decode
from daemon.mqtt.topics import OutboundKind
from daemon.service.events import Rendering, entry, outbox_entries, refusal
from domain.billing import PricingRules
from domain.commands import Command
from domain.errors import DomainError, Reason
from domain.events import Event, Outcome, Waiting
from domain.fleet import Fleet
from domain.session_values import SessionPolicy

__all__ = [
    "Arrival",
    "DecidedOnStaleState",
    "OpenBatch",
    "Settled",
    "UnitOfWork",
    "configured_unit_of_work",
    "message_ref",
]

log = structlog.get_logger(__name__)


def message_ref(topic: str, payload: bytes) -> bytes:
    """A message's identity while it waits: the same bytes on the same topic are one message."""
    return hashlib.sha256(topic.encode() + b"\0" + payload).digest()


@dataclass(slots=True)  # not frozen: built per message (see Delivery)
class Arrival:
    """One inbound message as the unit of work takes it: raw, decoded, and when it came."""

    topic: str
    payload: bytes
    received_at: datetime
    inbound: Inbound


@dataclass(frozen=True, slots=True)
class OpenBatch:
    """A decided batch not yet committed: what each message came to, its events, the rows
    ``finish_batch`` writes, and either its open transaction (its bikes locked when it was
    decided) or, decided ahead on the cache, the versions its bikes must have once locked."""

    settled: list[Settled]
    events: list[Event]
    rows: BatchRows
    conn: PoolConnectionProxy | None = None
    transaction: Transaction | None = None
    expected: dict[str, int] | None = None


class DecidedOnStaleState(Exception):
    """A batch decided ahead found, on locking its bikes, that another writer had been there."""


async def _abandon(conn: PoolConnectionProxy, transaction: Transaction, store: Store) -> None:
    """Roll back (when the connection still can) and give the connection back."""
    try:
        if not conn.is_closed():
            await transaction.rollback()
    except Exception as exc:  # the connection is broken: the pool replaces it
        log.debug("rollback failed", error=repr(exc))
    finally:
        await store.pool.release(conn)


@dataclass(slots=True)  # not frozen: built per message (see Delivery)
class Settled:
    """What one message came to once its batch is committed."""

    outcome: Outcome | None = None
    rejection: Rejection | None = None
    dropped: DropReason | None = None


def storable(text: str) -> str:
    """Text PostgreSQL can hold and UTF-8 can encode: NUL and lone surrogates escaped."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class UnitOfWork:
    """Owns the fleet (a cache of the store) and commits batches and expiry sweeps."""

    def __init__(  # noqa: PLR0913 - keyword-only settings, built in configured_unit_of_work
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
        self.max_payload_bytes = max_payload_bytes
        self.finalized_cache = finalized_cache
        self.fleet = Fleet(policy, finalized_cache)

    def reset(self) -> None:
        """Forget everything cached: after a failed transaction the store is the truth."""
        self.fleet = Fleet(self.policy, self.finalized_cache)

    async def commit_batch(self, arrivals: Sequence[Arrival]) -> tuple[list[Settled], list[Event]]:
        """Decide and commit a batch; returns what each message came to and the events.

        A telemetry id that another session's sample already holds is refused by the store's
        key; rather than look every id up on every batch, that refusal makes the batch be
        decided once more with the owners of its ids known, so the domain rejects the clash.
        """
        try:
            return await self._commit_batch(arrivals, check_telemetry_ids=False)
        except asyncpg.UniqueViolationError as exc:
            if "telemetry_pkey" not in (exc.constraint_name or ""):
                raise
            self.reset()
            log.info("a telemetry id is claimed twice; deciding the batch again", error=str(exc))
            return await self._commit_batch(arrivals, check_telemetry_ids=True)

    async def _commit_batch(
        self, arrivals: Sequence[Arrival], check_telemetry_ids: bool
    ) -> tuple[list[Settled], list[Event]]:
        batch = await self.begin_batch(arrivals, check_telemetry_ids)
        await self.finish_batch(batch)
        return batch.settled, batch.events

    async def begin_batch(
        self, arrivals: Sequence[Arrival], check_telemetry_ids: bool = False
    ) -> OpenBatch:
        """Lock the batch's bikes, load what the cache lacks and decide, in a transaction that
        stays open until ``finish_batch`` writes the batch's rows and commits."""
        commands = [a.inbound.command for a in arrivals if a.inbound.command is not None]
        conn = await self.store.pool.acquire()
        transaction = conn.transaction()
        try:
            await transaction.start()
            await self._lock_and_refresh(conn, {c.bike_id for c in commands})
            await self._load(conn, commands)
            if check_telemetry_ids:
                keys = Fleet.telemetry_keys(commands)
                self.fleet.load_telemetry_owners(await self.store.telemetry_owners(conn, keys))
            settled, events, rows = self._decide_all(arrivals)
        except BaseException:
            await _abandon(conn, transaction, self.store)
            raise
        return OpenBatch(settled, events, rows, conn, transaction)

    def decide_ahead(self, arrivals: Sequence[Arrival]) -> OpenBatch | None:
        """Decide a batch on the cache alone, without the database, or None when the store
        holds something the batch needs that the cache lacks (then: ``begin_batch``).

        The pipeline decides the next batch this way while the one before is written and
        committed, so deciding overlaps committing. ``finish_batch`` then locks the bikes and
        checks that each one's version is the one after ours: nobody else wrote it since (the
        batch before is committed by then). A failed check raises ``DecidedOnStaleState``, and
        both batches are decided again, one by one, from the store."""
        commands = [a.inbound.command for a in arrivals if a.inbound.command is not None]
        fleet = self.fleet
        bike_ids = {c.bike_id for c in commands}
        if (
            not fleet.knows(bike_ids)
            or fleet.sessions_to_load(commands)
            or fleet.samples_to_load(commands)
        ):
            return None
        expected = fleet.assume_written(bike_ids)
        settled, events, rows = self._decide_all(arrivals)
        return OpenBatch(settled, events, rows, expected=expected)

    def _decide_all(
        self, arrivals: Sequence[Arrival]
    ) -> tuple[list[Settled], list[Event], BatchRows]:
        settled = [self._decide(a) for a in arrivals]
        rejections = [
            self._rejection_row(a, s.rejection)
            for a, s in zip(arrivals, settled, strict=True)
            if s.rejection is not None
        ]
        waiting = [
            a for a, s in zip(arrivals, settled, strict=True) if s.outcome is Outcome.DEFERRED
        ]
        events, rows = self._rows(waiting, rejections)
        if any(s.dropped for s in settled):
            self.reset()  # a command failed half-way through the domain: trust the store
        return settled, events, rows

    async def finish_batch(self, batch: OpenBatch) -> None:
        """Write the batch's rows and commit: the second half of its transaction (for a batch
        decided ahead, all of it: lock, check the versions, write, commit)."""
        conn, transaction = batch.conn, batch.transaction
        if conn is None or transaction is None:
            conn = await self.store.pool.acquire()
            transaction = conn.transaction()
        try:
            if batch.expected is not None:
                await transaction.start()
                versions = await self.store.lock_bikes(conn, batch.expected)
                if versions != batch.expected:
                    raise DecidedOnStaleState(
                        f"{sum(versions[b] != v for b, v in batch.expected.items())} of "
                        f"{len(versions)} bikes were written by another writer meanwhile"
                    )
            await self.store.write_rows(conn, batch.rows)
            await transaction.commit()
        except BaseException:
            await _abandon(conn, transaction, self.store)
            raise
        await self.store.pool.release(conn)

    async def abandon_batch(self, batch: OpenBatch) -> None:
        """Roll a begun batch back (its decisions are to be made again: ``reset`` first)."""
        if batch.conn is not None and batch.transaction is not None:
            await _abandon(batch.conn, batch.transaction, self.store)

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
            rows.append(self._rejection_row(a, rejection))
        async with self.store.pool.acquire() as conn, conn.transaction():
            await self.store.write_rows(conn, BatchRows.of(rejections=rows))

    async def due_bikes(
        self, grace_cutoff: datetime, abandon_cutoff: datetime | None = None
    ) -> list[str]:
        """The bikes the store says are due for a sweep (``Store.due_bikes``)."""
        return await self.store.due_bikes(grace_cutoff, abandon_cutoff)

    def active_count(self) -> int:
        """Active sessions in the cache."""
        return self.fleet.active_count()

    async def expire(self, bike_ids: Iterable[str], now: datetime) -> list[Event]:
        """Finalize these bikes' due sessions and settle their overdue waiting messages."""
        ids = sorted(set(bike_ids))
        async with self.store.pool.acquire() as conn, conn.transaction():
            await self._lock_and_refresh(conn, ids)
            self.fleet.expire(now, ids)
            return await self._write(conn, [], [])

    # -- inside ----------------------------------------------------------------------------

    async def _lock_and_refresh(self, conn: Conn, bike_ids: Iterable[str]) -> None:
        versions = await self.store.lock_bikes(conn, bike_ids)
        stale = []
        for bike_id in self.fleet.refresh(versions):
            if versions[bike_id] == self.store.CREATED_VERSION:
                # The lock created its row: no session or waiting message can name it yet, so
                # there is nothing to read (a fleet's first rides cost no load).
                self.fleet.load_bike(bike_id, None, (), versions[bike_id])
            else:
                stale.append(bike_id)
        if not stale:
            return
        active, waiting = await self.store.load_bikes(conn, stale)
        by_bike: dict[str, list[Waiting]] = {}
        for row in waiting:
            item = self._waiting(row)
            if item is not None:
                by_bike.setdefault(row.bike_id, []).append(item)
        for bike_id in stale:
            self.fleet.load_bike(
                bike_id, active.get(bike_id), by_bike.get(bike_id, ()), versions[bike_id]
            )

    def _waiting(self, row: WaitingRow) -> Waiting | None:
        inbound = decode(row.topic, row.payload, self.rendering.prefix, self.max_payload_bytes)
        if inbound.command is None:
            # Stored valid, now refused (the prefix or the payload limit changed since): leave
            # the row where an operator can see it rather than guess.
            log.warning(
                "waiting message no longer decodes; left in waiting_messages",
                bike_id=row.bike_id,
                topic=row.topic,
            )
            return None
        return Waiting(inbound.command, row.received_at, row.ref)

    async def _load(self, conn: Conn, commands: Sequence[Command]) -> None:
        fleet = self.fleet
        session_ids = fleet.sessions_to_load(commands)
        if session_ids:
            for session in await self.store.load_sessions(conn, session_ids):
                fleet.load_session(session)
        keys = fleet.samples_to_load(commands)
        if keys:
            fleet.load_samples(await self.store.load_samples(conn, keys))

    def _decide(self, arrival: Arrival) -> Settled:
        inbound = arrival.inbound
        if inbound.rejection is not None:
            return Settled(rejection=inbound.rejection)
        command = inbound.command
        if command is None:
            return Settled(dropped=DropReason.INTERNAL_ERROR)
        ref = message_ref(arrival.topic, arrival.payload)
        try:
            return Settled(outcome=self.fleet.handle(command, arrival.received_at, ref).outcome)
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

    async def _write(
        self, conn: Conn, waiting: Sequence[Arrival], rejections: Sequence[RejectionRow]
    ) -> list[Event]:
        """Write what the fleet decided; ``waiting`` are the arrivals it deferred, whose raw
        payloads the waiting room keeps."""
        events, rows = self._rows(waiting, rejections)
        await self.store.write_rows(conn, rows)
        return events

    def _rows(
        self, waiting: Sequence[Arrival], rejections: Sequence[RejectionRow]
    ) -> tuple[list[Event], BatchRows]:
        """What the fleet decided since the last batch, as events and the rows to write."""
        changed = self.fleet.changed_sessions()
        events = self.fleet.pop_events()
        payloads = {message_ref(a.topic, a.payload): (a.topic, a.payload) for a in waiting}
        rows = BatchRows.of(
            events=events,
            changed=changed,
            outbox=outbox_entries(self.rendering, events),
            rejections=rejections,
            waiting_payloads=payloads,
        )
        return events, rows

    def _rejection_row(self, arrival: Arrival, r: Rejection) -> RejectionRow:
        # Details can quote what the publisher sent (pydantic names the character it found):
        # keep them storable and publishable, whatever that was.
        r = dataclasses.replace(
            r,
            topic=storable(r.topic),
            bike_id=None if r.bike_id is None else storable(r.bike_id),
            detail=storable(r.detail),
        )
        answer = None
        if r.bike_id:
            message = rejection_message(self.rendering.prefix, r.bike_id, r, arrival.received_at)
            answer = entry(arrival.received_at, OutboundKind.REJECTIONS, message)
        return RejectionRow(
            received_at=arrival.received_at,
            topic=r.topic,
            bike_id=r.bike_id,
            reason=r.reason,
            detail=r.detail,
            session_id=r.session_id,
            telemetry_id=r.telemetry_id,
            payload=arrival.payload,
            payload_size=len(arrival.payload),
            payload_sha256=hashlib.sha256(arrival.payload).digest(),
            answer=answer,
        )


async def configured_unit_of_work(
    settings: Settings, store: Store, pricing: PricingRules | None = None
) -> UnitOfWork:
    """The unit of work ``chargeflow run`` and ``chargeflow rejections replay`` decide with:
    the configured prices (``pricing``, already read, or the pricing file), recorded in the
    store first, so that bills are derived from the recorded text wherever they are read."""
    pricing = pricing if pricing is not None else settings.load_pricing()
    recorded = await store.record_pricing(pricing, datetime.now(UTC))
    if recorded is None:
        raise ConfigError(
            f"pricing version {pricing.version} is already recorded with other prices;"
            " give the new prices a new version"
        )
    return UnitOfWork(
        store,
        dataclasses.replace(settings.policy, pricing_version=recorded.version),
        recorded,
        prefix=settings.topic_prefix,
        max_payload_bytes=settings.max_payload_bytes,
    )
