"""Values of the Session context: kinds, states, the end of a session and its fixed record."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from uuid import UUID

from domain.errors import InvalidValue, TimestampOutOfRange, when

__all__ = [
    "EndReason",
    "FinalizedSession",
    "SessionEnd",
    "SessionKind",
    "SessionPolicy",
    "SessionState",
    "require_not_future",
]


class SessionKind(StrEnum):
    RIDE = "ride"
    CHARGING = "charging"

    @property
    def party_field(self) -> str:
        """The payload field naming who the session is with: a rider or a station."""
        return "rider_id" if self is SessionKind.RIDE else "station_id"


class SessionState(StrEnum):
    ACTIVE = "active"
    FINALIZED = "finalized"


class EndReason(StrEnum):
    ENDED = "ended"
    TIMED_OUT = "timed_out"


def require_aware(value: datetime, what: str) -> None:
    """Naive timestamps are ambiguous across a fleet's time zones; refuse them."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidValue(f"{what} must carry a UTC offset, got naive {when(value)}")


def require_not_future(at: datetime, now: datetime, skew: timedelta, what: str) -> None:
    """The one rule for every publisher's clock: no time later than now plus the allowed skew."""
    if at > now + skew:
        raise TimestampOutOfRange(
            f"{what} {when(at)} is in the future (now {when(now)}, "
            f"allowed clock skew {skew.total_seconds():g} s)"
        )


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """The timing rules a deployment chooses: finalize grace, abandonment timeout, clock skew."""

    finalize_grace: timedelta = timedelta(seconds=5)
    abandon_after: timedelta = timedelta(hours=24)
    clock_skew: timedelta = timedelta(minutes=5)
    # The pricing version in force: every session finalized under this policy names it.
    pricing_version: str | None = None

    def __post_init__(self) -> None:
        for name in ("finalize_grace", "abandon_after", "clock_skew"):
            if getattr(self, name) < timedelta(0):
                raise InvalidValue(f"{name} must not be negative")


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """The publisher's end of a session: when, how many samples it sent, when we heard it."""

    occurred_at: datetime
    last_seq: int
    received_at: datetime

    def __post_init__(self) -> None:
        require_aware(self.occurred_at, "occurred_at")
        require_aware(self.received_at, "received_at")
        if isinstance(self.last_seq, bool) or not isinstance(self.last_seq, int):
            raise InvalidValue(f"last_seq must be a whole number, got {self.last_seq!r}")
        if self.last_seq < 0:
            raise InvalidValue(f"last_seq must not be negative, got {self.last_seq}")


@dataclass(frozen=True, slots=True)
class FinalizedSession:
    """A Finalized session's fixed record: what the finalized message and billing are made of."""

    session_id: UUID
    bike_id: str
    kind: SessionKind
    # The rider of a ride or the station of a charging session; None for a ride whose rider
    # was erased since (the record itself never changes: it refers to a pseudonym in store).
    party_id: str | None
    started_at: datetime
    ended_at: datetime
    energy_wh: Decimal
    distance_m: Decimal
    telemetry_count: int
    missing_samples: int
    end_reason: EndReason
    finalized_at: datetime
    # The pricing version in force when the session was finalized: part of its fixed record,
    # so that its bill never changes when prices do (None only before it was recorded).
    pricing_version: str | None = None

    def __post_init__(self) -> None:
        if self.energy_wh < 0 or self.distance_m < 0:
            raise InvalidValue("a finalized session's totals must not be negative")
        if self.ended_at < self.started_at:
            raise InvalidValue("a session cannot end before it started")

    @property
    def duration(self) -> timedelta:
        return self.ended_at - self.started_at
