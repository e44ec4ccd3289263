"""Decisions a fleet operator relies on, pinned one by one: what a batch writes, whose sessions
a sweep settles, redelivery inside one batch, the fields of the fixed record, and the
boundaries where a rule flips."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import pytest

from domain.analytics import project
from domain.commands import EndSession, StartSession
from domain.errors import InvalidValue, SessionIdConflict
from domain.events import Outcome, SessionEndReceived, SessionFinalized, SessionStarted
from domain.fleet import Fleet
from domain.session_values import EndReason, FinalizedSession, SessionKind, SessionPolicy
from tests.builders import T0, bike_id, end, sample, start

NOW = T0 + timedelta(hours=1)
POLICY = SessionPolicy(finalize_grace=timedelta(seconds=5), abandon_after=timedelta(hours=24))


def fresh(*bikes: str, policy: SessionPolicy = POLICY) -> Fleet:
    """A fleet that knows these bikes, none with an Active session (as the store would say)."""
    fleet = Fleet(policy)
    for bike in bikes:
        fleet.load_bike(bike, None)
    return fleet


def finalized_in(events) -> list[FinalizedSession]:
    return [e.session for e in events if isinstance(e, SessionFinalized)]


# -- what a batch writes -------------------------------------------------------------------


def test_a_started_session_is_written_by_its_start_alone_until_something_changes_it():
    a, b = start(bike_id()), start(bike_id())
    fleet = fresh(a.bike_id, b.bike_id)
    (started,) = fleet.handle(a, NOW).events
    fleet.handle(b, NOW)
    # The start's row is the whole summary: a new session is not written a second time.
    assert isinstance(started, SessionStarted) and started.received_at == NOW
    session = fleet.bikes[a.bike_id].current
    assert session is not None and session.last_heard_at == started.received_at
    assert fleet.changed_sessions() == []
    fleet.handle(sample(a, 1), NOW)  # the same batch: its summary is written after the start
    assert [s.session_id for s in fleet.changed_sessions()] == [a.session_id]
    fleet.pop_events()
    assert fleet.changed_sessions() == []  # the batch ended: nothing left to write
    fleet.handle(sample(b, 1), NOW)
    assert [s.session_id for s in fleet.changed_sessions()] == [b.session_id]


def test_a_redelivered_sample_gives_the_batch_nothing_to_write():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    first = sample(a, 1)
    fleet.handle(first, NOW)
    fleet.pop_events()
    fleet.load_samples([first.sample])
    assert fleet.handle(first, NOW).outcome is Outcome.DUPLICATE
    assert fleet.changed_sessions() == []


def test_a_session_finalized_by_the_sweep_is_written_by_that_sweep():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    fleet.handle(end(a, 1), NOW)
    fleet.pop_events()
    (done,) = finalized_in(fleet.expire(NOW + timedelta(seconds=5), [a.bike_id]))
    assert [s.session_id for s in fleet.changed_sessions()] == [done.session_id]
    assert fleet.changed_sessions()[0].finalized == done


def test_a_session_whose_grace_a_new_start_cut_short_is_written_with_that_start():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    fleet.handle(end(a, 2), NOW)  # sample 2 never comes
    following = start(a.bike_id, at=T0 + timedelta(hours=1))
    assert fleet.handle(following, NOW).outcome is Outcome.DEFERRED
    fleet.pop_events()
    events = fleet.expire(NOW + timedelta(seconds=5), [a.bike_id])
    (cut,) = finalized_in(events)
    assert (cut.session_id, cut.end_reason, cut.missing_samples) == (
        a.session_id,
        EndReason.ENDED,
        2,
    )
    # The cut session's summary is written; the start, by its own row, in the same batch.
    assert [s.session_id for s in fleet.changed_sessions()] == [a.session_id]
    assert [e.session_id for e in events if isinstance(e, SessionStarted)] == [following.session_id]


def test_a_sweep_settles_only_the_bikes_it_is_given():
    a, b = start(bike_id()), start(bike_id())
    fleet = fresh(a.bike_id, b.bike_id)
    for begun in (a, b):
        fleet.handle(begun, NOW)
        fleet.handle(end(begun, 1), NOW)  # sample 1 never comes
    fleet.pop_events()
    # Both are past their grace period: only the bike this instance locked is finalized.
    events = fleet.expire(NOW + timedelta(minutes=1), [b.bike_id])
    assert [s.session_id for s in finalized_in(events)] == [b.session_id]
    assert fleet.bikes[a.bike_id].current is not None


# -- redelivery and id reuse inside one batch ------------------------------------------------


def test_a_sample_delivered_twice_in_one_batch_is_stored_once():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    twice = sample(a, 1, "12.5")
    assert fleet.handle(twice, NOW).outcome is Outcome.ACCEPTED
    assert fleet.handle(twice, NOW).outcome is Outcome.DUPLICATE
    assert fleet.bikes[a.bike_id].current.energy_wh == Decimal("12.5")


def test_a_telemetry_id_claimed_by_two_sessions_in_one_batch_is_the_first_ones():
    a, b = start(bike_id()), start(bike_id())
    fleet = fresh(a.bike_id, b.bike_id)
    fleet.handle(a, NOW)
    fleet.handle(b, NOW)
    fleet.load_telemetry_owners([])  # the store holds neither
    shared = uuid.uuid4()
    fleet.handle(sample(a, 1, telemetry_id=shared), NOW)
    clash = sample(b, 1, telemetry_id=shared)
    with pytest.raises(SessionIdConflict, match=f"telemetry_id {shared}"):
        fleet.handle(clash, NOW)


def test_the_stored_sample_of_every_taken_seq_is_asked_for_whatever_comes_before_it():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    first = sample(a, 1)
    fleet.handle(first, NOW)
    fleet.pop_events()
    wanted = fleet.samples_decisions_need([end(a, 3), sample(a, 2), first])
    assert wanted == {(a.session_id, 1)}


# -- the fixed record and its events -------------------------------------------------------


def test_the_end_received_event_says_which_session_ended_when_and_with_how_many_samples():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    ended = end(a, 4)
    (event,) = [e for e in fleet.handle(ended, NOW).events if isinstance(e, SessionEndReceived)]
    assert event == SessionEndReceived(a.session_id, a.bike_id, ended.occurred_at, 4, NOW)


def test_a_session_completed_by_its_last_sample_is_finalized_when_that_sample_came():
    a = start(bike_id(), party="rider-42")
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    fleet.handle(end(a, 1), NOW)
    later = NOW + timedelta(seconds=3)
    (done,) = finalized_in(fleet.handle(sample(a, 1, "7"), later).events)
    assert done == FinalizedSession(
        session_id=a.session_id,
        bike_id=a.bike_id,
        kind=SessionKind.RIDE,
        party_id="rider-42",
        started_at=a.occurred_at,
        ended_at=a.occurred_at + timedelta(minutes=30),
        energy_wh=Decimal(7),
        distance_m=Decimal(0),
        telemetry_count=1,
        missing_samples=0,
        end_reason=EndReason.ENDED,
        finalized_at=later,
        pricing_version=None,
    )


# -- boundaries ------------------------------------------------------------------------------


def test_an_end_at_the_very_instant_of_the_start_is_accepted():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    instant = EndSession(a.bike_id, a.session_id, a.kind, a.occurred_at, 0)
    (done,) = finalized_in(fleet.handle(instant, NOW).events)
    assert done.duration == timedelta(0)


def test_an_end_at_the_instant_of_the_latest_sample_is_accepted():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    last = sample(a, 1, at=a.occurred_at + timedelta(minutes=3))
    fleet.handle(last, NOW)
    at_it = EndSession(a.bike_id, a.session_id, a.kind, last.sample.emitted_at.at, 1)
    assert fleet.handle(at_it, NOW).outcome is Outcome.ACCEPTED


def test_a_zero_grace_period_is_a_policy_and_a_negative_one_is_not():
    assert SessionPolicy(finalize_grace=timedelta(0)).finalize_grace == timedelta(0)
    with pytest.raises(InvalidValue, match="finalize_grace must not be negative"):
        SessionPolicy(finalize_grace=timedelta(seconds=-1))


@pytest.mark.parametrize(("length", "accepted"), [(0, False), (1, True), (128, True), (129, False)])
def test_a_rider_or_station_id_is_1_to_128_characters(length, accepted):
    def build() -> StartSession:
        return StartSession(bike_id(), uuid.uuid4(), SessionKind.CHARGING, "s" * length, T0)

    if accepted:
        assert len(build().party_id) == length
    else:
        with pytest.raises(InvalidValue, match="station_id must be 1 to 128 characters"):
            build()


def test_last_seq_counts_from_zero():
    assert EndSession(bike_id(), uuid.uuid4(), SessionKind.RIDE, T0, 0).last_seq == 0
    with pytest.raises(InvalidValue, match="last_seq must be a whole number from 0, got -1"):
        EndSession(bike_id(), uuid.uuid4(), SessionKind.RIDE, T0, -1)


def test_analytics_totals_distance_and_missing_samples_over_every_session():
    def ride(distance: str, missing: int) -> FinalizedSession:
        return FinalizedSession(
            uuid.uuid4(), bike_id(), SessionKind.RIDE, "r", T0, T0 + timedelta(minutes=1),
            Decimal(1), Decimal(distance), 3, missing, EndReason.ENDED, NOW, "v1",
        )  # fmt: skip

    report = project([ride("1200.5", 1), ride("99.5", 2)], [])
    assert (report.rides.distance_m, report.rides.missing_samples) == (Decimal(1300), 3)
    assert (report.charging.distance_m, report.charging.missing_samples) == (Decimal(0), 0)


def test_an_instant_is_published_in_utc_whatever_the_machines_time_zone(monkeypatch):
    import time
    from datetime import timezone

    from daemon.documents import utc_text

    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        at = T0.astimezone(timezone(timedelta(hours=-7)))
        assert utc_text(at) == "2026-11-24T08:00:00Z"
    finally:
        monkeypatch.undo()
        time.tzset()
