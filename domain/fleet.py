"""The fleet: every bike's Active session and the sessions its messages name.

``Bike`` holds the one-active-session rule; ``Fleet`` routes commands to bikes and sessions. The
caller loads what the fleet does not know yet (``Fleet.missing``) before it hands commands over:
memory is a cache of the store, never the other way round.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from domain.commands import Command, EndSession, RecordTelemetry, StartSession
from domain.errors import (
    ActiveSessionExists,
    SessionIdConflict,
    TimestampOutOfRange,
    UnknownSession,
)
from domain.events import Event, Outcome, SessionFinalized, SessionStarted
from domain.session import Session, session_for
from domain.session_values import SessionPolicy

__all__ = ["Bike", "Decision", "Fleet"]


@dataclass(frozen=True, slots=True)
class Decision:
    """How a command settled and what it caused."""

    outcome: Outcome
    events: tuple[Event, ...] = ()


@dataclass(slots=True)
class Bike:
    """A bike and its Active session, if any: a bike has at most one."""

    bike_id: str
    current: Session | None = None

    def start(
        self, command: StartSession, now: datetime, policy: SessionPolicy
    ) -> tuple[Session, list[Event]]:
        if command.occurred_at > now + policy.clock_skew:
            raise TimestampOutOfRange(
                f"occurred_at {command.occurred_at.isoformat()} is in the future "
                f"(now {now.isoformat()})"
            )
        events: list[Event] = []
        if self.current is not None:
            if self.current.end is None:
                raise ActiveSessionExists(
                    f"bike {self.bike_id} already has active session {self.current.session_id}"
                )
            events.append(self.current.cut_grace_short(now))
        session = session_for(command.kind)(
            session_id=command.session_id,
            bike_id=self.bike_id,
            party_id=command.party_id,
            started_at=command.occurred_at,
            last_heard_at=now,
        )
        self.current = session
        events.append(
            SessionStarted(
                command.session_id,
                self.bike_id,
                command.kind,
                command.party_id,
                command.occurred_at,
                now,
            )
        )
        return session, events

    def expire(self, now: datetime, policy: SessionPolicy) -> SessionFinalized | None:
        if self.current is None:
            return None
        event = self.current.expire(now, policy)
        if self.current.finalized is not None:
            self.current = None
        return event

    def settle(self) -> None:
        """Let go of the current session once it is finalized."""
        if self.current is not None and self.current.finalized is not None:
            self.current = None


@dataclass(slots=True)
class Fleet:
    """Routes commands to the bikes and sessions it knows; pure, and a cache of the store."""

    policy: SessionPolicy = field(default_factory=SessionPolicy)
    bikes: dict[str, Bike] = field(default_factory=dict)
    sessions: dict[UUID, Session] = field(default_factory=dict)
    _events: list[Event] = field(default_factory=list)

    def load_bike(self, bike_id: str, active: Session | None) -> None:
        """Know a bike, with its Active session as the store has it (or none)."""
        self.bikes[bike_id] = Bike(bike_id, active)
        if active is not None:
            self.sessions[active.session_id] = active

    def load_session(self, session: Session) -> None:
        """Know a session that a message names (typically a Finalized one)."""
        self.sessions.setdefault(session.session_id, session)

    def missing(self, commands: Iterable[Command]) -> tuple[set[str], set[UUID]]:
        """Bike ids and session ids these commands need that the fleet does not know yet."""
        bikes: set[str] = set()
        sessions: set[UUID] = set()
        for command in commands:
            if command.bike_id not in self.bikes:
                bikes.add(command.bike_id)
            if command.session_id not in self.sessions:
                sessions.add(command.session_id)
        return bikes, sessions

    def handle(self, command: Command, now: datetime) -> Decision:
        """Apply one command; raises a ``DomainError`` when a rule would break."""
        bike = self.bikes.get(command.bike_id)
        if bike is None:
            raise LookupError(f"bike {command.bike_id} is not loaded; call Fleet.missing first")
        expired = bike.expire(now, self.policy)
        if expired is not None:
            # Recorded before routing: it happened even if the command is then rejected.
            self._events.append(expired)
        decision = self._route(bike, command, now)
        bike.settle()
        self._events.extend(decision.events)
        if expired is not None:
            return Decision(decision.outcome, (expired, *decision.events))
        return decision

    def pop_events(self) -> list[Event]:
        """Every event since the last call, in order, including expiries during rejections."""
        events, self._events = self._events, []
        return events

    def expire(self, now: datetime) -> list[SessionFinalized]:
        """Finalize sessions whose grace period ran out or that went dark."""
        events = []
        for bike in self.bikes.values():
            event = bike.expire(now, self.policy)
            if event is not None:
                events.append(event)
        self._events.extend(events)
        return events

    def evict_finalized(self, keep: int) -> None:
        """Bound memory: keep only the ``keep`` most recently loaded Finalized sessions."""
        finalized = [sid for sid, s in self.sessions.items() if s.finalized is not None]
        for session_id in finalized[: max(0, len(finalized) - keep)]:
            del self.sessions[session_id]

    def active_count(self) -> int:
        return sum(1 for bike in self.bikes.values() if bike.current is not None)

    def _route(self, bike: Bike, command: Command, now: datetime) -> Decision:
        session = self.sessions.get(command.session_id)
        if isinstance(command, StartSession):
            if session is not None:
                if session.same_start(command):
                    return Decision(Outcome.DUPLICATE)
                raise SessionIdConflict(
                    f"session_id {command.session_id} is already used by another "
                    f"{session.kind} session of bike {session.bike_id}"
                )
            session, events = bike.start(command, now, self.policy)
            self.sessions[session.session_id] = session
            return Decision(Outcome.ACCEPTED, tuple(events))
        if session is None or session.bike_id != bike.bike_id:
            raise UnknownSession(f"bike {bike.bike_id} has no session {command.session_id}")
        if isinstance(command, EndSession):
            outcome, events = session.record_end(command, now, self.policy)
        else:
            assert isinstance(command, RecordTelemetry)
            outcome, events = session.record_sample(command.sample, now, self.policy)
        return Decision(outcome, tuple(events))
