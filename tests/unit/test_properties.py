"""Properties: billing is deterministic and never negative; completeness holds for any order."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from domain.billing import bill
from domain.errors import DomainError, SessionAlreadyFinalized
from domain.events import SessionFinalized, TelemetrySampleAccepted
from domain.fleet import Fleet
from domain.session_values import EndReason, FinalizedSession, SessionKind, SessionPolicy
from tests.builders import T0, end, sample, start
from tests.unit.test_billing import shipped_pricing

PRICING = shipped_pricing()
energies = st.decimals(min_value=0, max_value=10**7, places=3, allow_nan=False)


@given(energy=energies, kind=st.sampled_from(SessionKind), minutes=st.integers(0, 10_000))
def test_billing_is_deterministic_and_never_negative(energy, kind, minutes):
    session = FinalizedSession(
        session_id=uuid.UUID(int=minutes),
        bike_id="bike-1",
        kind=kind,
        party_id="p",
        started_at=T0,
        ended_at=T0 + timedelta(minutes=minutes),
        energy_wh=energy,
        distance_m=Decimal(0),
        telemetry_count=0,
        missing_samples=0,
        end_reason=EndReason.ENDED,
        finalized_at=T0,
    )
    first, second = bill(session, PRICING), bill(session, PRICING)
    assert repr(first) == repr(second)  # equal, and with the same digits
    assert first.amount.amount >= 0
    assert first.amount.amount.as_tuple().exponent == -2


@st.composite
def arrivals(draw):
    """A session's samples, its end and the grace expiry, in any order the network allows."""
    count = draw(st.integers(0, 12))
    energies_ = draw(st.lists(energies, min_size=count, max_size=count))
    dropped = draw(st.sets(st.integers(1, count), max_size=count)) if count else set()
    events = [("sample", seq, e) for seq, e in enumerate(energies_, 1) if seq not in dropped]
    events.append(("end", count, None))
    order = draw(st.permutations(events))
    cut = draw(st.integers(0, len(order)))
    return count, [*order[:cut], ("expire", None, None), *order[cut:]]


@settings(max_examples=300)
@given(arrivals())
def test_finalized_total_is_the_sum_of_samples_that_arrived_before_finalization(case):
    last_seq, order = case
    fleet = Fleet(SessionPolicy(finalize_grace=timedelta(seconds=5)))
    begun = start("bike-1")
    fleet.load_bike(begun.bike_id, None)
    now = T0 + timedelta(hours=1)
    fleet.handle(begun, now)
    accepted, record = Decimal(0), None
    for what, seq, energy in order:
        now += timedelta(seconds=1)
        rejection = None
        if what == "expire":
            now += timedelta(seconds=10)
            fleet.expire(now)
        else:
            command = end(begun, last_seq) if what == "end" else sample(begun, seq, energy)
            try:
                fleet.handle(command, now)
            except DomainError as exc:
                rejection = exc
        for event in fleet.pop_events():
            if isinstance(event, TelemetrySampleAccepted):
                accepted += event.sample.energy.wh
            if isinstance(event, SessionFinalized):
                record = event.session
        if rejection is not None:
            assert isinstance(rejection, SessionAlreadyFinalized)
            assert record is not None
    if record is None:  # the end never arrived before expiry; expire once more now
        (expired,) = fleet.expire(now + timedelta(seconds=10))
        record = expired.session
    assert record.energy_wh == accepted
    assert record.missing_samples == last_seq - record.telemetry_count
