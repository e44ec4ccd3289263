"""The fleet: every bike's Active session, its waiting messages, and the sessions messages name.

``Bike`` is the aggregate root of the one-active-session rule: it holds its Active session (a
summary, never samples) and the messages that arrived before what they depend on. ``Fleet``
routes commands to bikes and sessions. A decision needs the command's bike and the session it
names, and a stored sample only where its seq is taken: ``sessions_decisions_need`` and
``samples_decisions_need`` say which; the caller loads them (what is loaded, and at which
version of each bike, is the service layer's cache: ``daemon.service.fleet_cache``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from domain.commands import Command, EndSession, RecordTelemetry, StartSession
from domain.errors import (
    ActiveSessionExists,
    DomainError,
    SessionIdConflict,
    UnknownSession,
    when,
)
from domain.events import (
    DeferredMessageSettled,
    Event,
    MessageDeferred,
    Outcome,
    SessionStarted,
    Waiting,
)
from domain.session import Session, session_for
from domain.session_values import SessionPolicy, require_not_future
from domain.telemetry import TelemetrySample

__all__ = ["Bike", "Decision", "Fleet"]


@dataclass(frozen=True, slots=True)
class Decision:
    """How a command settled and what it caused."""

    outcome: Outcome
    events: tuple[Event, ...] = ()


@dataclass(slots=True)
class Bike:
    """A bike, its Active session if any (at most one), and its waiting messages."""

    bike_id: str
    current: Session | None = None
    # A tuple: most bikes never have one waiting, and an empty list is 56 bytes per bike.
    waiting: tuple[Waiting, ...] = ()

    def leave(self, waiting: Waiting) -> None:
        """The waiting message is settled (applied or rejected): it waits no more."""
        index = self.waiting.index(waiting)
        self.waiting = self.waiting[:index] + self.waiting[index + 1 :]

    @staticmethod
    def check_start(command: StartSession, now: datetime, policy: SessionPolicy) -> None:
        """What a start must satisfy whatever order it arrives in."""
        require_not_future(command.occurred_at, now, policy.clock_skew, "occurred_at")

    def start(
        self, command: StartSession, now: datetime, policy: SessionPolicy
    ) -> tuple[Session, list[Event]]:
        self.check_start(command, now, policy)
        if self.current is not None:
            raise ActiveSessionExists(
                f"bike {self.bike_id} already has active session {self.current.session_id}"
            )
        session = session_for(command.kind)(
            session_id=command.session_id,
            bike_id=self.bike_id,
            party_id=command.party_id,
            started_at=command.occurred_at,
            last_heard_at=now,
        )
        self.current = session
        started = SessionStarted(
            command.session_id,
            self.bike_id,
            command.kind,
            command.party_id,
            command.occurred_at,
            now,
        )
        return session, [started]

    @property
    def busy(self) -> bool:
        """A start must wait: the bike's Active session is not finalized yet.

        Even once it has ended: its last samples may still be on their way (another instance,
        another topic), and a start that cut its grace period short would lose them. The start
        waits until the session completes, or until its own grace period runs out.
        """
        return self.current is not None


@dataclass(slots=True)
class Fleet:
    """Routes commands to the bikes and sessions it was given; pure."""

    policy: SessionPolicy = field(default_factory=SessionPolicy)
    finalized_cache: int = 1_000
    bikes: dict[str, Bike] = field(default_factory=dict)
    # Finalized sessions are immutable, so a cached one never goes stale.
    finalized: OrderedDict[UUID, Session] = field(default_factory=OrderedDict)
    # Batch-scoped: sessions of other bikes that messages name, stored samples at taken seqs.
    _foreign: dict[UUID, Session] = field(default_factory=dict)
    _stored: dict[tuple[UUID, int], TelemetrySample] = field(default_factory=dict)
    # Batch-scoped, only when the caller asks for it (``load_telemetry_owners``): whose sample
    # each (telemetry_id, emitted_at) already is, stored or earlier in the batch.
    _owners: dict[tuple[UUID, datetime], tuple[UUID, int]] | None = None
    _changed: dict[UUID, Session] = field(default_factory=dict)
    _events: list[Event] = field(default_factory=list)

    # -- what a decision needs loaded ---------------------------------------------------

    def load_bike(
        self,
        bike_id: str,
        active: Session | None,
        waiting: Iterable[Waiting] = (),
    ) -> None:
        """Know a bike as the store has it: its Active session (or none) and waiting messages."""
        if active is not None and (active.bike_id != bike_id or active.finalized is not None):
            raise ValueError(f"{active!r} is not an Active session of bike {bike_id}")
        self.bikes[bike_id] = Bike(bike_id, active, tuple(waiting))

    def load_session(self, session: Session) -> None:
        """Know a session a message names that is not its bike's Active one."""
        if session.finalized is not None:
            self._remember_finalized(session)
        else:
            self._foreign[session.session_id] = session

    def load_samples(self, samples: Iterable[TelemetrySample]) -> None:
        """Know the stored samples at taken seqs (``samples_decisions_need``)."""
        for sample in samples:
            self._stored[(sample.session_id, sample.seq)] = sample

    def load_telemetry_owners(
        self, owners: Iterable[tuple[UUID, datetime, UUID, int]] = ()
    ) -> None:
        """Know which session and seq already hold these (telemetry_id, emitted_at) pairs, and
        check every sample of this batch against them and against each other: a telemetry id
        is one sample's, whichever session another message claims it for."""
        self._owners = {(tid, at): (sid, seq) for tid, at, sid, seq in owners}

    @staticmethod
    def telemetry_keys(commands: Iterable[Command]) -> list[tuple[UUID, datetime]]:
        """(telemetry_id, emitted_at) of the samples among these commands."""
        return [
            (c.sample.telemetry_id, c.sample.emitted_at.at)
            for c in commands
            if isinstance(c, RecordTelemetry)
        ]

    def sessions_decisions_need(self, commands: Iterable[Command]) -> set[UUID]:
        """Session ids these commands name that are neither a bike's current nor cached."""
        wanted: set[UUID] = set()
        for command in commands:
            bike = self.bikes.get(command.bike_id)
            if bike is None:
                raise LookupError(f"bike {command.bike_id} is not loaded; refresh it first")
            if self._find(bike, command.session_id) is None:
                wanted.add(command.session_id)
        return wanted

    def samples_decisions_need(self, commands: Iterable[Command]) -> set[tuple[UUID, int]]:
        """(session id, seq) of samples whose seq is taken, to tell a duplicate from a clash."""
        wanted: set[tuple[UUID, int]] = set()
        for command in commands:
            if not isinstance(command, RecordTelemetry):
                continue
            key = (command.session_id, command.sample.seq)
            session = self._find(self.bikes[command.bike_id], command.session_id)
            if session is not None and key[1] in session.seqs and key not in self._stored:
                wanted.add(key)
        return wanted

    # -- deciding ------------------------------------------------------------------------

    def handle(self, command: Command, now: datetime, ref: bytes = b"") -> Decision:
        """Apply one command; raises a ``DomainError`` when a rule would break.

        ``ref`` names the raw message, should it have to wait (``Outcome.DEFERRED``).
        """
        bike = self.bikes.get(command.bike_id)
        if bike is None:
            raise LookupError(f"bike {command.bike_id} is not loaded; refresh it first")
        mark = len(self._events)
        # Expiries happen before routing: they happened even if the command is then rejected.
        self._expire_bike(bike, now)
        decision = self._route(bike, command, now, ref)
        self._events.extend(decision.events)
        if decision.outcome is Outcome.ACCEPTED:
            self._apply_waiting(bike, now)
        return Decision(decision.outcome, tuple(self._events[mark:]))

    def expire(self, now: datetime, bike_ids: Iterable[str] | None = None) -> list[Event]:
        """Finalize due sessions and settle overdue waiting messages (of these bikes, or all)."""
        mark = len(self._events)
        ids = list(self.bikes) if bike_ids is None else list(bike_ids)
        for bike_id in ids:
            bike = self.bikes.get(bike_id)
            if bike is not None:
                self._expire_bike(bike, now)
        return self._events[mark:]

    def pop_events(self) -> list[Event]:
        """Every event since the last call, in order; the batch ends here."""
        events, self._events = self._events, []
        self._foreign.clear()
        self._stored.clear()
        self._owners = None
        self._changed.clear()
        return events

    def changed_sessions(self) -> list[Session]:
        """Sessions whose summary changed since the last ``pop_events``, to be written."""
        return list(self._changed.values())

    def active_count(self) -> int:
        return sum(1 for bike in self.bikes.values() if bike.current is not None)

    # -- inside ----------------------------------------------------------------------------

    def _find(self, bike: Bike, session_id: UUID) -> Session | None:
        if bike.current is not None and bike.current.session_id == session_id:
            return bike.current
        return self.finalized.get(session_id) or self._foreign.get(session_id)

    def _remember_finalized(self, session: Session) -> None:
        self.finalized[session.session_id] = session
        self.finalized.move_to_end(session.session_id)
        while len(self.finalized) > self.finalized_cache:
            self.finalized.popitem(last=False)

    def _settle_current(self, bike: Bike) -> None:
        if bike.current is not None and bike.current.finalized is not None:
            self._remember_finalized(bike.current)
            bike.current = None

    def _route(self, bike: Bike, command: Command, now: datetime, ref: bytes) -> Decision:
        """The routing table: a start, or a message for a session that is not there yet
        (it waits), of another bike (refused), or this bike's (the session records it)."""
        session = self._find(bike, command.session_id)
        if isinstance(command, StartSession):
            return self._start(bike, session, command, now, ref)
        if session is None:
            return self._defer(bike, command, now, ref)
        if session.bike_id != bike.bike_id:
            raise UnknownSession(f"bike {bike.bike_id} has no session {command.session_id}")
        if isinstance(command, EndSession):
            outcome, events = session.record_end(command, now, self.policy)
        else:
            assert isinstance(command, RecordTelemetry)
            outcome, events = self._record_sample(session, command.sample, now)
        if outcome is Outcome.ACCEPTED:
            self._changed[session.session_id] = session
            self._settle_current(bike)
        return Decision(outcome, tuple(events))

    def _start(
        self, bike: Bike, session: Session | None, command: StartSession, now: datetime, ref: bytes
    ) -> Decision:
        """A start: its own redelivery, a clash of session ids, a wait for the bike's Active
        session to be finalized, or the new Active session."""
        if session is not None:
            if session.same_start(command):
                return Decision(Outcome.DUPLICATE)
            raise SessionIdConflict(
                f"session_id {command.session_id} is already used by another "
                f"{session.kind} session of bike {session.bike_id}"
            )
        if bike.busy:
            Bike.check_start(command, now, self.policy)
            return self._defer(bike, command, now, ref)
        # Not a changed summary: its SessionStarted is the whole row (its last heard instant
        # is the start's arrival), written once; a sample or an end in the same batch marks
        # it changed, and its summary is written after that row.
        _, events = bike.start(command, now, self.policy)
        return Decision(Outcome.ACCEPTED, tuple(events))

    def _record_sample(
        self, session: Session, sample: TelemetrySample, now: datetime
    ) -> tuple[Outcome, list[Event]]:
        """A sample for its session; with the owners of telemetry ids known (a clash seen by
        the store), a telemetry id already another sample's is refused."""
        owners, key = self._owners, (sample.telemetry_id, sample.emitted_at.at)
        if owners is not None:
            owner = owners.get(key)
            if owner is not None and owner != (sample.session_id, sample.seq):
                raise SessionIdConflict(
                    f"telemetry_id {sample.telemetry_id} emitted at "
                    f"{when(sample.emitted_at.at)} is already sample {owner[1]} of "
                    f"session {owner[0]}"
                )
        stored = self._stored.get((sample.session_id, sample.seq))
        outcome, events = session.record_sample(sample, now, self.policy, stored)
        if outcome is Outcome.ACCEPTED:
            self._stored[(sample.session_id, sample.seq)] = sample
            if owners is not None:
                owners[key] = (sample.session_id, sample.seq)
        return outcome, events

    def _defer(self, bike: Bike, command: Command, now: datetime, ref: bytes) -> Decision:
        if any(w.command == command for w in bike.waiting):
            return Decision(Outcome.DUPLICATE)
        waiting = Waiting(command, now, ref)
        bike.waiting += (waiting,)
        return Decision(Outcome.DEFERRED, (MessageDeferred(bike.bike_id, waiting),))

    def _decidable(self, bike: Bike, command: Command) -> bool:
        if self._find(bike, command.session_id) is not None:
            return True
        return isinstance(command, StartSession) and not bike.busy

    def _apply_waiting(self, bike: Bike, now: datetime) -> None:
        """Decide, in arrival order, the waiting messages that what just happened unblocked."""
        progress = True
        while progress and bike.waiting:
            progress = False
            for waiting in bike.waiting:
                if self._decidable(bike, waiting.command):
                    bike.leave(waiting)
                    self._settle(bike, waiting, now)
                    progress = True
                    break

    def _settle(self, bike: Bike, waiting: Waiting, now: datetime) -> None:
        try:
            decision = self._route(bike, waiting.command, now, waiting.ref)
        except DomainError as exc:
            self._events.append(
                DeferredMessageSettled(bike.bike_id, waiting, exc.reason, exc.detail)
            )
            return
        self._events.extend(decision.events)
        self._events.append(DeferredMessageSettled(bike.bike_id, waiting))

    def _expire_bike(self, bike: Bike, now: datetime) -> None:
        if bike.current is not None:
            event = bike.current.expire(now, self.policy)
            if event is not None:
                self._events.append(event)
                self._changed[bike.current.session_id] = bike.current
                self._settle_current(bike)
        if not bike.waiting:
            return
        self._apply_waiting(bike, now)
        self._start_overdue_starts(bike, now)
        self._reject_overdue(bike, now)

    def _overdue(self, bike: Bike, now: datetime) -> list[Waiting]:
        grace = self.policy.finalize_grace
        return [w for w in bike.waiting if now >= w.received_at + grace]

    def _start_overdue_starts(self, bike: Bike, now: datetime) -> None:
        """A start whose grace period ran out finalizes an ended session first (SPEC: a new
        start during the grace period finalizes the old session first), then starts."""
        for waiting in self._overdue(bike, now):
            current = bike.current
            if (
                isinstance(waiting.command, StartSession)
                and waiting in bike.waiting
                and current is not None
                and current.end is not None
            ):
                self._events.append(current.cut_grace_short(now, self.policy))
                self._changed[current.session_id] = current
                self._settle_current(bike)
                self._apply_waiting(bike, now)

    def _reject_overdue(self, bike: Bike, now: datetime) -> None:
        """What still waits past its grace period is rejected with its usual code."""
        for waiting in self._overdue(bike, now):
            bike.leave(waiting)
            error: DomainError
            if isinstance(waiting.command, StartSession):
                assert bike.current is not None
                error = ActiveSessionExists(
                    f"bike {bike.bike_id} still had active session {bike.current.session_id} "
                    f"without an end when the grace period of this start ran out"
                )
            else:
                error = UnknownSession(
                    f"bike {bike.bike_id} has no session {waiting.command.session_id} "
                    "(nothing started it within the grace period)"
                )
            self._events.append(
                DeferredMessageSettled(bike.bike_id, waiting, error.reason, error.detail)
            )
