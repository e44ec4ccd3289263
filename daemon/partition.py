"""Bike-affine instances: which bikes an instance takes, and how a change of layout stays safe.

With ``CHARGEFLOW_PARTITION=i/N`` an instance subscribes to every bike's topics with a plain
persistent subscription (which Mosquitto restores after a restart, unlike a shared one) and
takes the bikes whose slot, a CRC-32 of the bike id modulo N, is ``i``. The messages of other
bikes are acknowledged at once, in order, from the topic alone: no decoding, no database work.
PostgreSQL still serializes every bike, so the layout decides speed only, as long as every
message reaches at least one instance that takes it. Three rules keep that true:

- **Claims are registered.** Each instance writes its claim (``instance_partitions``) before
  it connects and refreshes it every second; the others read the claims every second.
- **Nobody's bikes are everybody's.** An instance also takes a bike that no other live claim
  covers (two instances on ``0/2`` and none on ``1/2``: both take every bike). A claim not
  refreshed for ``CHARGEFLOW_PARTITION_LEASE_S`` stops counting, so the bikes of an instance
  gone for good are taken over.
- **A changed claim keeps the old one until the backlog is in.** An instance that restarts
  with another claim (N changed) finds its previous claim in the table and takes both until
  what the broker queued for it while it was away has been taken (its inbox idle for a
  moment) and the others have seen the new claim; only then does it narrow.
"""

from __future__ import annotations

import asyncio
import re
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import structlog

__all__ = ["Ownership", "Partition", "PartitionRegistry", "bike_slot"]

log = structlog.get_logger(__name__)

_FORM = re.compile(r"(\d{1,4})/(\d{1,4})")


def bike_slot(bike_id: str | None, count: int) -> int:
    """The slot of a bike among ``count``: stable across processes, versions and machines.

    A topic that names no bike (``bikes//telemetry``) is slot 0's to answer."""
    if not bike_id or count == 1:
        return 0
    return zlib.crc32(bike_id.encode("utf-8", "surrogatepass")) % count


@dataclass(frozen=True, slots=True, order=True)
class Partition:
    """A share of the fleet: the bikes whose slot among ``count`` is ``index``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= 1024 or not 0 <= self.index < self.count:
            raise ValueError(
                f"partition {self.index}/{self.count} must be i/N with N from 1 to 1024 and "
                "i from 0 to N-1, e.g. 0/2"
            )

    @classmethod
    def parse(cls, text: str) -> Partition:
        match = _FORM.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"partition {text!r} must be i/N, e.g. 0/2 (the first of two)")
        return cls(int(match[1]), int(match[2]))

    def covers(self, bike_id: str | None) -> bool:
        return bike_slot(bike_id, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class Ownership:
    """Which bikes this instance takes now: its claims, or bikes no other live claim covers.

    ``takes`` is called for every inbound message: answers are cached per bike id until the
    view changes (a bounded cache: hostile topics cannot grow it without limit).
    """

    def __init__(self, mine: Iterable[Partition] = (), others: Iterable[Partition] = ()) -> None:
        self._takes: Callable[[str | None], bool] = lambda _bike: True
        self.mine: tuple[Partition, ...] = ()
        self.others: tuple[Partition, ...] = ()
        self.update(mine, others)

    @property
    def everything(self) -> bool:
        """True when this instance takes every bike (no partition, or ``0/1``)."""
        return not self.mine or any(p.count == 1 for p in self.mine)

    def update(self, mine: Iterable[Partition], others: Iterable[Partition]) -> None:
        mine, others = tuple(sorted(set(mine))), tuple(sorted(set(others)))
        if (mine, others) == (self.mine, self.others):
            return
        self.mine, self.others = mine, others
        if self.everything:
            self._takes = lambda _bike: True
            return

        def takes(bike_id: str | None) -> bool:
            if any(p.covers(bike_id) for p in mine):
                return True
            return not any(p.covers(bike_id) for p in others)

        self._takes = lru_cache(maxsize=65_536)(takes)

    def takes(self, bike_id: str | None) -> bool:
        return self._takes(bike_id)


class ClaimStore(Protocol):
    """What the registry needs of the database (``daemon.db.claims.Claims`` has it)."""

    async def register(self, client_id: str, partition: Partition) -> list[Partition]:
        """Write this instance's claim; return what it claimed before and has not settled."""
        ...

    async def live(self, client_id: str, lease_s: float) -> list[Partition]:
        """Refresh this instance's heartbeat; the other instances' claims within the lease."""
        ...

    async def settle(self, client_id: str) -> None:
        """The change of claim is settled: forget what this instance claimed before."""
        ...


class PartitionRegistry:
    """Registers this instance's claim, keeps the view of the others' fresh, and narrows a
    changed claim once what the broker queued under the old one has been taken."""

    def __init__(  # noqa: PLR0913 - keyword-only timings, built in app.Daemon._claim_partition
        self,
        store: ClaimStore,
        client_id: str,
        partition: Partition,
        ownership: Ownership,
        *,
        lease_s: float,
        idle: Callable[[], float],
        every_s: float = 1.0,
        settle_after_s: float = 3.0,
    ) -> None:
        self.store, self.client_id, self.partition = store, client_id, partition
        self.ownership = ownership
        self.lease_s, self.every_s, self.settle_after_s = lease_s, every_s, settle_after_s
        self._idle = idle  # seconds the inbox has been empty while connected (0 if not)
        self.previous: tuple[Partition, ...] = ()
        self._registered_at = 0.0

    async def claim(self) -> None:
        """Register before connecting: from here on, this instance takes its claim (and the
        claim it held before, until that is settled)."""
        self.previous = tuple(
            p for p in await self.store.register(self.client_id, self.partition)
            if p != self.partition
        )  # fmt: skip
        self._registered_at = time.monotonic()
        others = await self.store.live(self.client_id, self.lease_s)
        self.ownership.update((self.partition, *self.previous), others)
        log.info(
            "partition claimed",
            partition=str(self.partition),
            previous=[str(p) for p in self.previous] or None,
            others=sorted({str(p) for p in others}),
        )

    async def refresh(self) -> None:
        """One round: heartbeat and the others' claims; narrow a settled change."""
        if self.previous and self._settled():
            await self.store.settle(self.client_id)
            log.info(
                "partition change settled; taking only the new claim",
                partition=str(self.partition),
                released=[str(p) for p in self.previous],
            )
            self.previous = ()
        others = await self.store.live(self.client_id, self.lease_s)
        self.ownership.update((self.partition, *self.previous), others)

    def _settled(self) -> bool:
        since = time.monotonic() - self._registered_at
        return since >= self.settle_after_s and self._idle() >= 2 * self.every_s

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.refresh()
            except Exception as exc:  # the database is away: keep the view we have
                log.warning("partition claims not refreshed", error=repr(exc))
