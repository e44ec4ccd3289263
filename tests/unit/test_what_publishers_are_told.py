"""What a publisher, an operator or the next module is told, word for word.

A rejection's detail is published on the bike's rejections topic and kept with the message;
a bad pricing file or value stops the start with its message. These tests pin the words and
the fields that name what is wrong, and the events a decision records, field by field.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, tzinfo
from decimal import Decimal

import pytest

from daemon.documents import money_text, utc_text
from daemon.pricing_text import canonical_pricing, parse_pricing
from domain.analytics import project
from domain.billing import (
    BillableEnergy,
    Money,
    PricingHistory,
    PricingRule,
    PricingRules,
    Rounding,
    UnitPrice,
    bill,
)
from domain.commands import EndSession, RecordTelemetry, StartSession
from domain.errors import DomainError, InvalidPricing, InvalidValue, Reason
from domain.events import (
    DeferredMessageSettled,
    MessageDeferred,
    Outcome,
    TelemetrySampleAccepted,
    Waiting,
)
from domain.fleet import Bike, Fleet
from domain.seqs import SeqRanges
from domain.session import RideSession, Tally
from domain.session_values import (
    EndReason,
    FinalizedSession,
    SessionEnd,
    SessionKind,
    SessionPolicy,
)
from domain.telemetry import Distance, EmissionTime, EnergyDelta, StateOfCharge
from tests.builders import T0, bike_id, end, sample, start

NOW = T0 + timedelta(hours=1)
POLICY = SessionPolicy(finalize_grace=timedelta(seconds=5), clock_skew=timedelta(minutes=5))
NAIVE = datetime(2026, 11, 24, 8, 0)


def z(at: datetime) -> str:
    """An instant as every detail writes it: RFC 3339 in UTC with Z (SPEC §2)."""
    assert at.utcoffset() == timedelta(0), at
    return at.isoformat().replace("+00:00", "Z")


def fresh(*bikes: str) -> Fleet:
    fleet = Fleet(POLICY)
    for bike in bikes:
        fleet.load_bike(bike, None)
    return fleet


def refused(fleet: Fleet, command, now=NOW) -> DomainError:
    with pytest.raises(DomainError) as caught:
        fleet.handle(command, now, b"ref")
    return caught.value


def told(error: DomainError) -> tuple[Reason, str]:
    assert str(error) == error.detail
    return error.reason, error.detail


# -- rejections --------------------------------------------------------------------------------


def test_a_start_on_a_busy_bike_names_the_session_it_has():
    a = start(bike_id())
    bike = Bike(a.bike_id)
    bike.start(a, NOW, POLICY)
    with pytest.raises(DomainError) as caught:
        bike.start(start(a.bike_id), NOW, POLICY)
    assert told(caught.value) == (
        Reason.ACTIVE_SESSION_EXISTS,
        f"bike {a.bike_id} already has active session {a.session_id}",
    )


def test_a_session_id_used_by_another_start_says_by_which_session():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    other = StartSession(a.bike_id, a.session_id, SessionKind.RIDE, "someone-else", T0)
    assert told(refused(fleet, other)) == (
        Reason.SESSION_ID_CONFLICT,
        f"session_id {a.session_id} is already used by another ride session of bike {a.bike_id}",
    )


def test_a_sample_naming_another_bikes_session_is_an_unknown_session_of_this_bike():
    a, b = start(bike_id()), bike_id()
    fleet = fresh(a.bike_id, b)
    fleet.handle(a, NOW)
    fleet.load_session(fleet.bikes[a.bike_id].current)
    stray = RecordTelemetry(b, sample(a, 1).sample)
    assert told(refused(fleet, stray)) == (
        Reason.UNKNOWN_SESSION,
        f"bike {b} has no session {a.session_id}",
    )


def test_the_ends_of_a_session_that_do_not_fit_say_why():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    fleet.handle(sample(a, 2, at=T0 + timedelta(minutes=20)), NOW)
    iso = z(T0)
    before = EndSession(a.bike_id, a.session_id, a.kind, T0 - timedelta(seconds=1), 2)
    assert told(refused(fleet, before)) == (
        Reason.TIMESTAMP_OUT_OF_RANGE,
        f"occurred_at {z(T0 - timedelta(seconds=1))} is before the session started ({iso})",
    )
    future = NOW + timedelta(minutes=6)
    ahead = EndSession(a.bike_id, a.session_id, a.kind, future, 2)
    assert told(refused(fleet, ahead)) == (
        Reason.TIMESTAMP_OUT_OF_RANGE,
        f"occurred_at {z(future)} is in the future (now {z(NOW)}, allowed clock skew 300 s)",
    )
    assert told(refused(fleet, end(a, 1))) == (
        Reason.SEQ_BEYOND_END,
        "last_seq 1 is below sample seq 2 that is already stored",
    )
    early = EndSession(a.bike_id, a.session_id, a.kind, T0 + timedelta(minutes=10), 2)
    assert told(refused(fleet, early)) == (
        Reason.TIMESTAMP_OUT_OF_RANGE,
        f"occurred_at {z(T0 + timedelta(minutes=10))} is before a stored sample's "
        f"emitted_at ({z(T0 + timedelta(minutes=20))})",
    )
    charging_end = end(a, 2, kind=SessionKind.CHARGING)
    assert told(refused(fleet, charging_end)) == (
        Reason.SESSION_KIND_MISMATCH,
        f"session {a.session_id} is a ride session, not a charging session",
    )
    fleet.handle(end(a, 3), NOW)
    assert told(refused(fleet, end(a, 4))) == (
        Reason.SESSION_ID_CONFLICT,
        f"session {a.session_id} already ended at {z(T0 + timedelta(minutes=30))} "
        "with last_seq 3; this end differs",
    )


def test_the_samples_that_do_not_fit_say_why():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    first = sample(a, 1, "5")
    fleet.handle(first, NOW)
    fleet.handle(end(a, 2), NOW)
    again = sample(a, 1, "6", telemetry_id=first.sample.telemetry_id)
    assert told(refused(fleet, again)) == (
        Reason.SESSION_ID_CONFLICT,
        f"telemetry_id {first.sample.telemetry_id} is already stored with different content",
    )
    assert told(refused(fleet, sample(a, 3))) == (
        Reason.SEQ_BEYOND_END,
        "seq 3 is beyond last_seq 2 announced by the end",
    )
    future = NOW + timedelta(minutes=6)
    b = start(bike_id(), at=NOW)
    fleet.load_bike(b.bike_id, None)
    fleet.handle(b, NOW)
    assert told(refused(fleet, sample(b, 1, at=future))) == (
        Reason.TIMESTAMP_OUT_OF_RANGE,
        f"emitted_at {z(future)} is in the future (now {z(NOW)}, allowed clock skew 300 s)",
    )


def test_anything_for_a_finalized_session_says_when_it_was_finalized():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    fleet.handle(end(a, 0), NOW)
    assert told(refused(fleet, sample(a, 1))) == (
        Reason.SESSION_FINALIZED,
        f"session {a.session_id} was finalized at {z(NOW)} and cannot change",
    )


def test_a_start_from_the_future_says_so():
    future = NOW + timedelta(minutes=6)
    a = start(bike_id(), at=future)
    assert told(refused(fresh(a.bike_id), a)) == (
        Reason.TIMESTAMP_OUT_OF_RANGE,
        f"occurred_at {z(future)} is in the future (now {z(NOW)}, allowed clock skew 300 s)",
    )


# -- what waiting messages record --------------------------------------------------------------


def test_a_message_that_waits_records_its_bike_command_time_and_raw_message():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    early = sample(a, 1)
    decision = fleet.handle(early, NOW, b"raw-ref")
    waiting = Waiting(early, NOW, b"raw-ref")
    assert decision.outcome is Outcome.DEFERRED
    assert decision.events == (MessageDeferred(a.bike_id, waiting),)
    later = NOW + timedelta(seconds=1)
    events = fleet.handle(a, later, b"start-ref").events
    assert events[-2:] == (
        TelemetrySampleAccepted(a.bike_id, early.sample, later),
        DeferredMessageSettled(a.bike_id, waiting),
    )


def test_a_waiting_message_decided_against_says_why_on_its_settled_event():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    too_early = sample(a, 1, at=T0 - timedelta(seconds=1))
    fleet.handle(too_early, NOW, b"r1")
    events = fleet.handle(a, NOW, b"r2").events
    assert events[-1] == DeferredMessageSettled(
        a.bike_id,
        Waiting(too_early, NOW, b"r1"),
        Reason.TIMESTAMP_OUT_OF_RANGE,
        f"emitted_at {z(T0 - timedelta(seconds=1))} is before the session started ({z(T0)})",
    )


def test_waiting_messages_whose_grace_ran_out_say_what_never_came():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    orphan = sample(start(a.bike_id), 1)
    fleet.handle(orphan, NOW, b"o")
    fleet.handle(a, NOW, b"a")
    blocked = start(a.bike_id, at=T0 + timedelta(minutes=1))
    fleet.handle(blocked, NOW, b"b")
    events = fleet.expire(NOW + timedelta(seconds=5))
    settled = [e for e in events if isinstance(e, DeferredMessageSettled)]
    assert settled == [
        DeferredMessageSettled(
            a.bike_id,
            Waiting(orphan, NOW, b"o"),
            Reason.UNKNOWN_SESSION,
            f"bike {a.bike_id} has no session {orphan.session_id} "
            "(nothing started it within the grace period)",
        ),
        DeferredMessageSettled(
            a.bike_id,
            Waiting(blocked, NOW, b"b"),
            Reason.ACTIVE_SESSION_EXISTS,
            f"bike {a.bike_id} still had active session {a.session_id} without an end when "
            "the grace period of this start ran out",
        ),
    ]


def test_a_new_start_that_waited_out_the_grace_cuts_the_ended_session_short_then():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    following = start(a.bike_id, at=T0 + timedelta(hours=1))
    fleet.handle(following, NOW)  # waits: the bike's session has not ended
    ended_at = NOW + timedelta(seconds=4)
    fleet.handle(end(a, 2), ended_at)  # sample 1 and 2 never come
    fleet.pop_events()
    cut_at = NOW + timedelta(seconds=5)  # the start's grace is over, the end's is not
    events = fleet.expire(cut_at, [a.bike_id])
    (cut,) = [e.session for e in events if hasattr(e, "session")]
    assert (cut.session_id, cut.end_reason, cut.finalized_at, cut.missing_samples) == (
        a.session_id,
        EndReason.ENDED,
        cut_at,
        2,
    )
    changed = {s.session_id: s for s in fleet.changed_sessions()}
    assert changed[a.session_id].finalized == cut
    assert fleet.bikes[a.bike_id].current.session_id == following.session_id


# -- what the fleet is asked to know -----------------------------------------------------------


def test_a_bike_not_loaded_is_a_lookup_error_that_says_to_refresh_it():
    a = start(bike_id())
    with pytest.raises(LookupError, match=f"^bike {a.bike_id} is not loaded; refresh it first$"):
        Fleet(POLICY).handle(a, NOW)
    with pytest.raises(LookupError, match=f"^bike {a.bike_id} is not loaded; refresh it first$"):
        Fleet(POLICY).sessions_decisions_need([a])


def test_a_finalized_session_a_message_names_is_remembered_as_finalized():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    fleet.handle(end(a, 0), NOW)
    done = RideSession(
        session_id=a.session_id, bike_id=a.bike_id, party_id="rider-1", started_at=T0,
        last_heard_at=NOW, finalized=fleet.finalized[a.session_id].finalized,
    )  # fmt: skip
    other = fresh(a.bike_id)
    other.load_session(done)
    assert other.finalized[a.session_id] is done
    assert told(refused(other, sample(a, 1)))[0] is Reason.SESSION_FINALIZED


def test_a_session_loaded_from_the_store_keeps_its_latest_sample_time():
    a = start(bike_id())
    latest = T0 + timedelta(minutes=20)
    stored = RideSession(
        session_id=a.session_id, bike_id=a.bike_id, party_id="r", started_at=T0,
        last_heard_at=NOW, tally=Tally(latest_emitted_at=latest),
    )  # fmt: skip
    fleet = Fleet(POLICY)
    fleet.load_bike(a.bike_id, stored)
    early = EndSession(a.bike_id, a.session_id, a.kind, T0 + timedelta(minutes=10), 0)
    assert told(refused(fleet, early))[0] is Reason.TIMESTAMP_OUT_OF_RANGE
    assert repr(stored) == f"<RideSession {a.session_id} bike={a.bike_id} active>"


# -- values that name what is wrong ------------------------------------------------------------


class _NoOffset(tzinfo):
    def utcoffset(self, dt):
        return None


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (
            lambda at: StartSession(bike_id(), uuid.uuid4(), SessionKind.RIDE, "r", at),
            "occurred_at",
        ),
        (lambda at: EndSession(bike_id(), uuid.uuid4(), SessionKind.RIDE, at, 1), "occurred_at"),
        (lambda at: SessionEnd(at, 1, T0), "occurred_at"),
        (lambda at: SessionEnd(T0, 1, at), "received_at"),
        (EmissionTime, "emitted_at"),
        (
            lambda at: RideSession(
                session_id=uuid.uuid4(),
                bike_id=bike_id(),
                party_id="r",
                started_at=at,
                last_heard_at=T0,
            ),
            "started_at",
        ),
        (
            lambda at: RideSession(
                session_id=uuid.uuid4(),
                bike_id=bike_id(),
                party_id="r",
                started_at=T0,
                last_heard_at=at,
            ),
            "last_heard_at",
        ),
        (utc_text, "a published timestamp"),
    ],
)
@pytest.mark.parametrize("at", [NAIVE, NAIVE.replace(tzinfo=_NoOffset())])
def test_a_time_without_an_offset_is_refused_naming_the_field(build, field, at):
    with pytest.raises(InvalidValue) as caught:
        build(at)
    assert caught.value.detail == f"{field} must carry a UTC offset, got naive {at.isoformat()}"


def test_an_end_counts_its_samples_in_a_whole_number_from_zero():
    with pytest.raises(InvalidValue, match=r"^last_seq must be a whole number, got 1\.5$"):
        SessionEnd(T0, 1.5, T0)  # type: ignore[arg-type]
    with pytest.raises(InvalidValue, match=r"^last_seq must not be negative, got -1$"):
        SessionEnd(T0, -1, T0)


def test_a_finalized_record_has_no_negative_total_and_no_end_before_its_start():
    def record(distance: str, ended: datetime) -> FinalizedSession:
        return FinalizedSession(
            uuid.uuid4(), "b", SessionKind.RIDE, "r", T0, ended, Decimal(1), Decimal(distance),
            0, 0, EndReason.ENDED, NOW,
        )  # fmt: skip

    with pytest.raises(InvalidValue, match=r"^a finalized session's totals must not be negative$"):
        record("-1", T0)
    with pytest.raises(InvalidValue, match=r"^a session cannot end before it started$"):
        record("0", T0 - timedelta(seconds=1))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: EnergyDelta(Decimal(-1)), "energy_wh must not be negative, got -1"),
        (lambda: Distance(Decimal(-1)), "distance_m must not be negative, got -1"),
        (
            lambda: StateOfCharge(Decimal("NaN")),
            "soc_pct must be a finite decimal, got Decimal('NaN')",
        ),
        (
            lambda: UnitPrice(Decimal(-1)),
            "unit_price must be a non-negative finite decimal, got Decimal('-1')",
        ),
        (
            lambda: BillableEnergy(Decimal(-1)),
            "billable_energy_wh must be a non-negative finite decimal, got Decimal('-1')",
        ),
        (
            lambda: PricingRule(SessionKind.RIDE, UnitPrice(Decimal(1)), Decimal(-1)),
            "session_fee must be a non-negative finite decimal, got Decimal('-1')",
        ),
        (
            lambda: Money(Decimal("NaN"), "EUR"),
            "amount must be a finite decimal, got Decimal('NaN')",
        ),
        (
            lambda: RecordTelemetry("a b", sample(start(bike_id()), 1).sample),
            "bike_id must match [A-Za-z0-9_-]{1,64}, got 'a b'",
        ),
        (
            lambda: SeqRanges(((2, 1),)),
            "seq ranges must be sorted, disjoint, non-adjacent and from 1: ((2, 1),)",
        ),
    ],
)
def test_a_value_out_of_its_range_is_refused_saying_which_and_why(build, message):
    with pytest.raises(InvalidValue) as caught:
        build()
    assert caught.value.detail == message


def test_empty_analytics_are_exact_zeros_of_their_kind():
    report = project([], [])
    assert (report.rides.kind, report.charging.kind) == (SessionKind.RIDE, SessionKind.CHARGING)
    for figures in (report.rides, report.charging):
        assert isinstance(figures.energy_wh, Decimal) and figures.energy_wh == 0
        assert isinstance(figures.distance_m, Decimal) and figures.distance_m == 0


# -- the pricing file and price lists ----------------------------------------------------------

GOOD = 'version="1"\ncurrency="EUR"\n[ride]\nunit_price=1\n[charging]\nunit_price=1\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('a=1\nb=2\n' + GOOD, "p.toml: unknown keys a, b"),
        (GOOD.replace("unit_price=1\n[charging]", "unit_price=1\nx=1\ny=2\n[charging]"),
         "p.toml: [ride] has unknown keys x, y"),
        (GOOD.replace("[ride]\nunit_price=1", "[ride]\nsession_fee=1"),
         "p.toml [ride]: `unit_price` is missing"),
        (GOOD.replace("[ride]\nunit_price=1", "[ride]\nunit_price=[1]"),
         "p.toml [ride]: `unit_price` must be a decimal like 0.30, got [1]"),
        ('rounding="odd"\n' + GOOD,
         "p.toml: `rounding` must be one of " + ", ".join(Rounding) + ", got 'odd'"),
        (GOOD.replace('version="1"', "version=true"),
         'p.toml: `version` must be set, e.g. version = "2026-01"'),
        ("minor_unit=5\n" + GOOD, "p.toml: the minor unit of EUR is not known; set minor_unit = 0..4"),
    ],
)  # fmt: skip
def test_a_pricing_file_that_cannot_be_used_says_what_to_fix(text, message):
    with pytest.raises(InvalidPricing) as caught:
        parse_pricing(text, "p.toml")
    assert str(caught.value) == message


def test_four_decimal_places_are_the_finest_minor_unit():
    assert parse_pricing("minor_unit=4\n" + GOOD).minor_unit == 4


def test_a_price_written_with_an_exponent_is_recorded_and_billed_in_plain_digits():
    pricing = parse_pricing(GOOD.replace("[ride]\nunit_price=1", "[ride]\nunit_price=1e1"))
    assert '"unit_price":"10"' in canonical_pricing(pricing)
    session = FinalizedSession(
        uuid.uuid4(), "b", SessionKind.RIDE, "r", T0, T0, Decimal(1000), Decimal(0), 1, 0,
        EndReason.ENDED, NOW, "1",
    )  # fmt: skip
    record = bill(session, pricing)
    assert (money_text(record.unit_price.per_kwh), money_text(record.amount.amount)) == (
        "10",
        "10.00",
    )


def test_a_price_list_needs_a_version_and_one_rule_per_kind():
    rule = PricingRule(SessionKind.RIDE, UnitPrice(Decimal(1)))
    with pytest.raises(InvalidPricing, match=r"^version must be a non-empty string$"):
        PricingRules("", "EUR", Rounding.HALF_EVEN, 2, (rule,))
    with pytest.raises(InvalidPricing) as only_rides:
        PricingRules("1", "EUR", Rounding.HALF_EVEN, 2, (rule,))
    assert str(only_rides.value) == (
        "exactly one rule per session kind is needed (ride and charging), got ride"
    )
    with pytest.raises(InvalidPricing) as none:
        PricingRules("1", "EUR", Rounding.HALF_EVEN, 2, ())
    assert str(none.value).endswith(", got none")


def test_a_price_history_names_the_version_recorded_twice_and_the_session_without_one():
    one = parse_pricing(GOOD)
    with pytest.raises(
        InvalidPricing, match=r"^a pricing version is recorded twice: \['1', '1'\]$"
    ):
        PricingHistory((one, one))
    session = FinalizedSession(
        uuid.uuid4(), "b", SessionKind.RIDE, "r", T0, T0, Decimal(1), Decimal(0), 1, 0,
        EndReason.ENDED, NOW,
    )  # fmt: skip
    with pytest.raises(
        LookupError, match=f"^session {session.session_id} names no pricing version$"
    ):
        PricingHistory((one,)).bill(session)


def test_a_pricing_file_named_by_no_one_is_called_the_pricing_file():
    with pytest.raises(InvalidPricing, match=r"^pricing file: unknown keys a$"):
        parse_pricing("a=1\n" + GOOD)


def test_a_bad_session_fee_names_its_table():
    text = GOOD.replace("[ride]\nunit_price=1", '[ride]\nunit_price=1\nsession_fee="x"')
    with pytest.raises(InvalidPricing, match=r"^p\.toml \[ride\]: `session_fee` is not a decimal"):
        parse_pricing(text, "p.toml")


def test_an_empty_version_is_refused():
    with pytest.raises(InvalidPricing, match="`version` must be set"):
        parse_pricing(GOOD.replace('version="1"', 'version=""'), "p.toml")


def test_a_fee_written_with_an_exponent_is_recorded_in_plain_digits():
    text = GOOD.replace("[ride]\nunit_price=1", "[ride]\nunit_price=1\nsession_fee=1e1")
    assert '"ride":{"session_fee":"10"' in canonical_pricing(parse_pricing(text))


def test_two_rules_for_one_kind_are_named_in_the_refusal():
    rule = PricingRule(SessionKind.RIDE, UnitPrice(Decimal(1)))
    with pytest.raises(InvalidPricing, match=r"got ride, ride$"):
        PricingRules("1", "EUR", Rounding.HALF_EVEN, 2, (rule, rule))


def test_a_negative_zero_is_published_as_zero():
    from daemon.documents import quantity_text

    assert quantity_text(Decimal("-0")) == "0"
    assert quantity_text(Decimal("-0.000")) == "0"


def test_a_taken_seq_without_its_stored_sample_tells_the_caller_what_to_load():
    a = start(bike_id())
    fleet = fresh(a.bike_id)
    fleet.handle(a, NOW)
    fleet.handle(sample(a, 1), NOW)
    fleet.pop_events()  # the batch ended: the stored sample is no longer in memory
    with pytest.raises(LookupError) as caught:
        fleet.handle(sample(a, 1, "2"), NOW)
    assert str(caught.value) == (
        f"seq 1 of session {a.session_id} is taken but its stored sample was not loaded; "
        "call Fleet.samples_decisions_need first"
    )


def test_a_message_handled_without_a_reference_waits_with_an_empty_one():
    a = start(bike_id())
    early = sample(a, 1)
    (event,) = fresh(a.bike_id).handle(early, NOW).events
    assert event == MessageDeferred(a.bike_id, Waiting(early, NOW, b""))
