"""Telemetry context: the Telemetry Sample and the values it carries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from uuid import UUID

from domain.errors import InvalidValue, TimestampOutOfRange, when
from domain.session_values import require_aware, require_not_future

__all__ = ["Distance", "EmissionTime", "EnergyDelta", "StateOfCharge", "TelemetrySample"]

_HUNDRED = Decimal(100)


def _finite_non_negative(value: Decimal, what: str) -> None:
    if not isinstance(value, Decimal) or not value.is_finite():
        raise InvalidValue(f"{what} must be a finite decimal, got {value!r}")
    if value < 0:
        raise InvalidValue(f"{what} must not be negative, got {value}")


@dataclass(frozen=True, slots=True)
class EnergyDelta:
    """Watt-hours consumed on a ride, or delivered while charging, since the previous sample."""

    wh: Decimal

    def __post_init__(self) -> None:
        _finite_non_negative(self.wh, "energy_wh")


@dataclass(frozen=True, slots=True)
class Distance:
    """Metres travelled since the previous sample."""

    m: Decimal

    def __post_init__(self) -> None:
        _finite_non_negative(self.m, "distance_m")


@dataclass(frozen=True, slots=True)
class StateOfCharge:
    """Battery state of charge in percent, 0 to 100."""

    pct: Decimal

    def __post_init__(self) -> None:
        if not isinstance(self.pct, Decimal) or not self.pct.is_finite():
            raise InvalidValue(f"soc_pct must be a finite decimal, got {self.pct!r}")
        if not 0 <= self.pct <= _HUNDRED:
            raise InvalidValue(f"soc_pct must lie between 0 and 100, got {self.pct}")


@dataclass(frozen=True, slots=True)
class EmissionTime:
    """When the bike took the sample: an aware timestamp."""

    at: datetime

    def __post_init__(self) -> None:
        require_aware(self.at, "emitted_at")

    def check_within(
        self, start: datetime, end: datetime | None, now: datetime, skew: timedelta
    ) -> None:
        """Raise unless start <= at <= end (when the end is known) and at <= now + skew."""
        if self.at < start:
            raise TimestampOutOfRange(
                f"emitted_at {when(self.at)} is before the session started ({when(start)})"
            )
        if end is not None and self.at > end:
            raise TimestampOutOfRange(
                f"emitted_at {when(self.at)} is after the session ended ({when(end)})"
            )
        require_not_future(self.at, now, skew, "emitted_at")


@dataclass(frozen=True, slots=True)
class TelemetrySample:
    """One append-only reading of a session: its ids, place in sequence and energy delta."""

    telemetry_id: UUID
    session_id: UUID
    seq: int
    emitted_at: EmissionTime
    energy: EnergyDelta
    distance: Distance | None = None
    soc: StateOfCharge | None = None

    def __post_init__(self) -> None:
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 1:
            raise InvalidValue(f"seq must be a whole number from 1, got {self.seq!r}")
