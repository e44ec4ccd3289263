"""Analytics: a read-only projection over Finalized sessions and their billing records.

Every figure is derived from the sessions it names (``session_ids``), so it can be traced back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from uuid import UUID

from domain.billing import BillingRecord
from domain.session_values import FinalizedSession, SessionKind

__all__ = ["AnalyticsReport", "KindFigures", "project"]


def _average(total: Decimal, count: int) -> Decimal | None:
    return (total / count).quantize(Decimal("0.001")) if count else None


@dataclass(frozen=True, slots=True)
class KindFigures:
    """Totals and averages of one kind of session."""

    kind: SessionKind
    session_ids: tuple[UUID, ...]
    energy_wh: Decimal
    distance_m: Decimal
    duration: timedelta
    revenue: dict[str, Decimal]
    timed_out: int
    missing_samples: int

    @property
    def count(self) -> int:
        return len(self.session_ids)

    @property
    def average_energy_wh(self) -> Decimal | None:
        return _average(self.energy_wh, self.count)

    @property
    def average_duration_s(self) -> Decimal | None:
        return _average(Decimal(str(self.duration.total_seconds())), self.count)

    @property
    def average_amount(self) -> dict[str, Decimal]:
        return {
            cur: (total / self.count).quantize(Decimal("0.0001"))
            for cur, total in self.revenue.items()
        }


@dataclass(frozen=True, slots=True)
class AnalyticsReport:
    """Rides (energy consumed) and charging (energy delivered), side by side."""

    rides: KindFigures
    charging: KindFigures

    @property
    def revenue(self) -> dict[str, Decimal]:
        total = dict(self.rides.revenue)
        for currency, amount in self.charging.revenue.items():
            total[currency] = total.get(currency, Decimal(0)) + amount
        return total


def _figures(
    kind: SessionKind, sessions: list[FinalizedSession], bills: dict[UUID, BillingRecord]
) -> KindFigures:
    revenue: dict[str, Decimal] = {}
    for s in sessions:
        record = bills.get(s.session_id)
        if record is not None:
            cur = record.amount.currency
            revenue[cur] = revenue.get(cur, Decimal(0)) + record.amount.amount
    return KindFigures(
        kind=kind,
        session_ids=tuple(s.session_id for s in sessions),
        energy_wh=sum((s.energy_wh for s in sessions), Decimal(0)),
        distance_m=sum((s.distance_m for s in sessions), Decimal(0)),
        duration=sum((s.duration for s in sessions), timedelta(0)),
        revenue=revenue,
        timed_out=sum(1 for s in sessions if s.end_reason == "timed_out"),
        missing_samples=sum(s.missing_samples for s in sessions),
    )


def project(
    sessions: Iterable[FinalizedSession], billing: Iterable[BillingRecord]
) -> AnalyticsReport:
    """Project Finalized sessions (and their bills) into fleet figures."""
    bills = {record.session_id: record for record in billing}
    by_kind: dict[SessionKind, list[FinalizedSession]] = {kind: [] for kind in SessionKind}
    for session in sessions:
        by_kind[session.kind].append(session)
    return AnalyticsReport(
        rides=_figures(SessionKind.RIDE, by_kind[SessionKind.RIDE], bills),
        charging=_figures(SessionKind.CHARGING, by_kind[SessionKind.CHARGING], bills),
    )
