"""Imperative commands: what a bike or charger asks of the Session context."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from domain.errors import InvalidValue
from domain.session_values import SessionKind, require_aware
from domain.telemetry import TelemetrySample

__all__ = [
    "BIKE_ID_PATTERN",
    "BIKE_ID_RULE",
    "Command",
    "EndSession",
    "RecordTelemetry",
    "StartSession",
]

# SPEC §2: the one definition of a bike id, and the words every message uses for it.
BIKE_ID_RULE = "[A-Za-z0-9_-]{1,64}"
BIKE_ID_PATTERN = re.compile(BIKE_ID_RULE)
_PARTY_ID_MAX = 128


def _check_bike_id(bike_id: str) -> None:
    if not BIKE_ID_PATTERN.fullmatch(bike_id):
        raise InvalidValue(f"bike_id must match {BIKE_ID_RULE}, got {bike_id!r}")


@dataclass(frozen=True, slots=True)
class StartSession:
    """Start a ride (with a rider) or a charging session (at a station)."""

    bike_id: str
    session_id: UUID
    kind: SessionKind
    party_id: str
    occurred_at: datetime

    def __post_init__(self) -> None:
        _check_bike_id(self.bike_id)
        require_aware(self.occurred_at, "occurred_at")
        if not self.party_id or len(self.party_id) > _PARTY_ID_MAX:
            raise InvalidValue(
                f"{self.kind.party_field} must be 1 to {_PARTY_ID_MAX} characters long"
            )


@dataclass(frozen=True, slots=True)
class EndSession:
    """End a session, saying how many samples the publisher sent (``last_seq``)."""

    bike_id: str
    session_id: UUID
    kind: SessionKind
    occurred_at: datetime
    last_seq: int

    def __post_init__(self) -> None:
        _check_bike_id(self.bike_id)
        require_aware(self.occurred_at, "occurred_at")
        if isinstance(self.last_seq, bool) or self.last_seq < 0:
            raise InvalidValue(f"last_seq must be a whole number from 0, got {self.last_seq!r}")


@dataclass(frozen=True, slots=True)
class RecordTelemetry:
    """Append a Telemetry Sample to the bike's Active session."""

    bike_id: str
    sample: TelemetrySample

    def __post_init__(self) -> None:
        _check_bike_id(self.bike_id)

    @property
    def session_id(self) -> UUID:
        return self.sample.session_id


Command = StartSession | EndSession | RecordTelemetry
