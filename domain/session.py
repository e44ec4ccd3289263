"""Session context: Ride and Charging sessions, their lifecycle and completeness rule."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import ClassVar
from uuid import UUID

from domain.commands import EndSession, StartSession
from domain.errors import (
    SeqBeyondEnd,
    SessionAlreadyFinalized,
    SessionIdConflict,
    SessionKindMismatch,
    TimestampOutOfRange,
)
from domain.events import (
    Event,
    Outcome,
    SessionEndReceived,
    SessionFinalized,
    TelemetrySampleAccepted,
)
from domain.session_values import (
    EndReason,
    FinalizedSession,
    SessionEnd,
    SessionKind,
    SessionPolicy,
    SessionState,
    require_aware,
)
from domain.telemetry import TelemetrySample

__all__ = ["ChargingSession", "RideSession", "Session", "session_for"]


class Session:
    """A bike's ride or charging session: Active until finalized once, then immutable.

    Energy and distance totals are the sums of the accepted samples and are fixed when the
    session is finalized: as soon as samples 1..last_seq are in after the end arrived, when the
    grace period after the end expires, or when the session is abandoned.
    """

    kind: ClassVar[SessionKind]

    def __init__(
        self,
        *,
        session_id: UUID,
        bike_id: str,
        party_id: str,
        started_at: datetime,
        last_heard_at: datetime,
        end: SessionEnd | None = None,
        samples: Iterable[TelemetrySample] = (),
        finalized: FinalizedSession | None = None,
    ) -> None:
        require_aware(started_at, "started_at")
        require_aware(last_heard_at, "last_heard_at")
        self.session_id = session_id
        self.bike_id = bike_id
        self.party_id = party_id
        self.started_at = started_at
        self.last_heard_at = last_heard_at
        self.end = end
        self.finalized = finalized
        self._by_seq: dict[int, TelemetrySample] = {}
        self._by_id: dict[UUID, TelemetrySample] = {}
        for sample in samples:
            self._by_seq[sample.seq] = sample
            self._by_id[sample.telemetry_id] = sample

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.session_id} bike={self.bike_id} {self.state}>"

    @property
    def state(self) -> SessionState:
        return SessionState.ACTIVE if self.finalized is None else SessionState.FINALIZED

    @property
    def samples(self) -> tuple[TelemetrySample, ...]:
        return tuple(self._by_seq[seq] for seq in sorted(self._by_seq))

    @property
    def is_complete(self) -> bool:
        """True when the end has arrived and samples 1..last_seq are all stored."""
        return self.end is not None and len(self._by_seq) == self.end.last_seq

    def same_start(self, command: StartSession) -> bool:
        return (
            command.session_id == self.session_id
            and command.bike_id == self.bike_id
            and command.kind is self.kind
            and command.party_id == self.party_id
            and command.occurred_at == self.started_at
        )

    # -- commands ------------------------------------------------------------------------

    def record_end(
        self, command: EndSession, now: datetime, policy: SessionPolicy
    ) -> tuple[Outcome, list[Event]]:
        """Take the publisher's end; finalize at once if no sample is missing."""
        self._require_kind(command.kind)
        if self.end is not None and (command.occurred_at, command.last_seq) == (
            self.end.occurred_at,
            self.end.last_seq,
        ):
            return Outcome.DUPLICATE, []
        self._require_active()
        if self.end is not None:
            raise SessionIdConflict(
                f"session {self.session_id} already ended at {self.end.occurred_at.isoformat()} "
                f"with last_seq {self.end.last_seq}; this end differs"
            )
        if command.occurred_at < self.started_at:
            raise TimestampOutOfRange(
                f"occurred_at {command.occurred_at.isoformat()} is before the session started "
                f"({self.started_at.isoformat()})"
            )
        if command.occurred_at > now + policy.clock_skew:
            raise TimestampOutOfRange(
                f"occurred_at {command.occurred_at.isoformat()} is in the future "
                f"(now {now.isoformat()})"
            )
        if self._by_seq and max(self._by_seq) > command.last_seq:
            raise SeqBeyondEnd(
                f"last_seq {command.last_seq} is below sample seq {max(self._by_seq)} "
                "that is already stored"
            )
        latest = max((s.emitted_at.at for s in self._by_seq.values()), default=None)
        if latest is not None and latest > command.occurred_at:
            raise TimestampOutOfRange(
                f"occurred_at {command.occurred_at.isoformat()} is before a stored sample's "
                f"emitted_at ({latest.isoformat()})"
            )
        self.end = SessionEnd(command.occurred_at, command.last_seq, received_at=now)
        self.last_heard_at = now
        events: list[Event] = [
            SessionEndReceived(
                self.session_id, self.bike_id, command.occurred_at, command.last_seq, now
            )
        ]
        if self.is_complete:
            events.append(self._finalize(now, EndReason.ENDED))
        return Outcome.ACCEPTED, events

    def record_sample(
        self, sample: TelemetrySample, now: datetime, policy: SessionPolicy
    ) -> tuple[Outcome, list[Event]]:
        """Append a sample; a redelivered one is a duplicate, a clashing one a conflict."""
        known = self._by_id.get(sample.telemetry_id)
        if known is not None:
            if known == sample:
                return Outcome.DUPLICATE, []
            raise SessionIdConflict(
                f"telemetry_id {sample.telemetry_id} is already stored with different content"
            )
        self._require_active()
        taken = self._by_seq.get(sample.seq)
        if taken is not None:
            raise SessionIdConflict(
                f"seq {sample.seq} of session {self.session_id} is already taken by "
                f"telemetry_id {taken.telemetry_id}"
            )
        if self.end is not None and sample.seq > self.end.last_seq:
            raise SeqBeyondEnd(
                f"seq {sample.seq} is beyond last_seq {self.end.last_seq} announced by the end"
            )
        sample.emitted_at.check_within(
            self.started_at,
            self.end.occurred_at if self.end else None,
            now,
            policy.clock_skew,
        )
        self._by_seq[sample.seq] = sample
        self._by_id[sample.telemetry_id] = sample
        self.last_heard_at = now
        events: list[Event] = [TelemetrySampleAccepted(self.bike_id, sample, now)]
        if self.is_complete:
            events.append(self._finalize(now, EndReason.ENDED))
        return Outcome.ACCEPTED, events

    def expire(self, now: datetime, policy: SessionPolicy) -> SessionFinalized | None:
        """Finalize when the grace period after the end ran out, or the session went dark."""
        if self.finalized is not None:
            return None
        if self.end is not None:
            if now >= self.end.received_at + policy.finalize_grace:
                return self._finalize(now, EndReason.ENDED)
            return None
        if now >= self.last_heard_at + policy.abandon_after:
            return self._finalize(now, EndReason.TIMED_OUT)
        return None

    def cut_grace_short(self, now: datetime) -> SessionFinalized:
        """A new start for the bike during the grace period finalizes this session first."""
        assert self.end is not None, "only a session that has ended has a grace period"
        return self._finalize(now, EndReason.ENDED)

    # -- rules ---------------------------------------------------------------------------

    def _require_kind(self, kind: SessionKind) -> None:
        if kind is not self.kind:
            raise SessionKindMismatch(
                f"session {self.session_id} is a {self.kind} session, not a {kind} session"
            )

    def _require_active(self) -> None:
        if self.finalized is not None:
            raise SessionAlreadyFinalized(
                f"session {self.session_id} was finalized at "
                f"{self.finalized.finalized_at.isoformat()} and cannot change"
            )

    def _finalize(self, now: datetime, reason: EndReason) -> SessionFinalized:
        self._require_active()
        samples = self._by_seq.values()
        if self.end is not None:
            ended_at, expected = self.end.occurred_at, self.end.last_seq
        else:
            latest = max((s.emitted_at.at for s in samples), default=self.started_at)
            ended_at, expected = max(latest, self.started_at), max(self._by_seq, default=0)
        self.finalized = FinalizedSession(
            session_id=self.session_id,
            bike_id=self.bike_id,
            kind=self.kind,
            party_id=self.party_id,
            started_at=self.started_at,
            ended_at=ended_at,
            energy_wh=sum((s.energy.wh for s in samples), Decimal(0)),
            distance_m=sum((s.distance.m for s in samples if s.distance), Decimal(0)),
            telemetry_count=len(self._by_seq),
            missing_samples=expected - len(self._by_seq),
            end_reason=reason,
            finalized_at=now,
        )
        return SessionFinalized(self.finalized)


class RideSession(Session):
    """A rider on the bike: energy is consumed."""

    kind = SessionKind.RIDE

    @property
    def rider_id(self) -> str:
        return self.party_id


class ChargingSession(Session):
    """The bike at a station: energy is delivered."""

    kind = SessionKind.CHARGING

    @property
    def station_id(self) -> str:
        return self.party_id


def session_for(kind: SessionKind) -> type[Session]:
    return RideSession if kind is SessionKind.RIDE else ChargingSession
