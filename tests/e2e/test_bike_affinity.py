"""Bike-affine instances (CHARGEFLOW_PARTITION): each bike with one home, plain persistent
subscriptions that survive a broker restart, and layouts that cost speed, never a total."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import paho.mqtt.client as paho
import pytest

from daemon.app import Daemon
from daemon.devbroker import free_port, start_broker
from daemon.simulate import json_payload
from tests.conftest import FLEET_USER, Broker
from tests.e2e.helpers import PREFIX, running_daemon, settings_for, wait_until
from tests.e2e.test_workers import _ready, _two_free_ports

pytestmark = pytest.mark.e2e

SAMPLES = 40  # per session; each bike rides, then charges


class StreamPublisher:
    """A fleet's gateway: paho on its own thread, QoS 1, publishing at a steady rate. While the
    broker is away paho keeps what it could not send and sends it again once it is back."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"cf-gateway-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv311,
            clean_session=False,
        )
        self.client.username_pw_set(*FLEET_USER)
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        self.infos: list[paho.MQTTMessageInfo] = []

    def publish(self, messages: list[tuple[str, bytes]], rate: float) -> None:
        began = time.perf_counter()
        for i, (topic, payload) in enumerate(messages):
            delay = began + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.infos.append(self.client.publish(topic, payload, qos=1))

    def wait_all(self, timeout: float = 60) -> None:
        """Until the broker has acknowledged every message (``is_published`` would raise for
        one published while the broker was away, although paho sends it once it is back)."""
        deadline = time.monotonic() + timeout
        while not all(info._published for info in self.infos):
            assert time.monotonic() < deadline, "the broker never took every message"
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Fleet:
    """Bikes that ride, then charge, with known energy totals."""

    def __init__(self, bikes: int) -> None:
        run = uuid.uuid4().hex[:6]
        self.bikes = [f"aff-{run}-{b:03d}" for b in range(bikes)]
        self.energy: dict[str, Decimal] = {}
        self.t0 = datetime.now(UTC) - timedelta(minutes=30)

    def messages(self) -> list[tuple[str, bytes]]:
        """Every bike's two sessions, interleaved across bikes as a live fleet publishes."""
        per_bike = [self._bike(b) for b in self.bikes]
        return [m for step in zip(*per_bike, strict=True) for m in step]

    def _bike(self, bike: str) -> list[tuple[str, bytes]]:
        out = []
        for n, kind in enumerate(("ride", "charging")):
            session = str(uuid.uuid4())
            start = self.t0 + timedelta(minutes=20 * n)
            party = {"rider_id": "rider-1"} if kind == "ride" else {"station_id": "station-1"}
            out.append(("lifecycle", {"event": f"{kind}_started", "session_id": session,
                                      **party, "occurred_at": start.isoformat()}))  # fmt: skip
            for seq in range(1, SAMPLES + 1):
                out.append(("telemetry", {
                    "telemetry_id": str(uuid.uuid4()), "session_id": session, "seq": seq,
                    "emitted_at": (start + timedelta(seconds=seq)).isoformat(),
                    "energy_wh": Decimal(f"{seq}.5")}))  # fmt: skip
            out.append(("lifecycle", {"event": f"{kind}_ended", "session_id": session,
                                      "occurred_at": (start + timedelta(minutes=10)).isoformat(),
                                      "last_seq": SAMPLES}))  # fmt: skip
            self.energy[session] = sum(Decimal(f"{seq}.5") for seq in range(1, SAMPLES + 1))
        return [(f"{PREFIX}/bikes/{bike}/{suffix}", json_payload(body)) for suffix, body in out]

    async def assert_exact(self, pool: asyncpg.Pool, timeout: float = 120) -> None:
        """Every session finalized once with its exact total, every sample stored once,
        nothing rejected."""
        ids = [uuid.UUID(s) for s in self.energy]

        async def finalized() -> bool:
            n = await pool.fetchval(
                "SELECT count(*) FROM sessions WHERE session_id = ANY($1) AND state = 'finalized'",
                ids,
            )
            return n == len(ids)

        await wait_until(finalized, timeout=timeout, what="every session finalized")
        rows = await pool.fetch(
            "SELECT session_id, energy_wh, telemetry_count, missing_samples, end_reason,"
            " (SELECT count(*) FROM telemetry t WHERE t.session_id = s.session_id) AS stored"
            " FROM sessions s WHERE session_id = ANY($1)",
            ids,
        )
        wrong = [
            dict(r)
            for r in rows
            if (r["energy_wh"], r["telemetry_count"], r["stored"], r["missing_samples"])
            != (self.energy[str(r["session_id"])], SAMPLES, SAMPLES, 0)
            or r["end_reason"] != "ended"
        ]
        assert wrong == [], f"{len(wrong)} of {len(rows)} sessions not exact: {wrong[:3]}"
        rejected = await pool.fetch(
            "SELECT reason, detail, topic, convert_from(payload, 'UTF8') AS payload, received_at"
            " FROM rejected_messages WHERE bike_id = ANY($1) ORDER BY received_at",
            self.bikes,
        )
        assert [dict(r) for r in rejected] == []


@pytest.fixture
async def no_claims(pool: asyncpg.Pool) -> None:
    """Earlier tests' instances are gone: their claims would still count for the lease."""
    await pool.execute("DELETE FROM instance_partitions")


async def _restart(broker: Broker, after_s: float, burst: list[tuple[str, bytes]]) -> None:
    """Stop the broker mid-stream (SIGTERM: Mosquitto saves its store), and bring it back on
    the same store. Before the daemons can reach it again, ``burst`` is published to it on a
    side port: messages the broker takes while no daemon has subscribed again, which it must
    queue for them (Mosquitto keeps plain subscriptions of persistent sessions, not shared
    ones)."""
    await asyncio.sleep(after_s)
    await asyncio.to_thread(broker.stop)
    await asyncio.sleep(1.0)
    side = free_port()
    proc = await asyncio.to_thread(start_broker, side, broker.data_dir)
    try:
        publisher = StreamPublisher(side)
        await asyncio.to_thread(publisher.publish, burst, 5000.0)
        await asyncio.to_thread(publisher.wait_all)
        publisher.close()
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(broker.start)


async def _stream_through_a_restart(broker: Broker, fleet: Fleet) -> None:
    messages = fleet.messages()
    rate = 1500.0
    third = len(messages) // 3
    burst = messages[third : third + 500]
    stream = messages[:third] + messages[third + 500 :]
    publisher = StreamPublisher(broker.port)
    try:
        publishing = asyncio.to_thread(publisher.publish, stream, rate)
        await asyncio.gather(publishing, _restart(broker, third / rate, burst))
        await asyncio.to_thread(publisher.wait_all, 90)
    finally:
        publisher.close()


@contextlib.asynccontextmanager
async def instances(
    database_url: str, broker: Broker, *partitions: str, base: str | None = None
) -> AsyncIterator[list[Daemon]]:
    """In-process instances with these partitions, client ids ``{base}-{i}``."""
    base = base or f"cf-aff-{uuid.uuid4().hex[:6]}"
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                running_daemon(
                    settings_for(
                        database_url,
                        broker.daemon_url,
                        partition=p,
                        client_id=f"{base}-{i}",
                        finalize_grace_s=30.0,
                    )
                )
            )
            for i, p in enumerate(partitions)
        ]


def _count(daemons: list[Daemon], counter: str) -> float:
    return sum(
        getattr(d.metrics, counter).labels(kind)._value.get()
        for d in daemons
        for kind in ("lifecycle", "telemetry")
    )


async def test_two_instances_lose_nothing_when_the_broker_restarts_mid_stream(
    database_url, own_broker, pool, no_claims
):
    fleet = Fleet(24)
    async with instances(database_url, own_broker, "0/2", "1/2") as daemons:
        await _stream_through_a_restart(own_broker, fleet)
        await fleet.assert_exact(pool)
        # Each took its own bikes and left the other's alone.
        assert all(d.metrics.not_owned.labels("telemetry")._value.get() > 0 for d in daemons)
        assert all(d.metrics.accepted.labels("telemetry")._value.get() > 0 for d in daemons)


async def test_chargeflow_run_workers_loses_nothing_when_the_broker_restarts_mid_stream(
    database_url, own_broker, pool, no_claims
):
    base = _two_free_ports()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEFLOW_")}
    env = {**clean, "CHARGEFLOW_MQTT_URL": own_broker.daemon_url,
           "CHARGEFLOW_DATABASE_URL": database_url, "CHARGEFLOW_HTTP_PORT": str(base),
           "CHARGEFLOW_HTTP_HOST": "127.0.0.1", "CHARGEFLOW_FINALIZE_GRACE_S": "30",
           "CHARGEFLOW_CLIENT_ID": f"cf-workers-{uuid.uuid4().hex[:6]}",
           "CHARGEFLOW_LOG_LEVEL": "warning"}  # fmt: skip
    proc = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, "-m", "daemon", "run", "--workers", "2"], env=env
    )
    try:
        for port in (base, base + 1):
            await wait_until(lambda p=port: _ready(p), timeout=30, what=f"worker {port} ready")
        fleet = Fleet(24)
        await _stream_through_a_restart(own_broker, fleet)
        await fleet.assert_exact(pool)
        claims = await pool.fetch(
            "SELECT part_index, part_count FROM instance_partitions WHERE client_id LIKE $1"
            " ORDER BY part_index",
            env["CHARGEFLOW_CLIENT_ID"] + "-%",
        )
        assert [(r["part_index"], r["part_count"]) for r in claims] == [(0, 2), (1, 2)]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
    assert code == 0


async def test_two_instances_that_claim_the_same_share_still_take_every_bike_exactly(
    database_url, broker, pool, no_claims
):
    fleet = Fleet(16)
    async with instances(database_url, broker, "0/2", "0/2") as daemons:
        publisher = StreamPublisher(broker.port)
        try:
            await asyncio.to_thread(publisher.publish, fleet.messages(), 2000.0)
            await asyncio.to_thread(publisher.wait_all)
        finally:
            publisher.close()
        await fleet.assert_exact(pool)
        # Nobody claims 1/2: both take those bikes too, and the database keeps them exact.
        assert _count(daemons, "not_owned") == 0
        assert _count(daemons, "duplicates") > 0


async def test_changing_the_number_of_instances_between_restarts_keeps_every_total(
    database_url, broker, pool, no_claims
):
    """Two instances stop, the fleet goes on publishing, three come back (two of them with the
    old client ids and a new share): what was queued under the old layout is still taken."""
    fleet = Fleet(18)
    messages = fleet.messages()
    third = len(messages) // 3
    base = f"cf-resize-{uuid.uuid4().hex[:6]}"

    publisher = StreamPublisher(broker.port)
    try:
        async with instances(database_url, broker, "0/2", "1/2", base=base):
            await asyncio.to_thread(publisher.publish, messages[:third], 2000.0)
            await asyncio.to_thread(publisher.wait_all)
        # Nobody is running: the broker queues for the two persistent sessions.
        await asyncio.to_thread(publisher.publish, messages[third : 2 * third], 2000.0)
        await asyncio.to_thread(publisher.wait_all)
        async with instances(database_url, broker, "0/3", "1/3", "2/3", base=base) as daemons:
            await asyncio.to_thread(publisher.publish, messages[2 * third :], 2000.0)
            await asyncio.to_thread(publisher.wait_all)
            await fleet.assert_exact(pool)
            # Once the backlog is in, the old claims are settled and each takes its third.
            await wait_until(
                lambda: not any(_still_takes_an_old_claim(d) for d in daemons),
                timeout=20,
                what="the change of layout settled",
            )
    finally:
        publisher.close()
    rows = await pool.fetch(
        "SELECT client_id, part_index, part_count, previous FROM instance_partitions"
        " WHERE client_id LIKE $1 ORDER BY client_id",
        base + "-%",
    )
    assert [(r["part_index"], r["part_count"], r["previous"]) for r in rows] == [
        (0, 3, []),
        (1, 3, []),
        (2, 3, []),
    ]


def _still_takes_an_old_claim(daemon: Daemon) -> bool:
    assert daemon.registry is not None
    return bool(daemon.registry.previous)
