"""What follows each kind of event (daemon/service/events.py): its outbound messages and what
it is counted as. The events not in the table are stored and nothing more."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from decimal import Decimal

from daemon.metrics import Metrics
from daemon.service.events import Rendering, outbox_entries, report
from domain.billing import bill
from domain.errors import Reason
from domain.events import (
    DeferredMessageSettled,
    MessageDeferred,
    SessionFinalized,
    SessionStarted,
    TelemetrySampleAccepted,
    Waiting,
)
from domain.session_values import EndReason, FinalizedSession, SessionKind
from tests.builders import T0, bike_id, sample, start
from tests.conftest import shipped_pricing

PREFIX = "fleet/v9"
RENDERING = Rendering(PREFIX, shipped_pricing())


def _finalized(bike: str) -> FinalizedSession:
    return FinalizedSession(
        uuid.uuid4(), bike, SessionKind.CHARGING, "station-2", T0, T0 + timedelta(hours=1),
        Decimal("2500"), Decimal(0), 40, 0, EndReason.TIMED_OUT, T0 + timedelta(hours=2),
    )  # fmt: skip


def test_a_finalized_session_is_published_as_its_record_then_its_bill():
    bike = bike_id()
    session = _finalized(bike)

    entries = outbox_entries(RENDERING, [SessionFinalized(session)])

    assert [(e.event, e.topic) for e in entries] == [
        ("session_finalized", f"{PREFIX}/bikes/{bike}/sessions/finalized"),
        ("billing", f"{PREFIX}/bikes/{bike}/billing"),
    ]
    assert all(e.created_at == session.finalized_at for e in entries)
    assert json.loads(entries[0].payload)["station_id"] == "station-2"
    assert json.loads(entries[1].payload)["amount"] == str(
        bill(session, RENDERING.pricing).amount.amount
    )


def test_a_waiting_message_refused_when_its_grace_ran_out_is_answered_on_its_bike():
    bike = bike_id()
    command = sample(start(bike), 7)
    waiting = Waiting(command, T0, b"ref")

    entries = outbox_entries(
        RENDERING,
        [DeferredMessageSettled(bike, waiting, Reason.UNKNOWN_SESSION, "no start came")],
    )

    assert [(e.event, e.topic) for e in entries] == [
        ("rejection", f"{PREFIX}/bikes/{bike}/rejections")
    ]
    assert json.loads(entries[0].payload) == {
        "topic": f"{PREFIX}/bikes/{bike}/telemetry",
        "reason": "unknown_session",
        "detail": "no start came",
        "session_id": str(command.session_id),
        "telemetry_id": str(command.sample.telemetry_id),
        "received_at": "2026-11-24T08:00:00Z",
    }


def test_stored_events_and_an_applied_waiting_message_publish_nothing():
    bike = bike_id()
    begun = start(bike)
    command = sample(begun, 1)
    events = [
        SessionStarted(begun.session_id, bike, begun.kind, "rider-1", T0, T0),
        TelemetrySampleAccepted(bike, command.sample, T0),
        MessageDeferred(bike, Waiting(command, T0, b"ref")),
        DeferredMessageSettled(bike, Waiting(command, T0, b"ref")),
    ]

    assert outbox_entries(RENDERING, events) == []


def test_finalizations_and_settled_waiting_messages_are_counted_by_what_they_came_to():
    metrics = Metrics()
    bike = bike_id()
    waiting = Waiting(sample(start(bike), 1), T0, b"ref")

    report(
        metrics,
        [
            SessionFinalized(_finalized(bike)),
            DeferredMessageSettled(bike, waiting),
            DeferredMessageSettled(bike, waiting, Reason.UNKNOWN_SESSION, "no start came"),
        ],
    )

    assert metrics.finalized.labels("charging", "timed_out")._value.get() == 1
    assert metrics.waiting_settled.labels("applied")._value.get() == 1
    assert metrics.waiting_settled.labels("unknown_session")._value.get() == 1
    assert metrics.rejected.labels("unknown_session")._value.get() == 1
