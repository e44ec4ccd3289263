"""A stateful property test: any sequence of commands, redeliveries and expiries keeps the rules."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from domain.commands import Command, StartSession
from domain.errors import DomainError, SessionIdConflict
from domain.events import (
    Outcome,
    SessionFinalized,
    SessionStarted,
    TelemetrySampleAccepted,
)
from domain.fleet import Fleet
from domain.session_values import SessionKind, SessionPolicy
from tests.builders import T0, bike_id, end, sample, start
from tests.unit.harness import FleetHarness, reloaded

BIKES = ["bike-a", "bike-b"]


class FleetMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fleet = FleetHarness(Fleet(SessionPolicy(finalize_grace=timedelta(seconds=5),
                                         abandon_after=timedelta(minutes=10))))  # fmt: skip
        self.now = T0 + timedelta(hours=1)
        self.starts: dict[str, list[StartSession]] = defaultdict(list)
        self.accepted: list[Command] = []
        self.energy: dict[uuid.UUID, Decimal] = defaultdict(Decimal)
        self.final: dict[uuid.UUID, object] = {}
        self.seq: dict[uuid.UUID, int] = defaultdict(int)

    def _apply(self, command: Command) -> None:
        try:
            decision = self.fleet.handle(command, self.now)
        except DomainError:
            decision = None
        self._record(self.fleet.pop_events())
        if decision is not None and decision.outcome is Outcome.ACCEPTED:
            self.accepted.append(command)

    def _record(self, events) -> None:
        for event in events:
            if isinstance(event, TelemetrySampleAccepted):
                sid = event.sample.session_id
                assert sid not in self.final, "a sample was accepted after finalization"
                self.energy[sid] += event.sample.energy.wh
            elif isinstance(event, SessionFinalized):
                sid = event.session.session_id
                assert sid not in self.final, "a session was finalized twice"
                self.final[sid] = event.session
                assert event.session.energy_wh == self.energy[sid]
            elif isinstance(event, SessionStarted):
                assert event.session_id not in self.final

    def _latest(self, bike: str) -> StartSession | None:
        return self.starts[bike][-1] if self.starts[bike] else None

    @rule(bike=st.sampled_from(BIKES), kind=st.sampled_from(SessionKind))
    def start_a_session(self, bike, kind):
        command = start(bike, kind, at=self.now - timedelta(minutes=30))
        self.starts[bike].append(command)
        self._apply(command)

    @rule(bike=st.sampled_from(BIKES), wh=st.integers(0, 1000), skip=st.booleans())
    def send_a_sample(self, bike, wh, skip):
        begun = self._latest(bike)
        if begun is not None:
            self.seq[begun.session_id] += 2 if skip else 1
            self._apply(sample(begun, self.seq[begun.session_id], str(wh),
                               at=begun.occurred_at + timedelta(seconds=1)))  # fmt: skip

    @rule(bike=st.sampled_from(BIKES), extra=st.integers(0, 2))
    def end_the_session(self, bike, extra):
        begun = self._latest(bike)
        if begun is not None:
            self._apply(end(begun, self.seq[begun.session_id] + extra,
                            at=begun.occurred_at + timedelta(minutes=1)))  # fmt: skip

    @rule(seconds=st.sampled_from([1, 6, 700]))
    def let_time_pass(self, seconds):
        self.now += timedelta(seconds=seconds)
        self._record(self.fleet.expire(self.now))
        self.fleet.pop_events()

    @rule(data=st.data())
    def reload_a_bike_from_the_store(self, data):
        """Another instance wrote the bike: drop the cache entry, as a stale version would."""
        bike = data.draw(st.sampled_from(BIKES))
        if bike in self.fleet.bikes:
            known = self.fleet.bikes[bike]
            current = reloaded(known.current) if known.current else None
            self.fleet.load_bike(bike, current, list(known.waiting))
            if current is not None:
                self.fleet.sessions[current.session_id] = current

    @rule(data=st.data())
    def redeliver_an_accepted_message(self, data):
        if self.accepted:
            command = data.draw(st.sampled_from(self.accepted))
            before = dict(self.final)
            try:
                decision = self.fleet.handle(command, self.now)
            except DomainError as exc:
                raise AssertionError(f"a redelivery was rejected: {exc.reason}") from None
            events = self.fleet.pop_events()
            self._record(events)
            assert decision.outcome is Outcome.DUPLICATE
            assert all(isinstance(e, SessionFinalized) for e in events)  # only expiries
            assert {k: v for k, v in self.final.items() if k in before} == before

    @invariant()
    def a_bike_has_at_most_one_active_session(self):
        for bike in BIKES:
            active = [s for s in self.fleet.sessions.values()
                      if s.bike_id == bike and s.finalized is None]  # fmt: skip
            current = self.fleet.bikes[bike].current if bike in self.fleet.bikes else None
            assert [s.session_id for s in active] == ([current.session_id] if current else [])
            assert len(active) <= 1

    @invariant()
    def finalized_records_never_change(self):
        for sid, record in self.final.items():
            session = self.fleet.sessions.get(sid)
            if session is not None:
                assert session.finalized == record


FleetMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                          deadline=None)  # fmt: skip
test_the_fleet_keeps_its_rules_under_any_sequence = FleetMachine.TestCase


def test_a_telemetry_id_is_one_samples_whichever_session_another_message_claims_it_for():
    fleet = Fleet()
    now = T0 + timedelta(hours=1)
    first, second = start(bike_id()), start(bike_id())
    for begun in (first, second):
        fleet.load_bike(begun.bike_id, None)
        fleet.handle(begun, now)
    held = sample(first, 3, at=T0 + timedelta(seconds=9))
    claim = sample(second, 1, at=held.sample.emitted_at.at, telemetry_id=held.sample.telemetry_id)
    fleet.load_telemetry_owners(
        [(held.sample.telemetry_id, held.sample.emitted_at.at, first.session_id, 3)]
    )

    with pytest.raises(SessionIdConflict, match=f"already sample 3 of session {first.session_id}"):
        fleet.handle(claim, now)
    fleet.handle(held, now)  # its own owner: taken as that sample
    assert fleet.bikes[first.bike_id].current.telemetry_count == 1
