"""Ordered, batched processing: take what has arrived, decode it, commit it, acknowledge it.

One task takes what has arrived (``daemon.service.intake``, up to ``max_batch``), decodes each
message of a bike this instance takes, once, and hands the batch to the commit policy
(``daemon.service.commits``), which has ingestion decide every message in arrival order and
commit the batch in one transaction; only then are the batch's messages acknowledged, in order
(``daemon.service.acks``). Between batches, every ``sweep_every_s``, the expiry sweep
(``daemon.service.expiry``).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from daemon.metrics import Metrics
from daemon.mqtt.delivery import Delivery, ReadGate
from daemon.mqtt.schemas import Inbound, Rejection, decode
from daemon.mqtt.topics import topics_for
from daemon.service.acks import acknowledge
from daemon.service.arrival import Arrival
from daemon.service.commits import Batch, Batches, Commits
from daemon.service.expiry import Expiry
from daemon.service.intake import Intake, Taken
from domain.errors import Reason

__all__ = ["Pipeline", "PipelineConfig"]

log = structlog.get_logger(__name__)

_YIELD_EVERY = 16  # messages decoded between two turns given to the batch in flight


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """The pipeline's settings (``app.Daemon._wire`` fills them from ``Settings``)."""

    prefix: str
    max_batch: int = 1000
    max_payload_bytes: int = 16_384
    sweep_every_s: float = 0.5
    abandon_check_s: float = 30.0
    max_inbox: int = 1000
    max_inbox_bytes: int = 8 * 1024 * 1024
    # Pipelined: a batch's rows are written and committed while the next batch is decoded,
    # locked and decided (Ingestion.begin_batch / finish_batch); acknowledged in order.
    pipelined: bool = False


class Pipeline:
    """Turns deliveries into committed state and outbox rows; acknowledges after commit."""

    def __init__(  # noqa: PLR0913 - the collaborators, then the hooks by keyword (app.py)
        self,
        batches: Batches,
        metrics: Metrics,
        config: PipelineConfig,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_commit: Callable[[], None] = lambda: None,
        gate: ReadGate | None = None,
        takes: Callable[[str | None], bool] = lambda _bike_id: True,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.topics = topics_for(config.prefix)
        self.intake = Intake(
            metrics, self.topics, takes, gate if gate is not None else ReadGate(),
            max_inbox=config.max_inbox, max_inbox_bytes=config.max_inbox_bytes,
        )  # fmt: skip
        acks = functools.partial(acknowledge, metrics, self.intake.counters)
        self.commits = Commits(
            batches, metrics, acks, on_commit=on_commit, pipelined=config.pipelined,
            meanwhile=self.decode_ahead, more=self.intake.more,
        )  # fmt: skip
        self._decoded_ahead = 0  # the inbox's first messages already decoded
        self.expiry = Expiry(
            batches, metrics, takes, abandon_check_s=config.abandon_check_s, on_commit=on_commit
        )
        self.accepting = True
        self._stopping = False

    @property
    def batch_sizes(self) -> Sequence[int]:
        """The most recent batch sizes, for ``chargeflow bench``."""
        return self.commits.batch_sizes

    def deliver(self, delivery: Delivery) -> None:
        """Called by the MQTT link for every message; after shutdown began, leave it unacked."""
        if self.accepting:
            self.intake.put(delivery)

    def read(self, deliveries: Sequence[Delivery]) -> list[Taken]:
        """Deliveries as the intake would hold them, for callers that hold them already."""
        return [self.intake.read(d) for d in deliveries]

    def next_batch(self) -> list[Taken]:
        """What has arrived, in arrival order, up to max_batch."""
        batch = self.intake.take(self.config.max_batch)
        self._decoded_ahead = max(0, self._decoded_ahead - len(batch))
        return batch

    def decode_ahead(self) -> bool:
        """Decode up to ``_YIELD_EVERY`` of the messages waiting in the inbox, oldest first,
        while the batch before waits for the one in flight: at 10,000 msg/s decoding was a
        third of the daemon's work, done between the two round trips of a commit. False when
        every waiting message is decoded already."""
        inbox, start = self.intake.inbox, self._decoded_ahead
        end = min(len(inbox), start + _YIELD_EVERY)
        for i in range(start, end):
            taken = inbox[i]
            if taken.mine:
                taken.inbound = self._decode(taken)
        self._decoded_ahead = end
        return end > start

    async def run(self) -> None:
        """Process batches until stopped; sweep expired sessions every ``sweep_every_s``."""
        every = self.config.sweep_every_s
        last_sweep = time.monotonic()
        while not self._stopping:
            if not self.intake.inbox and self.commits.in_flight:
                # Nothing to overlap it with: wait for the batch in flight now, so that one that
                # failed is decided again at once, not when the next message comes.
                await self.commits.finish_in_flight()
            if not self.intake.inbox and not self.expiry.answered:
                await self._until_arrival_or_answer(every)
            if time.monotonic() - last_sweep >= every and self.expiry.answer is None:
                # Asked in the background; what it names is expired at a later turn, between
                # two batches (the store's answer must not keep the batches waiting).
                self.expiry.ask(self._sweep_now())
                last_sweep = time.monotonic()
            if self.expiry.answered:
                await self.expiry.apply(self.commits.finish_in_flight)
            if self.intake.inbox:
                await self.process(self.next_batch())
        self.expiry.cancel()
        await self.commits.finish_in_flight()

    async def _until_arrival_or_answer(self, within_s: float) -> None:
        """Until a message arrives, the store answers the sweep's question, or ``within_s``."""
        self.intake.arrived.clear()
        arrival = asyncio.ensure_future(self.intake.arrived.wait())
        waits: list[asyncio.Future[Any]] = [arrival]
        if self.expiry.answer is not None:
            waits.append(self.expiry.answer)
        await asyncio.wait(waits, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
        arrival.cancel()

    def idle_s(self) -> float:
        """How long nothing has waited in the inbox (0 while something does)."""
        return self.intake.idle_s()

    def stop(self) -> None:
        """Take no new messages; ``run`` returns after the batch in hand is committed."""
        self.accepting = False
        self._stopping = self.commits.stopping = True

    async def drain(self, timeout_s: float = 20.0) -> None:
        """Commit and acknowledge what has arrived but is not processed yet (SIGTERM)."""
        self.stop()
        deadline = time.monotonic() + timeout_s
        while self.intake.inbox and time.monotonic() < deadline:
            await asyncio.wait_for(
                self.process(self.next_batch()), timeout=max(0.1, deadline - time.monotonic())
            )
        await asyncio.wait_for(
            self.commits.finish_in_flight(), timeout=max(0.1, deadline - time.monotonic())
        )

    async def finish_in_flight(self) -> None:
        """Wait for the batch committed in the background, if any (acknowledged in order)."""
        await self.commits.finish_in_flight()

    async def process(self, batch: Sequence[Taken]) -> None:
        """Decode the messages this instance takes, commit the batch, then acknowledge it."""
        arrivals = []
        for i, taken in enumerate(batch, start=1):
            if taken.mine:
                d, inbound = taken.delivery, taken.inbound
                if inbound is None:
                    inbound = self._decode(taken)
                arrivals.append(Arrival(d.topic, d.payload, d.received_at, inbound))
            if i % _YIELD_EVERY == 0 and self.commits.in_flight:
                # Let the batch in flight take its next round trip to PostgreSQL: its write
                # and commit overlap this decoding only if it gets a turn of the loop.
                await asyncio.sleep(0)
        await self.commits.commit(Batch(batch, arrivals))

    async def sweep(self) -> None:
        """The expiry sweep; what it expires, after the batch in flight is in. "Now" is never
        later than the oldest message still waiting in the inbox: a sample that arrived
        inside the grace period is not refused because it waited here."""
        await self.expiry.sweep(self._sweep_now(), self.commits.finish_in_flight)

    def _sweep_now(self) -> datetime:
        inbox = self.intake.inbox
        return min(self.clock(), inbox[0].delivery.received_at) if inbox else self.clock()

    def _decode(self, taken: Taken) -> Inbound:
        d = taken.delivery
        try:
            return decode(d.topic, d.payload, self.topics, self.config.max_payload_bytes,
                          taken.parsed)  # fmt: skip
        except Exception as exc:
            # decode answers every bad payload with a rejection; reaching here is our bug. The
            # message is still kept (with its raw payload, for replay once the bug is fixed).
            log.exception("message could not be decoded", topic=d.topic)
            parsed = taken.parsed
            why = f"payload could not be decoded ({type(exc).__name__}); kept for replay"
            return Inbound(
                parsed.kind,
                parsed.bike_id,
                rejection=Rejection(d.topic, parsed.bike_id, Reason.SCHEMA_VIOLATION, why),
            )
