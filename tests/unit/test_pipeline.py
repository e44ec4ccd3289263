"""The pipeline's promises, with a fake store: acknowledge after commit, retry, isolate."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import aiomqtt

from daemon.metrics import Metrics
from daemon.mqtt.connection import Delivery
from daemon.pipeline import Pipeline
from domain.events import (
    SessionEndReceived,
    SessionFinalized,
    SessionStarted,
    TelemetrySampleAccepted,
)
from domain.session import Session, session_for
from domain.session_values import SessionEnd, SessionPolicy
from tests.builders import T0

PREFIX = "chargeflow/v1"
NOW = T0 + timedelta(hours=1)


class FakeAcks:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def ack(self, message: aiomqtt.Message) -> bool:
        self.log.append(f"ack {message.mid}")
        return True


class FakeStore:
    """Keeps what was committed (as the sessions it rebuilds on load); fails on demand."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.commits: list[list[object]] = []
        self.failures: list[BaseException] = []
        self.poison: set[uuid.UUID] = set()

    def _session(self, started: SessionStarted) -> Session:
        events = [e for c in self.commits for e in c]
        samples = [e.sample for e in events if isinstance(e, TelemetrySampleAccepted)
                   and e.sample.session_id == started.session_id]  # fmt: skip
        end = next((SessionEnd(e.ended_at, e.last_seq, e.received_at)
                    for e in events if isinstance(e, SessionEndReceived)
                    and e.session_id == started.session_id), None)  # fmt: skip
        final = next((e.session for e in events if isinstance(e, SessionFinalized)
                      and e.session.session_id == started.session_id), None)  # fmt: skip
        return session_for(started.kind)(
            session_id=started.session_id, bike_id=started.bike_id, party_id=started.party_id,
            started_at=started.started_at, last_heard_at=started.received_at, end=end,
            samples=samples, finalized=final,
        )  # fmt: skip

    async def load(self, bike_ids, session_ids):
        sessions = [self._session(e) for c in self.commits for e in c
                    if isinstance(e, SessionStarted)]  # fmt: skip
        active = {s.bike_id: s for s in sessions if s.finalized is None}
        named = [s for s in sessions if s.session_id in set(session_ids)
                 and s.bike_id not in bike_ids]  # fmt: skip
        return {b: active.get(b) for b in bike_ids}, named

    async def due_bikes(self, grace_cutoff, abandon_cutoff, loaded):
        return []

    async def commit(self, events, rejected):
        if self.failures:
            raise self.failures.pop(0)
        ids = {e.sample.telemetry_id for e in events if isinstance(e, TelemetrySampleAccepted)}
        if ids & self.poison:
            raise ValueError("this row cannot be written")
        self.commits.append(list(events))
        self.log.append(f"commit {len(events)} events")


class Bike:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.bike_id = f"bike-{uuid.uuid4().hex[:6]}"
        self.session_id = str(uuid.uuid4())
        self.mid = 0

    def delivery(self, suffix: str, payload: dict, at=NOW) -> Delivery:
        self.mid += 1
        message = aiomqtt.Message(f"{PREFIX}/bikes/{self.bike_id}/{suffix}",
                                  json.dumps(payload).encode(), qos=1, retain=False,
                                  mid=self.mid, properties=None)  # fmt: skip
        return Delivery(message, FakeAcks(self.log), at)  # type: ignore[arg-type]

    def start(self, at=NOW) -> Delivery:
        return self.delivery("lifecycle", {"event": "ride_started", "session_id": self.session_id,
                                           "rider_id": "r", "occurred_at": T0.isoformat()}, at)  # fmt: skip

    def sample(self, seq: int, at=NOW, telemetry_id: str | None = None) -> Delivery:
        return self.delivery("telemetry", {
            "telemetry_id": telemetry_id or str(uuid.uuid4()), "session_id": self.session_id,
            "seq": seq, "emitted_at": (T0 + timedelta(seconds=seq)).isoformat(),
            "energy_wh": "10"}, at)  # fmt: skip

    def end(self, last_seq: int, at=NOW) -> Delivery:
        return self.delivery("lifecycle", {"event": "ride_ended", "session_id": self.session_id,
                                           "occurred_at": (T0 + timedelta(minutes=5)).isoformat(),
                                           "last_seq": last_seq}, at)  # fmt: skip


def pipeline(store: FakeStore, clock=lambda: NOW) -> Pipeline:
    policy = SessionPolicy(finalize_grace=timedelta(seconds=5))
    return Pipeline(store, policy, Metrics(), prefix=PREFIX, clock=clock)  # type: ignore[arg-type]


async def test_a_batch_is_acknowledged_in_order_only_after_it_is_committed():
    log: list[str] = []
    bike = Bike(log)
    batch = [bike.start(), bike.sample(1), bike.end(1)]
    await pipeline(FakeStore(log)).process(batch)
    assert log == ["commit 4 events", "ack 1", "ack 2", "ack 3"]


async def test_a_batch_whose_commit_failed_is_decided_again_and_acknowledged_once():
    log: list[str] = []
    store = FakeStore(log)
    store.failures.append(ConnectionResetError("database went away"))
    bike = Bike(log)
    p = pipeline(store)
    await p.process([bike.start(), bike.sample(1)])
    assert log == ["commit 2 events", "ack 1", "ack 2"]
    assert p.metrics.database_up._value.get() == 1


async def test_a_message_that_cannot_be_written_is_isolated_and_dropped_alone():
    log: list[str] = []
    store = FakeStore(log)
    bike = Bike(log)
    poison = str(uuid.uuid4())
    store.poison.add(uuid.UUID(poison))
    p = pipeline(store)
    await p.process([bike.start(), bike.sample(1, telemetry_id=poison), bike.sample(2)])
    committed = [type(e).__name__ for commit in store.commits for e in commit]
    assert committed == ["SessionStarted", "TelemetrySampleAccepted"]
    assert sorted(line for line in log if line.startswith("ack")) == ["ack 1", "ack 2", "ack 3"]
    assert p.metrics.dropped.labels("commit_failed")._value.get() == 1


async def test_a_sample_that_arrived_inside_the_grace_period_counts_even_if_handled_later():
    log: list[str] = []
    store = FakeStore(log)
    bike = Bike(log)
    later = NOW + timedelta(minutes=10)  # the pipeline is far behind the wall clock
    p = pipeline(store, clock=lambda: later)
    await p.process([bike.start(at=NOW), bike.end(2, at=NOW)])
    p.deliver(bike.sample(1, at=NOW + timedelta(seconds=2)))
    await p.sweep()  # must not finalize: the waiting sample arrived inside the grace period
    await p.process(p._take())
    events = [e for commit in store.commits for e in commit]
    assert not any(isinstance(e, SessionFinalized) for e in events)
    await p.sweep()
    (final,) = [e for c in store.commits for e in c if isinstance(e, SessionFinalized)]
    assert final.session.telemetry_count == 1
    assert final.session.missing_samples == 1


async def test_a_rejection_is_committed_before_it_is_acknowledged():
    log: list[str] = []
    bike = Bike(log)
    store = FakeStore(log)
    p = pipeline(store)
    await p.process([bike.sample(1)])  # no session: unknown_session
    assert log == ["commit 0 events", "ack 1"]
    assert p.metrics.rejected.labels("unknown_session")._value.get() == 1
