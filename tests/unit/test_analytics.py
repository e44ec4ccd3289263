"""Analytics: a projection of finalized sessions, traceable to their ids."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from domain.analytics import project
from domain.billing import bill
from domain.session_values import EndReason, SessionKind
from tests.unit.test_billing import finalized, shipped_pricing


def test_figures_are_split_by_kind_and_traceable_to_sessions():
    rides = [finalized(SessionKind.RIDE, "1234.5"), finalized(SessionKind.RIDE, "765.5")]
    charge = finalized(SessionKind.CHARGING, "1500")
    pricing = shipped_pricing()
    report = project([*rides, charge], [bill(s, pricing) for s in [*rides, charge]])
    assert report.rides.count == 2
    assert report.rides.session_ids == tuple(s.session_id for s in rides)
    assert report.rides.energy_wh == Decimal("2000.0")
    assert report.rides.average_energy_wh == Decimal("1000.000")
    assert report.rides.average_duration_s == Decimal("600.000")
    assert report.rides.revenue == {"EUR": Decimal("0.60")}  # 0.37 + 0.23
    assert report.charging.count == 1
    assert report.charging.energy_wh == Decimal(1500)
    assert report.revenue == {"EUR": Decimal("0.98")}


def test_no_sessions_gives_zero_totals_and_no_averages():
    report = project([], [])
    assert report.rides.count == 0
    assert report.rides.average_energy_wh is None
    assert report.revenue == {}


def test_a_session_without_a_bill_adds_no_revenue():
    from dataclasses import replace

    session = replace(
        finalized(SessionKind.RIDE, "10"),
        end_reason=EndReason.TIMED_OUT,
        ended_at=finalized(SessionKind.RIDE, "1").started_at + timedelta(minutes=1),
    )
    report = project([session], [])
    assert report.rides.revenue == {}
    assert report.rides.timed_out == 1
