"""Intake: what the MQTT link hands over, held in arrival order until a batch takes it.

Each message's topic is read here, once, as it arrives (``Taken.parsed``): whether it is one
of ours, which kind it is, whose bike, and so whether this instance takes it. Memory stays
bounded whatever the broker sends: past ``max_inbox`` messages or ``max_inbox_bytes`` of
payload (a stream of 60 KiB garbage is 60 times a stream of samples), the gate to the broker
closes until half of both is taken.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

from daemon.metrics import Metrics
from daemon.mqtt.delivery import Delivery, ReadGate
from daemon.mqtt.schemas import Inbound
from daemon.mqtt.topics import ParsedTopic, TopicKind, Topics

__all__ = ["Intake", "KindCounters", "Taken", "kind_counters"]


@dataclass(frozen=True, slots=True)
class KindCounters:
    """The per-message counters of one topic kind, their label children bound once: labels()
    per message was 3 % of the daemon's CPU draining a backlog."""

    received: Counter
    accepted: Counter
    duplicates: Counter
    deferred: Counter
    not_owned: Counter


def kind_counters(metrics: Metrics) -> dict[TopicKind, KindCounters]:
    return {
        kind: KindCounters(
            metrics.received.labels(kind),
            metrics.accepted.labels(kind),
            metrics.duplicates.labels(kind),
            metrics.deferred.labels(kind),
            metrics.not_owned.labels(kind),
        )
        for kind in TopicKind
    }


@dataclass(slots=True)  # not frozen: built per message (see Delivery)
class Taken:
    """A delivery with its topic read, and whether this instance decides it (``mine``): an
    inbound topic of a bike it takes. The others are only acknowledged, in order."""

    delivery: Delivery
    parsed: ParsedTopic
    mine: bool
    # Decoded while it waited, when the loop had nothing else to do (Pipeline.decode_ahead).
    inbound: Inbound | None = None


class Intake:
    """The inbox between the link and the batches, and the gate that bounds it."""

    def __init__(  # noqa: PLR0913 - the limits, by keyword, from PipelineConfig
        self,
        metrics: Metrics,
        topics: Topics,
        takes: Callable[[str | None], bool],
        gate: ReadGate,
        *,
        max_inbox: int,
        max_inbox_bytes: int,
    ) -> None:
        self.metrics = metrics
        self.topics = topics
        # Bike-affine instances (daemon.partition): the messages of bikes this instance does
        # not take are acknowledged in order with the batch, from the topic alone.
        self.takes = takes
        self.gate = gate
        self.max_inbox = max_inbox
        self.max_inbox_bytes = max_inbox_bytes
        self.counters = kind_counters(metrics)
        self.inbox: deque[Taken] = deque()
        self.arrived = asyncio.Event()  # cleared by the pipeline when the inbox is empty
        self.more = asyncio.Event()  # cleared by whoever waits for the next arrival
        self._bytes = 0
        self._busy_at = time.monotonic()
        # Tallied here, added to the counters as the batch is taken: a counter's inc() takes
        # a lock, and this runs for every message.
        self._arrivals: dict[Counter, int] = defaultdict(int)

    def __len__(self) -> int:
        return len(self.inbox)

    def read(self, delivery: Delivery) -> Taken:
        """A delivery with its topic read: the one time it is."""
        parsed = self.topics.parse(delivery.topic)
        # An outbound topic heard back (the one-filter subscription) is no inbound message.
        return Taken(delivery, parsed, not parsed.outbound and self.takes(parsed.bike_id))

    def put(self, delivery: Delivery) -> None:
        """One message from the link: its topic read, counted, held; the gate closed if the
        inbox is full."""
        taken = self.read(delivery)
        if not taken.parsed.outbound:
            counters = self.counters[taken.parsed.kind]
            self._arrivals[counters.received if taken.mine else counters.not_owned] += 1
        self.inbox.append(taken)
        self._bytes += len(delivery.payload)
        self.arrived.set()
        self.more.set()
        if not self.gate.closed and (
            len(self.inbox) >= self.max_inbox or self._bytes >= self.max_inbox_bytes
        ):
            self.metrics.intake_paused.set(1)
            self.gate.close()

    def take(self, most: int) -> list[Taken]:
        """What has arrived, in arrival order, up to ``most``; the gate opened again once half
        of both limits is free."""
        self._busy_at = time.monotonic()
        for counter, count in self._arrivals.items():
            counter.inc(count)
        self._arrivals.clear()
        batch = [self.inbox.popleft() for _ in range(min(len(self.inbox), most))]
        self._bytes -= sum(len(t.delivery.payload) for t in batch)
        if (
            self.gate.closed
            and len(self.inbox) <= self.max_inbox // 2
            and self._bytes <= self.max_inbox_bytes // 2
        ):
            self.metrics.intake_paused.set(0)
            self.gate.open()
        return batch

    def idle_s(self) -> float:
        """How long nothing has waited in the inbox (0 while something does)."""
        return 0.0 if self.inbox else time.monotonic() - self._busy_at
