"""Past-tense domain events: what happened, carried as ids and values, never aggregates."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from uuid import UUID

from domain.commands import Command
from domain.errors import Reason
from domain.session_values import FinalizedSession, SessionKind
from domain.telemetry import TelemetrySample

__all__ = [
    "DeferredMessageSettled",
    "Event",
    "MessageDeferred",
    "Outcome",
    "SessionEndReceived",
    "SessionFinalized",
    "SessionStarted",
    "TelemetrySampleAccepted",
    "Waiting",
]


class Outcome(StrEnum):
    """How a valid message settled: it changed something, was applied already, or must wait."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    DEFERRED = "deferred"


@dataclass(frozen=True, slots=True)
class Waiting:
    """A message that arrived before what it depends on, held until the grace period ends.

    ``ref`` is the adapter's key of the raw message (the domain never reads it).
    """

    command: Command
    received_at: datetime
    ref: bytes


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


@dataclass(frozen=True, slots=True)
class MessageDeferred:
    """A message must wait for its session's start, or for its bike's Active session to end."""

    bike_id: str
    waiting: Waiting


@dataclass(frozen=True, slots=True)
class DeferredMessageSettled:
    """A waiting message was decided: applied (``reason`` None) or rejected with ``reason``."""

    bike_id: str
    waiting: Waiting
    reason: Reason | None = None
    detail: str | None = None


Event = (
    SessionStarted
    | SessionEndReceived
    | TelemetrySampleAccepted
    | SessionFinalized
    | MessageDeferred
    | DeferredMessageSettled
)
