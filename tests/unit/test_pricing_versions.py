"""Pricing versions: a finalized session is billed by the version it was finalized under."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.pricing_text import canonical_pricing, parse_pricing, pricing_from_canonical
from domain.billing import PricingHistory, PricingRule, PricingRules, Rounding, UnitPrice, bill
from domain.errors import InvalidPricing
from domain.fleet import Fleet
from domain.session_values import EndReason, FinalizedSession, SessionKind, SessionPolicy
from tests.builders import T0, bike_id, end, sample, start
from tests.unit.test_billing import finalized, shipped_pricing

prices = st.decimals(min_value=0, max_value=100, places=4, allow_nan=False)


@st.composite
def price_lists(draw, version: str | None = None) -> PricingRules:
    return PricingRules(
        version or draw(st.text("abcdefgh0123456789-", min_size=1, max_size=12)),
        "EUR",
        draw(st.sampled_from(list(Rounding))),
        2,
        tuple(PricingRule(kind, UnitPrice(draw(prices)), draw(prices)) for kind in SessionKind),
    )


@st.composite
def sessions(draw, pricing_version: str) -> FinalizedSession:
    return FinalizedSession(
        session_id=uuid.UUID(int=draw(st.integers(0, 2**128 - 1))),
        bike_id="bike-1",
        kind=draw(st.sampled_from(SessionKind)),
        party_id="p",
        started_at=T0,
        ended_at=T0 + timedelta(minutes=draw(st.integers(0, 600))),
        energy_wh=draw(st.decimals(min_value=0, max_value=10**7, places=3, allow_nan=False)),
        distance_m=Decimal(0),
        telemetry_count=1,
        missing_samples=0,
        end_reason=EndReason.ENDED,
        finalized_at=T0,
        pricing_version=pricing_version,
    )


@given(data=st.data())
def test_a_bill_is_byte_identical_however_often_and_wherever_it_is_derived(data):
    versions = data.draw(
        st.lists(price_lists(), min_size=1, max_size=4, unique_by=lambda p: p.version)
    )
    chosen = data.draw(st.sampled_from(versions))
    session = data.draw(sessions(chosen.version))
    # Where it is derived: the running price list, the history as kept, or the history as
    # read back from the store's canonical text, in any order.
    kept = PricingHistory(tuple(versions))
    read_back = PricingHistory(
        tuple(pricing_from_canonical(canonical_pricing(p)) for p in versions[::-1])
    )
    bills = {
        repr(bill(session, chosen)),
        repr(kept.bill(session)),
        repr(read_back.bill(session)),
    }
    assert len(bills) == 1


@given(price_lists())
def test_the_canonical_content_reads_back_to_the_same_price_list(pricing):
    assert pricing_from_canonical(canonical_pricing(pricing)) == pricing


def test_the_canonical_content_keeps_decimals_as_written_and_ignores_the_files_layout():
    shipped = shipped_pricing()
    relaid = parse_pricing(
        'currency = "EUR"\nversion = "2026-01"\n[charging]\nunit_price = 0.25\n'
        "session_fee = 0\n[ride]\nsession_fee = 0\nunit_price = 0.30  # per kWh\n",
        "relaid.toml",
    )
    assert canonical_pricing(relaid) == canonical_pricing(shipped)
    assert '"unit_price":"0.30"' in canonical_pricing(shipped)


def test_a_session_is_not_billed_by_another_version_than_its_own():
    shipped = shipped_pricing()
    session = replace(finalized(SessionKind.RIDE, "1234.5"), pricing_version="2025-07")
    with pytest.raises(InvalidPricing, match="2025-07"):
        bill(session, shipped)


def test_the_history_bills_each_session_by_its_own_version():
    old = shipped_pricing()
    new = replace(
        old,
        version="2026-02",
        rules=tuple(replace(r, unit_price=UnitPrice(r.unit_price.per_kwh * 2)) for r in old.rules),
    )
    history = PricingHistory((old, new))
    ride = finalized(SessionKind.RIDE, "1234.5")
    assert history.bill(replace(ride, pricing_version="2026-01")).amount.amount == Decimal("0.37")
    assert history.bill(replace(ride, pricing_version="2026-02")).amount.amount == Decimal("0.74")
    with pytest.raises(LookupError, match="not recorded"):
        history.bill(replace(ride, pricing_version="1999-01"))


def test_a_session_finalized_under_a_policy_names_its_pricing_version():
    fleet = Fleet(SessionPolicy(pricing_version="2026-01"))
    begun = start(bike_id())
    fleet.load_bike(begun.bike_id, None)
    fleet.handle(begun, T0 + timedelta(hours=1))
    fleet.handle(sample(begun, 1, "5"), T0 + timedelta(hours=1))
    decision = fleet.handle(end(begun, 1), T0 + timedelta(hours=1))
    (record,) = [e.session for e in decision.events if hasattr(e, "session")]
    assert record.pricing_version == "2026-01"
