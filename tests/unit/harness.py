"""A fleet with an in-memory store behind it: it loads what the fleet names, as the unit of work
does, so that domain tests exercise the same load-then-decide path as the daemon."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from domain.commands import Command
from domain.events import Event, SessionStarted, TelemetrySampleAccepted
from domain.fleet import Decision, Fleet
from domain.session import Session, session_for
from domain.telemetry import TelemetrySample


class FleetHarness:
    """Wraps a ``Fleet``; everything the fleet does not define here is the fleet's own."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.sessions: dict[UUID, Session] = {}
        self.samples: dict[tuple[UUID, int], TelemetrySample] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fleet, name)

    def handle(self, command: Command, now: datetime, ref: bytes = b"") -> Decision:
        fleet = self.fleet
        if command.bike_id not in fleet.bikes:
            fleet.load_bike(command.bike_id, None)
        for session_id in fleet.sessions_decisions_need([command]):
            if session_id in self.sessions:
                fleet.load_session(self.sessions[session_id])
        keys = fleet.samples_decisions_need([command])
        fleet.load_samples(self.samples[k] for k in keys if k in self.samples)
        decision = fleet.handle(command, now, ref or repr(command).encode())
        self.keep(decision.events)
        return decision

    def expire(self, now: datetime, bike_ids: Any = None) -> list[Event]:
        events = self.fleet.expire(now, bike_ids)
        self.keep(events)
        return events

    def keep(self, events: Any) -> None:
        """What a store would hold after these events."""
        for event in events:
            if isinstance(event, SessionStarted):
                current = self.fleet.bikes[event.bike_id].current
                if current is not None and current.session_id == event.session_id:
                    self.sessions[event.session_id] = current
                else:  # started and finalized in one step
                    self.sessions[event.session_id] = self.fleet.finalized[event.session_id]
            elif isinstance(event, TelemetrySampleAccepted):
                s = event.sample
                self.samples[(s.session_id, s.seq)] = s

    def session(self, session_id: UUID) -> Session:
        return self.sessions[session_id]


def reloaded(session: Session) -> Session:
    """A fresh copy of a session from its summary alone, as the store would load it."""
    return session_for(session.kind)(
        session_id=session.session_id,
        bike_id=session.bike_id,
        party_id=session.party_id,
        started_at=session.started_at,
        last_heard_at=session.last_heard_at,
        end=session.end,
        tally=session.tally,
        finalized=session.finalized,
    )
