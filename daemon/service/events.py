"""What is decided, rendered and reported from one place: each kind of domain event in one
table, and a batch's rows.

An event is published (its outbound messages are rendered when its batch is decided, and
written with the batch, in the outbox) and reported (counted and logged once its batch is
committed). Storing it is the database adapter's own table (``daemon.db.store``); the events
not named here are stored and nothing more. A refused message is kept as a rejection row,
with the answer its publisher is sent (``rejection_row``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from daemon.db.store import BatchRows, OutboxEntry, RejectionRow
from daemon.metrics import Metrics
from daemon.mqtt.messages import billing_message, finalized_message, rejection_message
from daemon.mqtt.schemas import Rejection
from daemon.mqtt.topics import OutboundKind, TopicKind, topics_for
from daemon.service.arrival import Arrival, message_ref
from domain.billing import PricingRules, bill
from domain.commands import Command, RecordTelemetry
from domain.errors import Reason
from domain.events import DeferredMessageSettled, Event, MessageDeferred, SessionFinalized
from domain.session import Session

__all__ = [
    "Rendering", "batch_rows", "entry", "outbox_entries", "refusal", "rejection_row", "report",
]  # fmt: skip

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Rendering:
    """What rendering needs: the topic prefix and the prices bills are derived with."""

    prefix: str
    pricing: PricingRules


@dataclass(frozen=True, slots=True)
class _Handling:
    publish: Callable[[Rendering, Any], list[OutboxEntry]] | None = None
    report: Callable[[Metrics, Any], None] | None = None


def outbox_entries(rendering: Rendering, events: Sequence[Event]) -> list[OutboxEntry]:
    """The outbound messages of what was decided: rendered here, and only here."""
    entries: list[OutboxEntry] = []
    for event in events:
        handling = _ON_EVENT.get(type(event))
        if handling is not None and handling.publish is not None:
            entries += handling.publish(rendering, event)
    return entries


def report(metrics: Metrics, events: Sequence[Event]) -> None:
    """Count and log what a committed batch decided."""
    for event in events:
        handling = _ON_EVENT.get(type(event))
        if handling is not None and handling.report is not None:
            handling.report(metrics, event)


def entry(at: datetime, kind: OutboundKind, message: tuple[str, bytes]) -> OutboxEntry:
    topic, payload = message
    return OutboxEntry(at, kind.event, topic, payload)


def refusal(command: Command, topic: str, reason: Reason, detail: str) -> Rejection:
    """Why ``command``, sent on ``topic``, is refused: its ids named when it has them (SPEC)."""
    sample = command.sample if isinstance(command, RecordTelemetry) else None
    return Rejection(
        topic,
        command.bike_id,
        reason,
        detail,
        command.session_id,
        sample.telemetry_id if sample is not None else None,
    )


def batch_rows(
    rendering: Rendering,
    decided: tuple[list[Event], list[Session]],
    waiting: Sequence[Arrival] = (),
    rejections: Sequence[RejectionRow] = (),
) -> BatchRows:
    """What a batch decided (its events and the sessions it changed) as the rows to write;
    ``waiting`` are the arrivals it deferred, whose raw payloads the waiting room keeps."""
    events, changed = decided
    payloads = {message_ref(a.topic, a.payload): (a.topic, a.payload) for a in waiting}
    return BatchRows.of(
        events=events,
        changed=changed,
        outbox=outbox_entries(rendering, events),
        rejections=rejections,
        waiting_payloads=payloads,
    )


def storable(text: str) -> str:
    """Text PostgreSQL can hold and UTF-8 can encode: NUL and lone surrogates escaped."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def rejection_row(rendering: Rendering, arrival: Arrival, r: Rejection) -> RejectionRow:
    """A refused message as it is kept, with the answer its bike's publisher is sent."""
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
        message = rejection_message(rendering.prefix, r.bike_id, r, arrival.received_at)
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


# -- a session finalized -----------------------------------------------------------------


def _publish_finalized(rendering: Rendering, event: SessionFinalized) -> list[OutboxEntry]:
    s = event.session
    return [
        entry(s.finalized_at, OutboundKind.FINALIZED, finalized_message(rendering.prefix, s)),
        entry(
            s.finalized_at,
            OutboundKind.BILLING,
            billing_message(rendering.prefix, bill(s, rendering.pricing)),
        ),
    ]


def _report_finalized(metrics: Metrics, event: SessionFinalized) -> None:
    s = event.session
    metrics.finalized.labels(str(s.kind), str(s.end_reason)).inc()
    log.info(
        "session finalized",
        bike_id=s.bike_id,
        session_id=str(s.session_id),
        kind=str(s.kind),
        energy_wh=str(s.energy_wh),
        missing_samples=s.missing_samples,
        end_reason=str(s.end_reason),
    )


# -- a message set waiting, and settled ----------------------------------------------------


def _report_deferred(_: Metrics, event: MessageDeferred) -> None:
    log.info(
        "message waits for what it depends on",
        bike_id=event.bike_id,
        session_id=str(event.waiting.command.session_id),
    )


def _publish_settled(rendering: Rendering, event: DeferredMessageSettled) -> list[OutboxEntry]:
    """A waiting message refused when its grace ran out is answered like any refusal."""
    if event.reason is None:
        return []
    w = event.waiting
    kind = TopicKind.TELEMETRY if isinstance(w.command, RecordTelemetry) else TopicKind.LIFECYCLE
    topic = topics_for(rendering.prefix).bike(event.bike_id, kind)
    answer = refusal(w.command, topic, event.reason, event.detail or "")
    message = rejection_message(rendering.prefix, event.bike_id, answer, w.received_at)
    return [entry(w.received_at, OutboundKind.REJECTIONS, message)]


def _report_settled(metrics: Metrics, event: DeferredMessageSettled) -> None:
    metrics.waiting_settled.labels(event.reason or "applied").inc()
    if event.reason is not None:
        metrics.rejected.labels(event.reason).inc()
        log.info(
            "waiting message rejected: grace period over",
            bike_id=event.bike_id,
            reason=event.reason,
            detail=event.detail,
            session_id=str(event.waiting.command.session_id),
        )


_ON_EVENT: dict[type, _Handling] = {
    SessionFinalized: _Handling(publish=_publish_finalized, report=_report_finalized),
    MessageDeferred: _Handling(report=_report_deferred),
    DeferredMessageSettled: _Handling(publish=_publish_settled, report=_report_settled),
}
