"""Past-tense domain events: what happened, carried as ids and values, never aggregates."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from uuid import UUID

from domain.session_values import FinalizedSession, SessionKind
from domain.telemetry import TelemetrySample

__all__ = [
    "Event",
    "Outcome",
    "SessionEndReceived",
    "SessionFinalized",
    "SessionStarted",
    "TelemetrySampleAccepted",
]


class Outcome(StrEnum):
    """How a valid message settled: it changed something, or it had already been applied."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class SessionStarted:
    session_id: UUID
    bike_id: str
    kind: SessionKind
    party_id: str
    started_at: datetime
    received_at: datetime


@dataclass(frozen=True, slots=True)
class SessionEndReceived:
    session_id: UUID
    bike_id: str
    ended_at: datetime
    last_seq: int
    received_at: datetime


@dataclass(frozen=True, slots=True)
class TelemetrySampleAccepted:
    bike_id: str
    sample: TelemetrySample
    received_at: datetime


@dataclass(frozen=True, slots=True)
class SessionFinalized:
    session: FinalizedSession


Event = SessionStarted | SessionEndReceived | TelemetrySampleAccepted | SessionFinalized
