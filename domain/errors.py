"""Domain errors: one class per broken rule, each with the stable reason code of SPEC §2."""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ActiveSessionExists",
    "DomainError",
    "InvalidPricing",
    "InvalidValue",
    "SeqBeyondEnd",
    "SessionAlreadyFinalized",
    "SessionIdConflict",
    "SessionKindMismatch",
    "TimestampOutOfRange",
    "UnknownSession",
]


class DomainError(Exception):
    """A business rule would break; ``reason`` becomes the rejection reason code."""

    reason: ClassVar[str] = "domain_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidValue(DomainError):
    """A value object was given a value it cannot hold (negative energy, naive time, …)."""

    reason = "schema_violation"


class ActiveSessionExists(DomainError):
    """The bike already has an Active session that has not ended."""

    reason = "active_session_exists"


class UnknownSession(DomainError):
    """The message names a session the bike does not have."""

    reason = "unknown_session"


class SessionAlreadyFinalized(DomainError):
    """The session is Finalized: nothing new may change it."""

    reason = "session_finalized"


class SessionKindMismatch(DomainError):
    """A ride message for a charging session, or the reverse."""

    reason = "session_kind_mismatch"


class SessionIdConflict(DomainError):
    """An id already known with different content."""

    reason = "session_id_conflict"


class TimestampOutOfRange(DomainError):
    """A timestamp outside the session, or beyond now plus the allowed clock skew."""

    reason = "timestamp_out_of_range"


class SeqBeyondEnd(DomainError):
    """A sample numbered past the ``last_seq`` its session's end announced."""

    reason = "seq_beyond_end"


class InvalidPricing(ValueError):
    """The pricing file cannot be used; the message says what to fix."""
