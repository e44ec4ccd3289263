"""Session context: Ride and Charging sessions, their lifecycle and completeness rule."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Context, Decimal, Inexact, InvalidOperation
from typing import ClassVar
from uuid import UUID

from domain.commands import EndSession, StartSession
from domain.errors import (
    SeqBeyondEnd,
    SessionAlreadyFinalized,
    SessionIdConflict,
    SessionKindMismatch,
    TimestampOutOfRange,
    when,
)
from domain.events import (
    Event,
    Outcome,
    SessionEndReceived,
    SessionFinalized,
    TelemetrySampleAccepted,
)
from domain.seqs import SeqRanges
from domain.session_values import (
    EndReason,
    FinalizedSession,
    SessionEnd,
    SessionKind,
    SessionPolicy,
    SessionState,
    require_aware,
    require_not_future,
)
from domain.telemetry import TelemetrySample

__all__ = ["ChargingSession", "RideSession", "Session", "Tally", "session_for"]

_ZERO = Decimal(0)
_NO_SEQS = SeqRanges()


@dataclass(frozen=True, slots=True)
class Tally:
    """What a session's samples add up to so far: the energy and distance sums, which seqs
    are stored, and the latest emission time (None before the first sample)."""

    energy_wh: Decimal = _ZERO
    distance_m: Decimal = _ZERO
    seqs: SeqRanges = _NO_SEQS
    latest_emitted_at: datetime | None = None


_NO_TALLY = Tally()


# Sums are exact: inputs are bounded at the edge (SPEC §2), and this context holds any total of
# them (up to 2**31 samples of up to 10**9 with 20 decimals) without rounding.
_EXACT = Context(prec=60, traps=[Inexact, InvalidOperation])


def _text(total: Decimal) -> str:
    """A sum's exact text; a session without samples shares the one "0" (str() makes a new
    string each time: 100 bytes of every fresh session)."""
    text = str(total)
    return _ZERO_TEXT if text == _ZERO_TEXT else text


_ZERO_TEXT = "0"


class Session:
    """A bike's ride or charging session: Active until finalized once, then immutable.

    A session holds its summary, never its samples: the energy and distance sums, which seqs are
    stored, the latest emission time and the end. Telling a redelivered sample from a clashing
    one needs the stored sample only when its seq is taken; the caller loads exactly those
    (``Fleet.samples_decisions_need``) and passes them in.

    Energy and distance totals are fixed when the session is finalized: as soon as samples
    1..last_seq are in after the end arrived, when the grace period after the end expires, or
    when the session is abandoned.
    """

    kind: ClassVar[SessionKind]
    # A fleet keeps one per Active bike (100,000 in one process): slots, not a dict each.
    __slots__ = (
        "bike_id", "distance_text", "end", "energy_text", "finalized", "last_heard_at",
        "latest_emitted_at", "party_id", "seqs", "session_id", "started_at",
    )  # fmt: skip

    def __init__(  # noqa: PLR0913 - a session's summary as the store keeps it, by keyword
        self,
        *,
        session_id: UUID,
        bike_id: str,
        party_id: str | None,
        started_at: datetime,
        last_heard_at: datetime,
        end: SessionEnd | None = None,
        tally: Tally = _NO_TALLY,
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
        # Kept in the session's own slots, not as a Tally: a sample updates them in place.
        # The sums are kept as their exact text: a Decimal is 104 bytes, its text about half
        # (at 100,000 Active sessions, 11 MiB), and the store writes the text as it is.
        self.energy_text = _text(tally.energy_wh)
        self.distance_text = _text(tally.distance_m)
        self.seqs = tally.seqs
        self.latest_emitted_at = tally.latest_emitted_at
        self.finalized = finalized

    @property
    def energy_wh(self) -> Decimal:
        """The energy of its samples so far, exact."""
        return Decimal(self.energy_text)

    @property
    def distance_m(self) -> Decimal:
        """The distance of its samples so far, exact."""
        return Decimal(self.distance_text)

    @property
    def tally(self) -> Tally:
        """What its samples add up to so far."""
        return Tally(self.energy_wh, self.distance_m, self.seqs, self.latest_emitted_at)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.session_id} bike={self.bike_id} {self.state}>"

    @property
    def state(self) -> SessionState:
        return SessionState.ACTIVE if self.finalized is None else SessionState.FINALIZED

    @property
    def telemetry_count(self) -> int:
        return len(self.seqs)

    @property
    def is_complete(self) -> bool:
        """True when the end has arrived and samples 1..last_seq are all stored."""
        return self.end is not None and len(self.seqs) == self.end.last_seq

    def same_start(self, command: StartSession) -> bool:
        """Whether a start is this session's own (redelivered). Once a ride's rider has been
        erased its party is unknown: a start that matches in everything else is taken as the
        redelivery it almost surely is, a duplicate, not a conflict that would keep the rider
        id again among the rejections."""
        return (
            command.session_id == self.session_id
            and command.bike_id == self.bike_id
            and command.kind is self.kind
            and (self.party_id is None or command.party_id == self.party_id)
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
                f"session {self.session_id} already ended at {when(self.end.occurred_at)} "
                f"with last_seq {self.end.last_seq}; this end differs"
            )
        if command.occurred_at < self.started_at:
            raise TimestampOutOfRange(
                f"occurred_at {when(command.occurred_at)} is before the session started "
                f"({when(self.started_at)})"
            )
        require_not_future(command.occurred_at, now, policy.clock_skew, "occurred_at")
        if self.seqs.highest > command.last_seq:
            raise SeqBeyondEnd(
                f"last_seq {command.last_seq} is below sample seq {self.seqs.highest} "
                "that is already stored"
            )
        latest = self.latest_emitted_at
        if latest is not None and latest > command.occurred_at:
            raise TimestampOutOfRange(
                f"occurred_at {when(command.occurred_at)} is before a stored sample's "
                f"emitted_at ({when(latest)})"
            )
        self.end = SessionEnd(command.occurred_at, command.last_seq, received_at=now)
        self.last_heard_at = now
        events: list[Event] = [
            SessionEndReceived(
                self.session_id, self.bike_id, command.occurred_at, command.last_seq, now
            )
        ]
        if self.is_complete:
            events.append(self._finalize(now, EndReason.ENDED, policy))
        return Outcome.ACCEPTED, events

    def record_sample(
        self,
        sample: TelemetrySample,
        now: datetime,
        policy: SessionPolicy,
        stored: TelemetrySample | None = None,
    ) -> tuple[Outcome, list[Event]]:
        """Append a sample; a redelivered one is a duplicate, a clashing one a conflict.

        ``stored`` is the sample already stored at this seq, which the caller must pass
        whenever the seq is taken (``sample.seq in self.seqs``).
        """
        taken = sample.seq in self.seqs
        if taken and self._redelivered(sample, stored):
            return Outcome.DUPLICATE, []
        self._require_active()
        if taken:
            assert stored is not None
            raise SessionIdConflict(
                f"seq {sample.seq} of session {self.session_id} is already taken by "
                f"telemetry_id {stored.telemetry_id}"
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
        self._add(sample, now)
        events: list[Event] = [TelemetrySampleAccepted(self.bike_id, sample, now)]
        if self.is_complete:
            events.append(self._finalize(now, EndReason.ENDED, policy))
        return Outcome.ACCEPTED, events

    def _redelivered(self, sample: TelemetrySample, stored: TelemetrySample | None) -> bool:
        """At a taken seq: the stored sample again (a duplicate), its telemetry id with other
        content (a conflict, raised), or another sample (False: a conflict once the session is
        known to be Active)."""
        if stored is None:
            raise LookupError(
                f"seq {sample.seq} of session {self.session_id} is taken but its stored "
                "sample was not loaded; call Fleet.samples_decisions_need first"
            )
        if stored == sample:
            return True
        if stored.telemetry_id == sample.telemetry_id:
            raise SessionIdConflict(
                f"telemetry_id {sample.telemetry_id} is already stored with different content"
            )
        return False

    def _add(self, sample: TelemetrySample, now: datetime) -> None:
        """Sum the sample into the summary: energy, distance, its seq, the latest emission."""
        self.energy_text = str(_EXACT.add(Decimal(self.energy_text), sample.energy.wh))
        if sample.distance is not None:
            self.distance_text = str(_EXACT.add(Decimal(self.distance_text), sample.distance.m))
        self.seqs = self.seqs.with_seq(sample.seq)
        emitted = sample.emitted_at.at
        if self.latest_emitted_at is None or emitted > self.latest_emitted_at:
            self.latest_emitted_at = emitted
        self.last_heard_at = now

    def expire(self, now: datetime, policy: SessionPolicy) -> SessionFinalized | None:
        """Finalize when the grace period after the end ran out, or the session went dark."""
        if self.finalized is not None:
            return None
        if self.end is not None:
            if now >= self.end.received_at + policy.finalize_grace:
                return self._finalize(now, EndReason.ENDED, policy)
            return None
        if now >= self.last_heard_at + policy.abandon_after:
            return self._finalize(now, EndReason.TIMED_OUT, policy)
        return None

    def cut_grace_short(self, now: datetime, policy: SessionPolicy) -> SessionFinalized:
        """A new start for the bike during the grace period finalizes this session first."""
        assert self.end is not None, "only a session that has ended has a grace period"
        return self._finalize(now, EndReason.ENDED, policy)

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
                f"{when(self.finalized.finalized_at)} and cannot change"
            )

    def _finalize(
        self, now: datetime, reason: EndReason, policy: SessionPolicy
    ) -> SessionFinalized:
        self._require_active()
        count = len(self.seqs)
        if self.end is not None:
            ended_at, expected = self.end.occurred_at, self.end.last_seq
        else:
            latest = self.latest_emitted_at or self.started_at
            ended_at, expected = max(latest, self.started_at), self.seqs.highest
        self.finalized = FinalizedSession(
            session_id=self.session_id,
            bike_id=self.bike_id,
            kind=self.kind,
            party_id=self.party_id,
            started_at=self.started_at,
            ended_at=ended_at,
            energy_wh=self.energy_wh,
            distance_m=self.distance_m,
            telemetry_count=count,
            missing_samples=expected - count,
            end_reason=reason,
            finalized_at=now,
            pricing_version=policy.pricing_version,
        )
        return SessionFinalized(self.finalized)


class RideSession(Session):
    """A rider on the bike: energy is consumed."""

    __slots__ = ()
    kind = SessionKind.RIDE

    @property
    def rider_id(self) -> str | None:
        """None once the rider has been erased."""
        return self.party_id


class ChargingSession(Session):
    """The bike at a station: energy is delivered."""

    __slots__ = ()
    kind = SessionKind.CHARGING

    @property
    def station_id(self) -> str | None:
        return self.party_id


def session_for(kind: SessionKind) -> type[Session]:
    return RideSession if kind is SessionKind.RIDE else ChargingSession
