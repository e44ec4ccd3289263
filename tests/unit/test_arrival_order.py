"""Arrival order: a message that overtakes what it depends on waits, then is decided in order."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.billing import bill
from domain.commands import Command
from domain.errors import TimestampOutOfRange
from domain.events import (
    DeferredMessageSettled,
    Outcome,
    SessionFinalized,
    TelemetrySampleAccepted,
    Waiting,
)
from domain.fleet import Fleet
from domain.seqs import SeqRanges
from domain.session import ChargingSession, RideSession, Tally
from domain.session_values import EndReason, SessionEnd, SessionKind, SessionPolicy
from tests.builders import T0, bike_id, end, sample, start
from tests.unit.harness import FleetHarness
from tests.unit.test_billing import shipped_pricing

NOW = T0 + timedelta(hours=1)
GRACE = timedelta(seconds=5)
POLICY = SessionPolicy(finalize_grace=GRACE)
PRICING = shipped_pricing()


@pytest.fixture
def fleet() -> FleetHarness:
    return FleetHarness(Fleet(POLICY))


def ended_ride_as_stored(begun, **summary) -> RideSession:
    """A ride as the store would load it: ended (last_seq 3) at NOW, with this summary."""
    return RideSession(
        session_id=begun.session_id,
        bike_id=begun.bike_id,
        party_id="rider-1",
        started_at=T0,
        last_heard_at=NOW,
        end=SessionEnd(T0 + timedelta(minutes=30), 3, received_at=NOW),
        tally=Tally(**summary),
    )


def finalized_records(events) -> list:
    return [e.session for e in events if isinstance(e, SessionFinalized)]


def test_a_sample_before_its_start_waits_and_counts_once_the_start_arrives(fleet):
    begun = start(bike_id())
    early = sample(begun, 1, "12.5")
    assert fleet.handle(early, NOW).outcome is Outcome.DEFERRED
    decision = fleet.handle(begun, NOW + timedelta(seconds=1))
    assert decision.outcome is Outcome.ACCEPTED
    accepted = [e for e in decision.events if isinstance(e, TelemetrySampleAccepted)]
    assert [e.sample for e in accepted] == [early.sample]
    assert [e.reason for e in decision.events if isinstance(e, DeferredMessageSettled)] == [None]
    assert fleet.bikes[begun.bike_id].current.energy_wh == Decimal("12.5")
    assert fleet.bikes[begun.bike_id].waiting == ()


def test_an_end_before_its_start_waits_and_finalizes_once_the_samples_are_in(fleet):
    begun = start(bike_id())
    fleet.handle(end(begun, 1), NOW)
    fleet.handle(begun, NOW + timedelta(seconds=1))
    decision = fleet.handle(sample(begun, 1, "7"), NOW + timedelta(seconds=2))
    (record,) = finalized_records(decision.events)
    assert (record.energy_wh, record.missing_samples, record.end_reason) == (
        Decimal(7),
        0,
        EndReason.ENDED,
    )


def test_a_charging_start_before_the_rides_end_is_applied_after_the_ride_is_finalized(fleet):
    ride = start(bike_id())
    fleet.handle(ride, NOW)
    fleet.handle(sample(ride, 1, "100"), NOW)
    charging = start(ride.bike_id, SessionKind.CHARGING, at=T0 + timedelta(minutes=40))
    assert fleet.handle(charging, NOW + timedelta(seconds=1)).outcome is Outcome.DEFERRED
    decision = fleet.handle(end(ride, 1), NOW + timedelta(seconds=2))
    (record,) = finalized_records(decision.events)
    assert (record.session_id, record.energy_wh, record.missing_samples) == (
        ride.session_id,
        Decimal(100),
        0,
    )
    current = fleet.bikes[ride.bike_id].current
    assert isinstance(current, ChargingSession)
    assert current.session_id == charging.session_id


def test_a_redelivered_waiting_message_is_a_duplicate(fleet):
    begun = start(bike_id())
    early = sample(begun, 1)
    fleet.handle(early, NOW)
    assert fleet.handle(early, NOW + timedelta(seconds=1)).outcome is Outcome.DUPLICATE
    assert len(fleet.bikes[begun.bike_id].waiting) == 1


def test_a_waiting_message_applied_but_then_invalid_is_rejected_with_its_own_reason(fleet):
    begun = start(bike_id())
    too_early = sample(begun, 1, at=T0 - timedelta(minutes=1))
    fleet.handle(too_early, NOW)
    decision = fleet.handle(begun, NOW + timedelta(seconds=1))
    (settled,) = [e for e in decision.events if isinstance(e, DeferredMessageSettled)]
    assert settled.reason == "timestamp_out_of_range"
    assert fleet.bikes[begun.bike_id].current.telemetry_count == 0


def test_a_start_from_the_future_is_refused_at_once_even_while_the_bike_is_busy(fleet):
    first = start(bike_id())
    fleet.handle(first, NOW)
    with pytest.raises(TimestampOutOfRange):
        fleet.handle(start(first.bike_id, at=NOW + timedelta(days=1)), NOW)


def test_a_start_waiting_when_the_active_session_times_out_is_applied(fleet):
    first = start(bike_id())
    fleet.handle(first, NOW)
    second = start(first.bike_id, at=NOW)
    fleet.handle(second, NOW + POLICY.abandon_after - timedelta(seconds=1))
    events = fleet.expire(NOW + POLICY.abandon_after)
    assert finalized_records(events)[0].end_reason is EndReason.TIMED_OUT
    assert fleet.bikes[first.bike_id].current.session_id == second.session_id


def test_waiting_messages_loaded_from_the_store_are_applied_like_fresh_ones():
    """The reload path: another instance kept the sample waiting; this one takes the start."""
    fleet = Fleet(POLICY)
    begun = start(bike_id())
    early = sample(begun, 1, "3")
    fleet.load_bike(begun.bike_id, None, [Waiting(early, NOW, b"ref-1")])
    decision = fleet.handle(begun, NOW + timedelta(seconds=1))
    (settled,) = [e for e in decision.events if isinstance(e, DeferredMessageSettled)]
    assert (settled.waiting.ref, settled.reason) == (b"ref-1", None)
    assert fleet.bikes[begun.bike_id].current.energy_wh == Decimal(3)


def test_a_reloaded_session_with_its_end_pending_finalizes_when_its_grace_runs_out():
    fleet = Fleet(POLICY)
    begun = start(bike_id())
    stored = ended_ride_as_stored(
        begun,
        energy_wh=Decimal("2.5"),
        seqs=SeqRanges(((1, 2),)),
        latest_emitted_at=T0 + timedelta(minutes=1),
    )
    fleet.load_bike(begun.bike_id, stored)
    assert fleet.expire(NOW + timedelta(seconds=4)) == []
    (event,) = fleet.expire(NOW + GRACE)
    record = event.session
    assert (record.energy_wh, record.telemetry_count, record.missing_samples) == (
        Decimal("2.5"),
        2,
        1,
    )
    assert record.ended_at == T0 + timedelta(minutes=30)
    assert fleet.bikes[begun.bike_id].current is None


def test_a_reloaded_session_completes_with_the_one_seq_it_was_missing():
    fleet = Fleet(POLICY)
    begun = start(bike_id())
    stored = ended_ride_as_stored(begun, energy_wh=Decimal(20), seqs=SeqRanges(((1, 1), (3, 3))))
    fleet.load_bike(begun.bike_id, stored)
    decision = fleet.handle(sample(begun, 2, "5"), NOW + timedelta(seconds=1))
    (record,) = finalized_records(decision.events)
    assert (record.energy_wh, record.telemetry_count, record.missing_samples) == (
        Decimal(25),
        3,
        0,
    )


def test_a_bike_cannot_be_loaded_with_a_finalized_or_foreign_session():
    fleet = Fleet(POLICY)
    begun = start(bike_id())
    other = RideSession(
        session_id=begun.session_id,
        bike_id="someone-else",
        party_id="r",
        started_at=T0,
        last_heard_at=T0,
    )
    with pytest.raises(ValueError, match="not an Active session"):
        fleet.load_bike(begun.bike_id, other)


# -- any arrival order within the grace period gives the in-order result -----------------------


def _deliver(fleet: FleetHarness, arrivals: list[Command]) -> dict:
    """Deliver messages 100 ms apart (all inside the grace period); the finalized records."""
    now = NOW
    records = {}
    for command in arrivals:
        now += timedelta(milliseconds=100)
        fleet.handle(command, now)
    for event in fleet.pop_events() + fleet.expire(now + GRACE * 3):
        if isinstance(event, SessionFinalized):
            records[event.session.session_id] = event.session
    return records


def _comparable(record):
    # finalized_at is when the last message happened to arrive: the only field that may differ.
    return replace(record, finalized_at=NOW)


@st.composite
def session_messages(draw, bike: str, session_id: uuid.UUID):
    kind = draw(st.sampled_from(SessionKind))
    begun = start(bike, kind, session_id=session_id)
    energies = draw(
        st.lists(st.decimals(0, 10**6, places=3, allow_nan=False), min_size=0, max_size=8)
    )
    samples = [
        sample(begun, seq, wh, distance="1.5" if seq % 2 else None)
        for seq, wh in enumerate(energies, 1)
    ]
    return [begun, *samples, end(begun, len(samples))]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_arrival_order_gives_the_finalized_record_and_bill_of_in_order_delivery(data):
    ids = data.draw(st.lists(st.uuids(), min_size=2, max_size=2, unique=True))
    first = data.draw(session_messages("bike-a", ids[0]))
    second = data.draw(session_messages("bike-b", ids[1]))
    in_order = _deliver(FleetHarness(Fleet(POLICY)), first + second)
    shuffled = data.draw(st.permutations(first + second))
    out_of_order = _deliver(FleetHarness(Fleet(POLICY)), shuffled)
    assert set(out_of_order) == set(in_order)
    for session_id, record in in_order.items():
        assert record.missing_samples == 0
        assert _comparable(out_of_order[session_id]) == _comparable(record)
        assert bill(out_of_order[session_id], PRICING) == bill(record, PRICING)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_second_session_of_the_bike_overtaking_the_first_ones_end_changes_neither(data):
    """Rides then charging on one bike: any order that keeps each session's samples before the
    next session's start gives the in-order records."""
    ids = data.draw(st.lists(st.uuids(), min_size=2, max_size=2, unique=True))
    ride = data.draw(session_messages("bike-a", ids[0]))
    charging = data.draw(session_messages("bike-a", ids[1]))
    charging[0] = replace(charging[0], occurred_at=T0 + timedelta(minutes=31))
    charging[1:-1] = [sample(charging[0], c.sample.seq, c.sample.energy.wh) for c in charging[1:-1]]
    charging[-1] = end(charging[0], len(charging) - 2)
    in_order = _deliver(FleetHarness(Fleet(POLICY)), ride + charging)
    # The ride's samples and start in any order, then the charging start overtakes the ride's
    # end, then the charging session's own messages in any order.
    head = data.draw(st.permutations(ride[:-1]))
    tail = data.draw(st.permutations(charging[1:]))
    out_of_order = _deliver(FleetHarness(Fleet(POLICY)), [*head, charging[0], ride[-1], *tail])
    assert {k: _comparable(v) for k, v in out_of_order.items()} == {
        k: _comparable(v) for k, v in in_order.items()
    }
