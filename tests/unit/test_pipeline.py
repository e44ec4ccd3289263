"""The pipeline's promises, with a fake unit of work: acknowledge after commit, retry, bisect."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from datetime import timedelta

import asyncpg

from daemon.metrics import Metrics
from daemon.mqtt.delivery import Delivery, ReadGate
from daemon.mqtt.schemas import Rejection
from daemon.service.arrival import Settled
from daemon.service.pipeline import Pipeline, PipelineConfig
from domain.errors import DomainError
from domain.events import SessionFinalized, TelemetrySampleAccepted
from domain.fleet import Fleet
from domain.session_values import SessionPolicy
from tests.builders import T0
from tests.unit.harness import FleetHarness

PREFIX = "chargeflow/v1"
NOW = T0 + timedelta(hours=1)


class FakeAcks:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def ack(self, message: Delivery) -> bool:
        self.log.append(f"ack {message.mid}")
        return True


class FakeIngestion:
    """The pipeline's port, faked over the real domain: every batch is decided by a fleet
    rebuilt from what was committed before (a replay log), so an uncommitted batch leaves no
    trace, as a rolled-back transaction does. Fails on demand."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.policy = SessionPolicy(finalize_grace=timedelta(seconds=5))
        self.replay: list[tuple[str, object, object]] = []
        self.commits: list[list[object]] = []
        self.kept: list[str] = []
        self.failures: list[BaseException] = []
        self.poison: set[uuid.UUID] = set()
        self.fleet = Fleet(self.policy)

    def reset(self) -> None:
        self.log.append("reset")

    def _rebuilt(self) -> FleetHarness:
        harness = FleetHarness(Fleet(self.policy))
        for what, item, now in self.replay:
            if what == "expire":
                harness.expire(now)
            else:
                with contextlib.suppress(DomainError):
                    harness.handle(item, now)
        harness.pop_events()
        return harness

    async def commit_batch(self, arrivals):
        if self.failures:
            raise self.failures.pop(0)
        harness = self._rebuilt()
        settled = []
        for a in arrivals:
            if a.inbound.rejection is not None:
                settled.append(Settled(rejection=a.inbound.rejection))
                continue
            try:
                outcome = harness.handle(a.inbound.command, a.received_at).outcome
                settled.append(Settled(outcome=outcome))
            except DomainError as exc:
                settled.append(Settled(rejection=Rejection(a.topic, None, exc.reason, "")))
        events = harness.pop_events()
        ids = {e.sample.telemetry_id for e in events if isinstance(e, TelemetrySampleAccepted)}
        if ids & self.poison:
            raise ValueError("this row cannot be written")
        self.replay += [("handle", a.inbound.command, a.received_at) for a in arrivals
                        if a.inbound.command is not None]  # fmt: skip
        self.commits.append(events)
        self.log.append(f"commit {len(events)} events")
        return settled, events

    async def commit_rejections(self, arrivals, why):
        self.kept += [a.topic for a in arrivals]
        self.log.append(f"kept {len(arrivals)} as rejections")

    async def due_bikes(self, grace_cutoff, abandon_cutoff=None):
        return ["any"]

    def active_count(self) -> int:
        return self.fleet.active_count()

    # Pipelined commits are tested on a real PostgreSQL (tests/integration/test_pipelined.py).
    def decide_ahead(self, arrivals):
        raise AssertionError("these tests run the pipeline one batch at a time")

    begin_batch = finish_batch = abandon_batch = begins_beside = writes_beside = decide_ahead

    async def expire(self, bike_ids, now):
        harness = self._rebuilt()
        events = harness.expire(now)
        self.replay.append(("expire", None, now))
        self.commits.append(events)
        return events


class Bike:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.bike_id = f"bike-{uuid.uuid4().hex[:6]}"
        self.session_id = str(uuid.uuid4())
        self.mid = 0

    def delivery(self, suffix: str, payload: dict, at=NOW) -> Delivery:
        self.mid += 1
        return Delivery(f"{PREFIX}/bikes/{self.bike_id}/{suffix}", json.dumps(payload).encode(),
                        self.mid, 1, FakeAcks(self.log), at)  # fmt: skip

    def start(self, at=NOW) -> Delivery:
        return self.delivery("lifecycle", {"event": "ride_started", "session_id": self.session_id,
                                           "rider_id": "r", "occurred_at": T0.isoformat()}, at)  # fmt: skip

    def sample(self, seq: int, at=NOW, telemetry_id: str | None = None) -> Delivery:
        return self.delivery("telemetry", {
            "telemetry_id": telemetry_id or str(uuid.uuid4()), "session_id": self.session_id,
            "seq": seq, "emitted_at": (T0 + timedelta(seconds=seq)).isoformat(),
            "energy_wh": 10}, at)  # fmt: skip

    def end(self, last_seq: int, at=NOW) -> Delivery:
        return self.delivery("lifecycle", {"event": "ride_ended", "session_id": self.session_id,
                                           "occurred_at": (T0 + timedelta(minutes=5)).isoformat(),
                                           "last_seq": last_seq}, at)  # fmt: skip


def pipeline(ingestion: FakeIngestion, clock=lambda: NOW) -> Pipeline:
    return Pipeline(ingestion, Metrics(), PipelineConfig(PREFIX), clock=clock)


async def test_a_batch_is_acknowledged_in_order_only_after_it_is_committed():
    log: list[str] = []
    bike = Bike(log)
    batch = [bike.start(), bike.sample(1), bike.end(1)]
    p = pipeline(FakeIngestion(log))
    await p.process(p.read(batch))
    assert log == ["commit 4 events", "ack 1", "ack 2", "ack 3"]


async def test_an_outbound_message_heard_back_is_acknowledged_in_order_and_nothing_else():
    """With one filter for a bike's topics (CHARGEFLOW_SUBSCRIPTION=one) the daemon hears the
    bills and rejections it (or another instance) publishes: not inbound messages."""
    log: list[str] = []
    bike = Bike(log)
    p = pipeline(FakeIngestion(log))
    bill = bike.delivery("billing", {"amount": "0.37"})
    batch = [bike.start(), bill, bike.sample(1)]
    for d in batch:
        p.deliver(d)
    await p.process(p.next_batch())
    assert log == ["commit 2 events", *(f"ack {d.mid}" for d in batch)]
    assert p.metrics.received.labels("unknown")._value.get() == 0
    assert p.metrics.rejected.labels("unknown_topic")._value.get() == 0


async def test_a_batch_whose_commit_failed_is_decided_again_and_acknowledged_once():
    log: list[str] = []
    store = FakeIngestion(log)
    store.failures.append(ConnectionResetError("database went away"))
    bike = Bike(log)
    p = pipeline(store)
    await p.process(p.read([bike.start(), bike.sample(1)]))
    assert log == ["reset", "commit 2 events", "ack 1", "ack 2"]
    assert p.metrics.database_up._value.get() == 1


async def test_a_message_the_database_refuses_is_found_by_bisection_and_kept_as_a_rejection():
    log: list[str] = []
    store = FakeIngestion(log)
    bike = Bike(log)
    poison = str(uuid.uuid4())
    store.poison.add(uuid.UUID(poison))
    p = pipeline(store)
    batch = [bike.start(), *(bike.sample(seq) for seq in range(1, 8))]
    batch[3] = bike.sample(3, telemetry_id=poison)
    await p.process(p.read(batch))
    committed = [type(e).__name__ for commit in store.commits for e in commit]
    assert committed == ["SessionStarted"] + ["TelemetrySampleAccepted"] * 6
    assert [line for line in log if line.startswith("ack")] == [f"ack {d.mid}" for d in batch]
    assert store.kept == [batch[3].topic]
    assert p.metrics.rejected.labels("schema_violation")._value.get() == 1
    assert p.metrics.dropped.labels("commit_failed")._value.get() == 0
    # Two tries of the whole batch, then halves and quarters: a few commits, not one a message.
    assert sum(1 for line in log if line.startswith("commit")) <= 6


async def test_a_sample_that_arrived_inside_the_grace_period_counts_even_if_handled_later():
    log: list[str] = []
    store = FakeIngestion(log)
    bike = Bike(log)
    later = NOW + timedelta(minutes=10)  # the pipeline is far behind the wall clock
    p = pipeline(store, clock=lambda: later)
    await p.process(p.read([bike.start(at=NOW), bike.end(2, at=NOW)]))
    p.deliver(bike.sample(1, at=NOW + timedelta(seconds=2)))
    await p.sweep()  # must not finalize: the waiting sample arrived inside the grace period
    await p.process(p.next_batch())
    events = [e for commit in store.commits for e in commit]
    assert not any(isinstance(e, SessionFinalized) for e in events)
    await p.sweep()
    (final,) = [e for c in store.commits for e in c if isinstance(e, SessionFinalized)]
    assert final.session.telemetry_count == 1
    assert final.session.missing_samples == 1


async def test_a_rejection_is_committed_before_it_is_acknowledged():
    log: list[str] = []
    bike = Bike(log)
    store = FakeIngestion(log)
    p = pipeline(store)
    await p.process(p.read([bike.start(), bike.sample(1), bike.end(0)]))  # last_seq below seq 1
    assert log == ["commit 2 events", "ack 1", "ack 2", "ack 3"]
    assert p.metrics.rejected.labels("seq_beyond_end")._value.get() == 1


class LoggedReader:
    """What follows the gate in the daemon (the MQTT link), logging what it is told."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def pause_reading(self) -> None:
        self.log.append("pause")

    def resume_reading(self) -> None:
        self.log.append("resume")


def reader_logged_to(log: list[str]) -> ReadGate:
    gate = ReadGate()
    gate.follow(LoggedReader(log))
    return gate


async def test_intake_pauses_when_the_inbox_is_full_and_resumes_once_half_is_taken():
    log: list[str] = []
    bike = Bike(log)
    p = Pipeline(FakeIngestion(log), Metrics(), PipelineConfig(PREFIX, max_inbox=4, max_batch=2),
                 gate=reader_logged_to(log))  # fmt: skip
    for seq in range(1, 6):
        p.deliver(bike.sample(seq))
    assert log == ["pause"]
    assert p.metrics.intake_paused._value.get() == 1
    p.next_batch()  # 3 left: above half of 4
    assert log == ["pause"]
    p.next_batch()  # 1 left
    assert log == ["pause", "resume"]
    assert p.metrics.intake_paused._value.get() == 0


def test_the_gate_tells_its_reader_only_of_changes_and_a_late_reader_of_its_state():
    log: list[str] = []
    gate = reader_logged_to(log)
    gate.open()
    gate.close()
    gate.close()
    assert log == ["pause"]
    late: list[str] = []
    gate.follow(LoggedReader(late))  # a link built while the gate is closed
    assert late == ["pause"]
    gate.open()
    assert (log, late) == (["pause", "resume"], ["pause", "resume"])


async def test_intake_pauses_on_payload_bytes_too_so_large_garbage_cannot_fill_memory():
    log: list[str] = []
    bike = Bike(log)
    p = Pipeline(FakeIngestion(log), Metrics(),
                 PipelineConfig(PREFIX, max_inbox=1000, max_batch=1, max_inbox_bytes=3 * 1024),
                 gate=reader_logged_to(log))  # fmt: skip
    big = bike.sample(1)
    big = dataclasses.replace(big, payload=b"x" * 1024)
    for _ in range(3):
        p.deliver(big)
    assert log == ["pause"]  # 3 messages, far below 1000, but 3 KiB
    p.next_batch()
    assert log == ["pause"]  # 2 KiB left: above half
    p.next_batch()
    assert log == ["pause", "resume"]


async def test_a_batch_that_met_another_writer_is_decided_again_not_taken_apart():
    log: list[str] = []
    store = FakeIngestion(log)
    store.failures += [asyncpg.DeadlockDetectedError("deadlock")] * 3
    bike = Bike(log)
    p = pipeline(store)
    await p.process(p.read([bike.start(), bike.sample(1)]))
    assert log == ["reset", "reset", "reset", "commit 2 events", "ack 1", "ack 2"]
    assert store.kept == []


async def test_a_message_decoding_fails_on_is_kept_as_a_rejection_not_dropped(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the edge")

    monkeypatch.setattr("daemon.service.pipeline.decode", broken)
    log: list[str] = []
    bike = Bike(log)
    p = pipeline(FakeIngestion(log))
    delivery = bike.sample(1)

    await p.process(p.read([delivery]))

    assert log[-1] == f"ack {delivery.mid}"
    assert p.metrics.rejected.labels("schema_violation")._value.get() == 1
    assert (
        sum(p.metrics.dropped.labels(r)._value.get() for r in ("internal_error", "commit_failed"))
        == 0
    )


async def test_the_messages_of_bikes_another_instance_takes_are_acknowledged_in_order_unread():
    log: list[str] = []
    mine, theirs = Bike(log), Bike(log)
    store = FakeIngestion(log)
    p = Pipeline(store, Metrics(), PipelineConfig(PREFIX), takes=lambda b: b == mine.bike_id)
    foreign = theirs.delivery("telemetry", {"not": "even valid"})
    batch = [mine.start(), foreign, mine.sample(1)]
    for delivery in batch:
        p.deliver(delivery)
    await p.process(p.next_batch())
    # One commit for the owned two (start + sample: two events), every PUBACK in arrival order.
    assert log == ["commit 2 events", "ack 1", "ack 1", "ack 2"]
    assert p.metrics.not_owned.labels("telemetry")._value.get() == 1
    assert p.metrics.received.labels("telemetry")._value.get() == 1
    assert p.metrics.rejected.labels("schema_violation")._value.get() == 0


async def test_a_batch_of_other_instances_bikes_alone_touches_no_database():
    log: list[str] = []
    theirs = Bike(log)
    store = FakeIngestion(log)
    store.failures.append(ConnectionResetError("a commit was attempted"))
    p = Pipeline(store, Metrics(), PipelineConfig(PREFIX), takes=lambda b: False)
    await p.process(p.read([theirs.start(), theirs.sample(1)]))
    assert log == ["ack 1", "ack 2"]


async def test_a_sweep_settles_only_the_bikes_this_instance_takes():
    log: list[str] = []
    store = FakeIngestion(log)
    expired: list[list[str]] = []

    async def expire(bike_ids, now):
        expired.append(list(bike_ids))
        return []

    store.expire = expire  # type: ignore[method-assign]
    p = Pipeline(store, Metrics(), PipelineConfig(PREFIX), takes=lambda b: False)
    await p.sweep()
    assert expired == []
    p.intake.takes = p.expiry.takes = lambda b: True
    await p.sweep()
    assert expired == [["any"]]


async def test_batches_are_committed_while_the_store_is_asked_which_bikes_are_due():
    """The sweep's question (a scan of every Active session when it looks for dark ones) is
    asked in the background: the batches that arrive meanwhile are committed and
    acknowledged without waiting for its answer, and the bikes it names are expired once it
    comes, between two batches."""
    import asyncio

    log: list[str] = []
    store = FakeIngestion(log)
    answer: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    expired: list[list[str]] = []

    async def due_bikes(grace_cutoff, abandon_cutoff=None):
        log.append("asked")
        return await answer

    async def expire(bike_ids, now):
        expired.append(list(bike_ids))
        log.append("expired")
        return []

    store.due_bikes = due_bikes  # type: ignore[method-assign]
    store.expire = expire  # type: ignore[method-assign]
    p = Pipeline(store, Metrics(), PipelineConfig(PREFIX, sweep_every_s=0.01))
    running = asyncio.create_task(p.run())
    for _ in range(200):
        if "asked" in log:
            break
        await asyncio.sleep(0.005)
    bike = Bike(log)
    for d in (bike.start(), bike.sample(1)):
        p.deliver(d)
    for _ in range(200):
        if "ack 2" in log:
            break
        await asyncio.sleep(0.005)
    assert log[log.index("asked") :] == ["asked", "commit 2 events", "ack 1", "ack 2"]
    assert expired == []
    answer.set_result(["bike-due"])
    for _ in range(200):
        if expired:
            break
        await asyncio.sleep(0.005)
    p.stop()
    await asyncio.wait_for(running, timeout=2)
    assert expired == [["bike-due"]]
