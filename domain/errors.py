"""Domain errors: one class per broken rule, each with the stable reason code of SPEC §2."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import ClassVar

__all__ = [
    "ActiveSessionExists",
    "DomainError",
    "InvalidPricing",
    "InvalidValue",
    "Reason",
    "SeqBeyondEnd",
    "SessionAlreadyFinalized",
    "SessionIdConflict",
    "SessionKindMismatch",
    "TimestampOutOfRange",
    "UnknownSession",
    "when",
]


def when(at: datetime) -> str:
    """How a rule's message names an instant: in UTC with Z, as everything ChargeFlow says
    (SPEC §2), whatever offset it came with; a naive one (refused for being naive) as sent."""
    if at.tzinfo is None or at.utcoffset() is None:
        return at.isoformat()
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Reason(StrEnum):
    """The rejection reason codes of SPEC §2: the one list the edge, the domain's errors, the
    metrics and the AsyncAPI document use."""

    MALFORMED_JSON = "malformed_json"
    SCHEMA_VIOLATION = "schema_violation"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNKNOWN_TOPIC = "unknown_topic"
    ACTIVE_SESSION_EXISTS = "active_session_exists"
    UNKNOWN_SESSION = "unknown_session"
    SESSION_FINALIZED = "session_finalized"
    SESSION_KIND_MISMATCH = "session_kind_mismatch"
    SESSION_ID_CONFLICT = "session_id_conflict"
    TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
    SEQ_BEYOND_END = "seq_beyond_end"


class DomainError(Exception):
    """A business rule would break; ``reason`` becomes the rejection reason code."""

    reason: ClassVar[Reason]

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidValue(DomainError):
    """A value object was given a value it cannot hold (negative energy, naive time, …)."""

    reason = Reason.SCHEMA_VIOLATION


class ActiveSessionExists(DomainError):
    """The bike already has an Active session that has not ended."""

    reason = Reason.ACTIVE_SESSION_EXISTS


class UnknownSession(DomainError):
    """The message names a session the bike does not have."""

    reason = Reason.UNKNOWN_SESSION


class SessionAlreadyFinalized(DomainError):
    """The session is Finalized: nothing new may change it."""

    reason = Reason.SESSION_FINALIZED


class SessionKindMismatch(DomainError):
    """A ride message for a charging session, or the reverse."""

    reason = Reason.SESSION_KIND_MISMATCH


class SessionIdConflict(DomainError):
    """An id already known with different content."""

    reason = Reason.SESSION_ID_CONFLICT


class TimestampOutOfRange(DomainError):
    """A timestamp outside the session, or beyond now plus the allowed clock skew."""

    reason = Reason.TIMESTAMP_OUT_OF_RANGE


class SeqBeyondEnd(DomainError):
    """A sample numbered past the ``last_seq`` its session's end announced."""

    reason = Reason.SEQ_BEYOND_END


class InvalidPricing(ValueError):
    """The pricing file cannot be used; the message says what to fix."""
