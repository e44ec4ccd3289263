"""The Session context's rules, as the fleet applies them to commands."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

import pytest

from domain.commands import Command
from domain.errors import (
    DomainError,
    SeqBeyondEnd,
    SessionAlreadyFinalized,
    SessionIdConflict,
    SessionKindMismatch,
    TimestampOutOfRange,
    UnknownSession,
)
from domain.events import (
    DeferredMessageSettled,
    MessageDeferred,
    Outcome,
    SessionEndReceived,
    SessionFinalized,
    SessionStarted,
    TelemetrySampleAccepted,
)
from domain.fleet import Decision, Fleet
from domain.seqs import SeqRanges
from domain.session import ChargingSession, RideSession, Tally
from domain.session_values import EndReason, SessionKind, SessionPolicy, SessionState
from tests.builders import T0, bike_id, end, sample, start
from tests.unit.harness import FleetHarness

NOW = T0 + timedelta(hours=1)
POLICY = SessionPolicy(finalize_grace=timedelta(seconds=5), abandon_after=timedelta(hours=24))


def handle(fleet: FleetHarness, command: Command, now=NOW) -> Decision:
    return fleet.handle(command, now)


def finalized(decision: Decision) -> list[SessionFinalized]:
    return [e for e in decision.events if isinstance(e, SessionFinalized)]


@pytest.fixture
def fleet() -> FleetHarness:
    return FleetHarness(Fleet(POLICY))


def test_a_started_ride_is_active_with_its_rider(fleet):
    begun = start(bike_id(), party="rider-7")
    decision = handle(fleet, begun)
    assert decision.outcome is Outcome.ACCEPTED
    session = fleet.bikes[begun.bike_id].current
    assert isinstance(session, RideSession)
    assert session.state is SessionState.ACTIVE
    assert session.rider_id == "rider-7"
    assert decision.events == (
        SessionStarted(begun.session_id, begun.bike_id, SessionKind.RIDE, "rider-7", T0, NOW),
    )


def test_a_charging_session_is_at_a_station(fleet):
    begun = start(bike_id(), SessionKind.CHARGING, party="station-3")
    handle(fleet, begun)
    session = fleet.bikes[begun.bike_id].current
    assert isinstance(session, ChargingSession)
    assert session.station_id == "station-3"


def test_a_start_while_the_active_session_has_not_ended_waits(fleet):
    first = start(bike_id())
    handle(fleet, first)
    second = start(first.bike_id, SessionKind.CHARGING)
    decision = handle(fleet, second)
    assert decision.outcome is Outcome.DEFERRED
    assert [type(e) for e in decision.events] == [MessageDeferred]
    assert fleet.bikes[first.bike_id].current.session_id == first.session_id


def test_a_bike_has_at_most_one_active_session_once_the_grace_period_is_over(fleet):
    first = start(bike_id())
    handle(fleet, first)
    handle(fleet, start(first.bike_id, SessionKind.CHARGING))
    (settled,) = fleet.expire(NOW + POLICY.finalize_grace)
    assert isinstance(settled, DeferredMessageSettled)
    assert settled.reason == "active_session_exists"
    assert fleet.bikes[first.bike_id].current.session_id == first.session_id
    assert fleet.bikes[first.bike_id].waiting == ()


def test_different_bikes_have_sessions_at_the_same_time(fleet):
    handle(fleet, start(bike_id()))
    handle(fleet, start(bike_id()))
    assert fleet.active_count() == 2


def test_a_redelivered_start_is_a_duplicate_not_a_rejection(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    decision = handle(fleet, begun)
    assert decision == Decision(Outcome.DUPLICATE)


def test_the_same_session_id_with_different_content_is_a_conflict(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    with pytest.raises(SessionIdConflict) as err:
        handle(fleet, replace(begun, party_id="someone-else"))
    assert err.value.reason == "session_id_conflict"


def test_a_session_id_of_another_bike_is_a_conflict(fleet):
    """The store names the other bike's session; the fleet loads it and refuses the start."""
    begun = start(bike_id())
    handle(fleet, begun)
    with pytest.raises(SessionIdConflict):
        handle(fleet, replace(begun, bike_id=bike_id()))


def test_a_start_from_the_future_is_out_of_range(fleet):
    with pytest.raises(TimestampOutOfRange) as err:
        handle(fleet, start(bike_id(), at=NOW + timedelta(hours=1)))
    assert err.value.reason == "timestamp_out_of_range"


def test_a_start_within_the_clock_skew_is_accepted(fleet):
    decision = handle(fleet, start(bike_id(), at=NOW + POLICY.clock_skew))
    assert decision.outcome is Outcome.ACCEPTED


def test_telemetry_is_accepted_for_the_active_session_and_changes_no_state(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    decision = handle(fleet, sample(begun, 1, "12.5"))
    assert decision.outcome is Outcome.ACCEPTED
    assert [type(e) for e in decision.events] == [TelemetrySampleAccepted]
    session = fleet.session(begun.session_id)
    assert session.state is SessionState.ACTIVE
    assert session.end is None


def test_telemetry_for_a_session_nobody_started_waits_then_is_unknown(fleet):
    begun = start(bike_id())
    assert handle(fleet, sample(begun, 1)).outcome is Outcome.DEFERRED
    assert fleet.expire(NOW + timedelta(seconds=4)) == []
    (settled,) = fleet.expire(NOW + POLICY.finalize_grace)
    assert (settled.reason, settled.waiting.command.session_id) == (
        "unknown_session",
        begun.session_id,
    )


def test_telemetry_naming_another_bikes_session_is_unknown(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    with pytest.raises(UnknownSession):
        handle(fleet, sample(replace(begun, bike_id=bike_id()), 1))


def test_a_redelivered_sample_is_a_duplicate(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    once = sample(begun, 1)
    handle(fleet, once)
    assert handle(fleet, once) == Decision(Outcome.DUPLICATE)
    assert fleet.session(begun.session_id).telemetry_count == 1


def test_a_telemetry_id_reused_with_different_content_is_a_conflict(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    once = sample(begun, 1, "10")
    handle(fleet, once)
    with pytest.raises(SessionIdConflict):
        handle(fleet, sample(begun, 1, "11", telemetry_id=once.sample.telemetry_id))


def test_a_seq_taken_by_another_sample_is_a_conflict(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, sample(begun, 1))
    with pytest.raises(SessionIdConflict, match="seq 1"):
        handle(fleet, sample(begun, 1))


def test_a_sample_emitted_before_the_session_started_is_out_of_range(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    with pytest.raises(TimestampOutOfRange, match="before the session started"):
        handle(fleet, sample(begun, 1, at=T0 - timedelta(seconds=1)))


def test_a_sample_emitted_beyond_now_plus_skew_is_out_of_range(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    with pytest.raises(TimestampOutOfRange, match="in the future"):
        handle(fleet, sample(begun, 1, at=NOW + POLICY.clock_skew + timedelta(seconds=1)))


def test_a_sample_emitted_after_the_end_is_out_of_range(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, end(begun, 2, at=T0 + timedelta(minutes=10)))
    with pytest.raises(TimestampOutOfRange, match="after the session ended"):
        handle(fleet, sample(begun, 1, at=T0 + timedelta(minutes=11)))


def test_an_end_with_all_samples_in_finalizes_at_once_with_fixed_totals(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, sample(begun, 1, "100.5", distance="250"))
    handle(fleet, sample(begun, 2, "20", distance="50.5"))
    decision = handle(fleet, end(begun, 2))
    assert [type(e) for e in decision.events] == [SessionEndReceived, SessionFinalized]
    record = finalized(decision)[0].session
    assert record.energy_wh == Decimal("120.5")
    assert record.distance_m == Decimal("300.5")
    assert record.telemetry_count == 2
    assert record.missing_samples == 0
    assert record.end_reason is EndReason.ENDED
    assert record.duration == timedelta(minutes=30)
    assert record.finalized_at == NOW
    assert fleet.bikes[begun.bike_id].current is None


def test_an_end_with_no_samples_and_last_seq_zero_finalizes_with_zero_energy(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    record = finalized(handle(fleet, end(begun, 0)))[0].session
    assert record.energy_wh == 0
    assert record.telemetry_count == 0


def test_an_end_that_overtook_its_samples_waits_for_them(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, sample(begun, 1, "5"))
    assert finalized(handle(fleet, end(begun, 3))) == []
    assert finalized(handle(fleet, sample(begun, 3, "7"))) == []
    record = finalized(handle(fleet, sample(begun, 2, "6")))[0].session
    assert record.energy_wh == Decimal(18)
    assert record.missing_samples == 0


def test_the_grace_period_expiring_finalizes_with_the_gap_counted(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, sample(begun, 1, "5"))
    handle(fleet, end(begun, 4))
    assert fleet.expire(NOW + timedelta(seconds=4)) == []
    (event,) = fleet.expire(NOW + timedelta(seconds=5))
    assert event.session.missing_samples == 3
    assert event.session.energy_wh == Decimal(5)
    assert event.session.end_reason is EndReason.ENDED
    assert fleet.bikes[begun.bike_id].current is None


def test_a_late_sample_inside_the_grace_period_is_counted(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, end(begun, 2))
    handle(fleet, sample(begun, 1, "5"), now=NOW + timedelta(seconds=2))
    (event,) = fleet.expire(NOW + timedelta(seconds=5))
    assert event.session.energy_wh == Decimal(5)
    assert event.session.missing_samples == 1


def test_a_sample_after_finalization_is_rejected_and_cannot_reopen_the_session(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, end(begun, 2))
    fleet.expire(NOW + timedelta(seconds=5))
    with pytest.raises(SessionAlreadyFinalized) as err:
        handle(fleet, sample(begun, 2), now=NOW + timedelta(seconds=6))
    assert err.value.reason == "session_finalized"
    assert fleet.session(begun.session_id).finalized.telemetry_count == 0


def test_a_sample_is_rejected_once_the_grace_period_ran_out_even_before_a_sweep(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, end(begun, 1))
    with pytest.raises(SessionAlreadyFinalized):
        handle(fleet, sample(begun, 1), now=NOW + timedelta(seconds=6))


def test_a_redelivered_sample_after_finalization_is_still_a_duplicate(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    once = sample(begun, 1)
    handle(fleet, once)
    handle(fleet, end(begun, 1))
    assert handle(fleet, once).outcome is Outcome.DUPLICATE


def test_a_redelivered_start_and_end_after_finalization_are_duplicates(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    ended = end(begun, 0)
    handle(fleet, ended)
    assert handle(fleet, begun).outcome is Outcome.DUPLICATE
    assert handle(fleet, ended).outcome is Outcome.DUPLICATE


def test_a_different_end_after_finalization_is_rejected(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, end(begun, 0))
    with pytest.raises(SessionAlreadyFinalized):
        handle(fleet, end(begun, 0, at=T0 + timedelta(minutes=31)))


def test_a_second_different_end_during_the_grace_period_is_a_conflict(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, end(begun, 3))
    with pytest.raises(SessionIdConflict):
        handle(fleet, end(begun, 4))


def test_a_redelivered_end_during_the_grace_period_is_a_duplicate(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    ended = end(begun, 3)
    handle(fleet, ended)
    assert handle(fleet, ended) == Decision(Outcome.DUPLICATE)


def test_a_new_start_during_the_grace_period_waits_so_a_late_sample_still_counts(fleet):
    old = start(bike_id())
    handle(fleet, old)
    handle(fleet, sample(old, 1, "9"))
    handle(fleet, end(old, 2))
    new = start(old.bike_id, SessionKind.CHARGING, at=T0 + timedelta(minutes=40))
    assert handle(fleet, new, now=NOW + timedelta(seconds=1)).outcome is Outcome.DEFERRED
    decision = handle(fleet, sample(old, 2, "1"), now=NOW + timedelta(seconds=2))
    assert [type(e) for e in decision.events] == [
        TelemetrySampleAccepted,
        SessionFinalized,
        SessionStarted,
        DeferredMessageSettled,
    ]
    record = decision.events[1].session
    assert (record.missing_samples, record.energy_wh) == (0, Decimal(10))
    assert fleet.bikes[old.bike_id].current.session_id == new.session_id


def test_a_new_start_during_the_grace_period_finalizes_the_old_session_first(fleet):
    old = start(bike_id())
    handle(fleet, old)
    handle(fleet, sample(old, 1, "9"))
    handle(fleet, end(old, 2))
    new = start(old.bike_id, SessionKind.CHARGING, at=T0 + timedelta(minutes=40))
    handle(fleet, new, now=NOW + timedelta(seconds=1))
    events = fleet.expire(NOW + POLICY.finalize_grace)
    assert [type(e) for e in events] == [SessionFinalized, SessionStarted, DeferredMessageSettled]
    record = events[0].session
    assert (record.session_id, record.missing_samples, record.energy_wh) == (
        old.session_id,
        1,
        Decimal(9),
    )
    assert fleet.bikes[old.bike_id].current.session_id == new.session_id


def test_a_start_whose_own_grace_runs_out_first_cuts_the_old_sessions_grace_short(fleet):
    old = start(bike_id())
    handle(fleet, old)
    new = start(old.bike_id, SessionKind.CHARGING, at=T0 + timedelta(minutes=40))
    handle(fleet, new, now=NOW)  # overtook the old session's end
    handle(fleet, end(old, 1), now=NOW + timedelta(seconds=3))  # its grace: until NOW + 8 s
    events = fleet.expire(NOW + POLICY.finalize_grace)
    finalized_ = [e.session for e in events if isinstance(e, SessionFinalized)]
    assert [(r.session_id, r.missing_samples) for r in finalized_] == [(old.session_id, 1)]
    assert fleet.bikes[old.bike_id].current.session_id == new.session_id


def test_an_end_of_the_wrong_kind_is_a_kind_mismatch(fleet):
    begun = start(bike_id(), SessionKind.CHARGING)
    handle(fleet, begun)
    with pytest.raises(SessionKindMismatch) as err:
        handle(fleet, end(begun, 0, kind=SessionKind.RIDE))
    assert err.value.reason == "session_kind_mismatch"


def test_an_end_for_an_unknown_session_is_rejected_when_the_grace_period_is_over(fleet):
    ended = end(start(bike_id()), 0)
    assert handle(fleet, ended).outcome is Outcome.DEFERRED
    (settled,) = fleet.expire(NOW + POLICY.finalize_grace)
    assert settled.reason == "unknown_session"


def test_an_end_before_the_start_is_out_of_range(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    with pytest.raises(TimestampOutOfRange):
        handle(fleet, end(begun, 0, at=T0 - timedelta(seconds=1)))


def test_an_end_before_a_stored_sample_was_emitted_is_out_of_range(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, sample(begun, 1, at=T0 + timedelta(minutes=20)))
    with pytest.raises(TimestampOutOfRange):
        handle(fleet, end(begun, 1, at=T0 + timedelta(minutes=10)))


def test_a_sample_beyond_the_announced_last_seq_is_rejected(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, end(begun, 2))
    with pytest.raises(SeqBeyondEnd) as err:
        handle(fleet, sample(begun, 3))
    assert err.value.reason == "seq_beyond_end"


def test_an_end_below_a_stored_seq_is_rejected(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, sample(begun, 5))
    with pytest.raises(SeqBeyondEnd):
        handle(fleet, end(begun, 4))
    assert fleet.session(begun.session_id).end is None


def test_an_abandoned_session_times_out_with_its_last_sample_as_end(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, sample(begun, 1, "3", at=T0 + timedelta(minutes=5)))
    handle(fleet, sample(begun, 3, "4", at=T0 + timedelta(minutes=6)))
    assert fleet.expire(NOW + timedelta(hours=23)) == []
    (event,) = fleet.expire(NOW + timedelta(hours=24))
    record = event.session
    assert record.end_reason is EndReason.TIMED_OUT
    assert record.ended_at == T0 + timedelta(minutes=6)
    assert record.energy_wh == Decimal(7)
    assert record.missing_samples == 1


def test_a_timed_out_bike_can_start_again_without_a_sweep(fleet):
    old = start(bike_id())
    handle(fleet, old)
    later = NOW + timedelta(hours=25)
    new = start(old.bike_id, at=later - timedelta(minutes=1))
    decision = handle(fleet, new, now=later)
    assert decision.outcome is Outcome.ACCEPTED
    assert finalized(decision)[0].session.end_reason is EndReason.TIMED_OUT


def test_a_rejected_command_changes_nothing(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, sample(begun, 1))
    session = fleet.session(begun.session_id)
    before = (session.energy_wh, session.seqs, session.latest_emitted_at, session.last_heard_at)
    for bad in (sample(begun, 1), end(begun, 0), start(begun.bike_id, at=NOW + timedelta(days=1))):
        with pytest.raises(DomainError):
            handle(fleet, bad, now=NOW + timedelta(seconds=1))
    assert (session.energy_wh, session.seqs, session.latest_emitted_at, session.last_heard_at) == (
        before
    )
    assert session.end is None


def test_the_fleet_refuses_a_command_for_a_bike_it_has_not_loaded():
    begun = start(bike_id())
    fleet = Fleet(POLICY)
    with pytest.raises(LookupError):
        fleet.handle(begun, NOW)
    with pytest.raises(LookupError):
        fleet.sessions_decisions_need([begun])


def test_the_fleet_names_the_sessions_it_must_load_first():
    fleet = Fleet(POLICY)
    current, other = start(bike_id()), start(bike_id())
    fleet.load_bike(current.bike_id, RideSession(session_id=current.session_id,
                    bike_id=current.bike_id, party_id="r", started_at=T0, last_heard_at=T0))  # fmt: skip
    named = replace(other, bike_id=current.bike_id)
    assert fleet.sessions_decisions_need([sample(current, 1), sample(named, 1)]) == {
        other.session_id
    }


def test_the_fleet_names_a_stored_sample_only_when_its_seq_is_taken():
    fleet = Fleet(POLICY)
    begun = start(bike_id())
    fleet.load_bike(begun.bike_id, RideSession(session_id=begun.session_id, bike_id=begun.bike_id,
                    party_id="r", started_at=T0, last_heard_at=T0,
                    tally=Tally(seqs=SeqRanges(((1, 3),)))))  # fmt: skip
    commands = [sample(begun, 2), sample(begun, 4)]
    assert fleet.samples_decisions_need(commands) == {(begun.session_id, 2)}


def test_a_taken_seq_without_its_stored_sample_is_a_loading_bug_not_a_decision():
    fleet = Fleet(POLICY)
    begun = start(bike_id())
    fleet.load_bike(begun.bike_id, RideSession(session_id=begun.session_id, bike_id=begun.bike_id,
                    party_id="r", started_at=T0, last_heard_at=T0,
                    tally=Tally(seqs=SeqRanges(((1, 1),)))))  # fmt: skip
    with pytest.raises(LookupError, match="samples_decisions_need"):
        fleet.handle(sample(begun, 1), NOW)


def test_the_fleet_caches_only_the_newest_finalized_sessions():
    fleet = FleetHarness(Fleet(POLICY, finalized_cache=1))
    ids = []
    for _ in range(3):
        begun = start(bike_id())
        handle(fleet, begun)
        handle(fleet, end(begun, 0))
        ids.append(begun.session_id)
    active = start(bike_id())
    handle(fleet, active)
    assert list(fleet.finalized) == [ids[-1]]
    assert fleet.active_count() == 1


def test_a_new_session_can_follow_a_finalized_one(fleet):
    first = start(bike_id())
    handle(fleet, first)
    handle(fleet, end(first, 0))
    second = start(first.bike_id, at=T0 + timedelta(minutes=31), session_id=uuid.uuid4())
    assert handle(fleet, second).outcome is Outcome.ACCEPTED


def test_an_expiry_noticed_while_rejecting_a_command_is_still_reported(fleet):
    begun = start(bike_id())
    handle(fleet, begun)
    handle(fleet, end(begun, 1))
    fleet.pop_events()
    with pytest.raises(SessionAlreadyFinalized):
        handle(fleet, sample(begun, 1), now=NOW + timedelta(seconds=6))
    (event,) = fleet.pop_events()
    assert isinstance(event, SessionFinalized)
    assert event.session.missing_samples == 1


def test_a_start_names_its_own_session_by_every_field_it_still_knows():
    begun = start(bike_id(), party="rider-7")
    known = RideSession(
        session_id=begun.session_id,
        bike_id=begun.bike_id,
        party_id="rider-7",
        started_at=begun.occurred_at,
        last_heard_at=begun.occurred_at,
    )
    # Once its rider is erased, a ride's party is unknown: the same start is still its own.
    erased = RideSession(
        session_id=begun.session_id,
        bike_id=begun.bike_id,
        party_id=None,
        started_at=begun.occurred_at,
        last_heard_at=begun.occurred_at,
    )
    other_rider = replace(begun, party_id="rider-8")
    later = replace(begun, occurred_at=begun.occurred_at + timedelta(seconds=1))

    assert known.same_start(begun) and not known.same_start(other_rider)
    assert erased.same_start(begun) and erased.same_start(other_rider)
    assert not erased.same_start(later)
