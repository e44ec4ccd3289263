"""Acknowledging a committed batch: every PUBACK in arrival order, and what each message came
to, counted once per batch."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import structlog
from prometheus_client import Counter

from daemon.metrics import Metrics
from daemon.mqtt.topics import TopicKind
from daemon.service.arrival import Settled
from daemon.service.intake import KindCounters, Taken
from domain.events import Outcome

__all__ = ["acknowledge"]

log = structlog.get_logger(__name__)


def acknowledge(
    metrics: Metrics,
    counters: dict[TopicKind, KindCounters],
    batch: Sequence[Taken],
    settled: Sequence[Settled],
) -> None:
    """Acknowledge the whole batch in arrival order (MQTT-4.6.0-2), the messages of bikes
    this instance does not take included; ``settled`` holds what each of its own came to."""
    # Counted per batch: a counter's inc() takes a lock, a dict's += does not.
    tally: dict[Counter, int] = defaultdict(int)
    decided = iter(settled)
    for taken in batch:
        taken.delivery.ack()
        if not taken.mine:
            continue  # counted as not owned when it arrived
        item = next(decided)
        if item.dropped is not None:
            metrics.dropped.labels(item.dropped).inc()
        elif item.rejection is not None:
            _rejected(metrics, taken, item)
        else:
            tally[_counter(counters[taken.parsed.kind], item.outcome)] += 1
    for counter, count in tally.items():
        counter.inc(count)


def _counter(counters: KindCounters, outcome: Outcome | None) -> Counter:
    if outcome is Outcome.DUPLICATE:
        return counters.duplicates
    if outcome is Outcome.DEFERRED:
        return counters.deferred
    return counters.accepted


def _rejected(metrics: Metrics, taken: Taken, item: Settled) -> None:
    rejection = item.rejection
    assert rejection is not None
    metrics.rejected.labels(rejection.reason).inc()
    log.info(
        "message rejected",
        topic=taken.delivery.topic,
        bike_id=rejection.bike_id,
        reason=rejection.reason,
        detail=rejection.detail,
        session_id=str(rejection.session_id or "") or None,
    )
