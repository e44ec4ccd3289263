"""The fleet as far as this instance has read it from the store, and at which version.

The domain's ``Fleet`` decides; this knows what it was given. Each cached bike carries the
version the store gave it when this instance last locked it (``Store.lock_bikes`` bumps it
for every writer): at the next lock, the version after ours means nobody else took the bike
since, and anything else means another writer did, and the bike is read again. Before a
batch is decided, ``load`` reads what its decisions need that the cache lacks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

import structlog

from daemon.db.store import Store, WaitingRow
from daemon.mqtt.schemas import decode
from daemon.service.unit_of_work import UnitOfWork
from domain.commands import Command
from domain.events import Event, Waiting
from domain.fleet import Decision, Fleet
from domain.session import Session
from domain.session_values import SessionPolicy

__all__ = ["BikeVersions", "FleetCache"]

log = structlog.get_logger(__name__)


class BikeVersions:
    """The version of each cached bike, as the store gave it when we last locked it."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def knows(self, bike_ids: Iterable[str]) -> bool:
        """Whether every one of these bikes is cached (a batch can be decided on the cache)."""
        seen = self._seen
        return all(bike_id in seen for bike_id in bike_ids)

    def knows_any(self, bike_ids: Iterable[str]) -> bool:
        """Whether any of these bikes is cached."""
        seen = self._seen
        return any(bike_id in seen for bike_id in bike_ids)

    def stale(self, locked: Mapping[str, int]) -> list[str]:
        """Take the versions the lock gave these bikes; return those to read again: the ones
        we do not have, and those another writer took since we last wrote them."""
        seen, stale = self._seen, []
        for bike_id, version in locked.items():
            ours = seen.get(bike_id)
            if ours is not None and ours + 1 == version:
                seen[bike_id] = version
            else:
                stale.append(bike_id)
        return stale

    def read(self, bike_id: str, version: int) -> None:
        """The bike was read from the store at this version."""
        self._seen[bike_id] = version

    def assume_written(self, bike_ids: Iterable[str]) -> dict[str, int]:
        """Decide ahead of the lock: take these bikes as written by us once more, and return
        the versions the store must give them when they are locked. Any other version means
        another writer was there, and what was decided on this cache is decided again."""
        seen, expected = self._seen, {}
        for bike_id in bike_ids:
            seen[bike_id] += 1
            expected[bike_id] = seen[bike_id]
        return expected


class FleetCache:
    """A ``Fleet`` filled from the store as batches need it; dropped whole after a failure."""

    def __init__(
        self, policy: SessionPolicy, *, prefix: str, max_payload_bytes: int, finalized_cache: int
    ) -> None:
        self.policy = policy
        self.prefix = prefix  # waiting messages are kept raw, and decoded when read back
        self.max_payload_bytes = max_payload_bytes
        self.finalized_cache = finalized_cache
        self.fleet = Fleet(policy, finalized_cache)
        self.versions = BikeVersions()

    def reset(self) -> None:
        """Forget everything: after a failed transaction the store is the truth."""
        self.fleet = Fleet(self.policy, self.finalized_cache)
        self.versions = BikeVersions()

    def ahead(self, commands: Sequence[Command]) -> dict[str, int] | None:
        """To decide these commands on the cache alone, without the store: the versions their
        bikes must have once locked (``BikeVersions.assume_written``); None when the cache
        lacks something their decisions need."""
        fleet, bike_ids = self.fleet, {c.bike_id for c in commands}
        if (
            not self.versions.knows(bike_ids)
            or fleet.sessions_decisions_need(commands)
            or fleet.samples_decisions_need(commands)
        ):
            return None
        return self.versions.assume_written(bike_ids)

    def handle(self, command: Command, at: datetime, ref: bytes) -> Decision:
        """Decide one command on the cached fleet (``Fleet.handle``)."""
        return self.fleet.handle(command, at, ref)

    def decided(self) -> tuple[list[Event], list[Session]]:
        """The events since the last batch, and the sessions whose summary changed: the
        batch's decisions, handed over once (the fleet starts the next batch)."""
        changed = self.fleet.changed_sessions()
        return self.fleet.pop_events(), changed

    def expire(self, now: datetime, bike_ids: Sequence[str]) -> None:
        """Finalize these bikes' due sessions and settle their overdue waiting messages."""
        self.fleet.expire(now, bike_ids)

    async def lock(self, uow: UnitOfWork, bike_ids: Iterable[str]) -> None:
        """Lock these bikes (in bike_id order) and read again those another writer took."""
        locked = await uow.lock_bikes(bike_ids)
        stale = []
        for bike_id in self.versions.stale(locked):
            if locked[bike_id] == Store.CREATED_VERSION:
                # The lock created its row: no session or waiting message can name it yet, so
                # there is nothing to read (a fleet's first rides cost no load).
                self._know(bike_id, locked[bike_id])
            else:
                stale.append(bike_id)
        if stale:
            await self._read_bikes(uow, stale, locked)

    async def load(
        self, uow: UnitOfWork, commands: Sequence[Command], telemetry_ids: bool = False
    ) -> None:
        """Read what these commands' decisions need that the cache lacks: sessions other than
        their bike's Active one, stored samples at taken seqs, and (``telemetry_ids``) the
        owners of their telemetry ids."""
        fleet = self.fleet
        session_ids = fleet.sessions_decisions_need(commands)
        if session_ids:
            for session in await uow.sessions(session_ids):
                fleet.load_session(session)
        keys = fleet.samples_decisions_need(commands)
        if keys:
            fleet.load_samples(await uow.samples(keys))
        if telemetry_ids:
            owners = await uow.telemetry_owners(Fleet.telemetry_keys(commands))
            fleet.load_telemetry_owners(owners)

    def active_count(self) -> int:
        return self.fleet.active_count()

    # -- inside ----------------------------------------------------------------------------

    def _know(self, bike_id: str, version: int) -> None:
        self.fleet.load_bike(bike_id, None)
        self.versions.read(bike_id, version)

    async def _read_bikes(
        self, uow: UnitOfWork, bike_ids: Sequence[str], locked: Mapping[str, int]
    ) -> None:
        active, rows = await uow.bikes(bike_ids)
        waiting: dict[str, list[Waiting]] = {}
        for row in rows:
            item = self._waiting(row)
            if item is not None:
                waiting.setdefault(row.bike_id, []).append(item)
        for bike_id in bike_ids:
            self.fleet.load_bike(bike_id, active.get(bike_id), waiting.get(bike_id, ()))
            self.versions.read(bike_id, locked[bike_id])

    def _waiting(self, row: WaitingRow) -> Waiting | None:
        inbound = decode(row.topic, row.payload, self.prefix, self.max_payload_bytes)
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
