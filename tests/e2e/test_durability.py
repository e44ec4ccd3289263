"""At least once end to end: a SIGKILL mid-stream, and a broker outage."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from daemon.devbroker import free_port
from daemon.simulate import FleetPlan, json_payload, messages
from tests.e2e.helpers import PREFIX, Bike, running_daemon, settings_for, wait_until
from tests.peers import mqtt_client

pytestmark = pytest.mark.e2e


def _spawn_daemon(
    database_url: str, mqtt_url: str, client_id: str, port: int, log_path, protocol: str = "5"
) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CHARGEFLOW_")},
        "CHARGEFLOW_MQTT_URL": mqtt_url,
        "CHARGEFLOW_DATABASE_URL": database_url,
        "CHARGEFLOW_CLIENT_ID": client_id,
        "CHARGEFLOW_HTTP_PORT": str(port),
        "CHARGEFLOW_HTTP_HOST": "127.0.0.1",
        "CHARGEFLOW_MAX_BATCH": "200",
        "CHARGEFLOW_LOG_FORMAT": "json",
        "CHARGEFLOW_MQTT_PROTOCOL": protocol,
    }
    out = open(log_path, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "daemon", "run"], env=env, stdout=out, stderr=out
    )


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


async def _wait_ready(proc: subprocess.Popen[bytes], port: int) -> None:
    async def check() -> bool:
        assert proc.poll() is None, "the daemon exited"
        return await asyncio.to_thread(_ready, port)

    await wait_until(check, timeout=30, what="daemon ready")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(
    database_url, broker, pool, tmp_path, protocol
):
    plan = FleetPlan(
        bikes=20,
        sessions_per_bike=3,
        samples_per_session=48,
        prefix=PREFIX,
        seed=random.randrange(2**32),
    )
    start = datetime.now(UTC) - timedelta(hours=1)
    stream = list(messages(plan, start))
    expected: dict[str, Decimal] = defaultdict(Decimal)
    for topic, payload in stream:
        if topic.endswith("/telemetry"):
            expected[str(payload["session_id"])] += Decimal(str(payload["energy_wh"]))
    run = stream[0][0].split("/")[3].rsplit("-", 1)[0]
    client_id = f"cf-crash-{uuid.uuid4().hex[:8]}"
    port = free_port()
    log_path = tmp_path / "daemon.log"
    spawn = functools.partial(
        _spawn_daemon, database_url, broker.daemon_url, client_id, port, log_path, protocol
    )
    daemon = spawn()
    try:
        await _wait_ready(daemon, port)

        async def stored() -> int:
            return await pool.fetchval(
                "SELECT count(*) FROM telemetry WHERE bike_id LIKE $1", f"{run}-%"
            )

        async with mqtt_client(broker.fleet_url) as publisher:
            publisher.pending_calls_threshold = 10_000
            killed = False
            for i in range(0, len(stream), 100):
                await asyncio.gather(
                    *(publisher.publish(t, json_payload(p), qos=1) for t, p in stream[i : i + 100])
                )
                if not killed and await stored() >= 600:
                    daemon.send_signal(signal.SIGKILL)
                    daemon.wait()
                    killed = True
            if not killed:  # a slow machine: the daemon lags the publisher; kill it now
                await wait_until(stored, what="some samples stored")
                daemon.send_signal(signal.SIGKILL)
                daemon.wait()
        # The broker queued the rest for the daemon's persistent session.
        daemon = spawn()
        await _wait_ready(daemon, port)

        async def all_finalized() -> bool:
            count = await pool.fetchval(
                "SELECT count(*) FROM sessions WHERE bike_id LIKE $1 AND state = 'finalized'",
                f"{run}-%",
            )
            return count == len(expected)

        await wait_until(all_finalized, timeout=60, what="every session finalized")
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)

    rows = await pool.fetch(
        "SELECT session_id::text AS sid, energy_wh, telemetry_count, missing_samples"
        " FROM sessions WHERE bike_id LIKE $1",
        f"{run}-%",
    )
    assert {r["sid"]: r["energy_wh"] for r in rows} == expected
    assert {(r["telemetry_count"], r["missing_samples"]) for r in rows} == {(48, 0)}
    samples = await pool.fetchrow(
        "SELECT count(*) AS n, count(DISTINCT telemetry_id) AS ids FROM telemetry"
        " WHERE bike_id LIKE $1",
        f"{run}-%",
    )
    assert samples["n"] == samples["ids"] == len(expected) * 48
    outbox = await pool.fetch(
        "SELECT event, count(*) AS n FROM outbox WHERE topic LIKE $1 GROUP BY event",
        f"{PREFIX}/bikes/{run}-%",
    )
    assert {r["event"]: r["n"] for r in outbox} == {
        "session_finalized": len(expected),
        "billing": len(expected),
    }
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM rejected_messages WHERE bike_id LIKE $1", f"{run}-%"
        )
        == 0
    )


async def test_finalized_events_wait_in_the_outbox_while_the_broker_is_down(
    database_url, own_broker, pool
):
    settings = settings_for(database_url, own_broker.daemon_url, finalize_grace_s=1.0)
    listener_id = f"listener-{uuid.uuid4().hex[:8]}"
    async with mqtt_client(own_broker.fleet_url, listener_id, session_expiry_s=600) as listener:
        await listener.subscribe(f"{PREFIX}/bikes/+/sessions/finalized", qos=1)
        await listener.subscribe(f"{PREFIX}/bikes/+/billing", qos=1)
    async with running_daemon(settings) as daemon:
        async with mqtt_client(own_broker.fleet_url) as client:
            bike = Bike(client)
            session_id = await bike.start()
            await bike.sample(session_id, 1, "1500")
            await bike.end(session_id, 2)  # sample 2 never comes: finalized when grace ends
        await wait_until(
            lambda: pool.fetchval(
                "SELECT last_seq IS NOT NULL FROM sessions WHERE session_id = $1",
                uuid.UUID(session_id),
            ),
            what="end stored",
        )

        own_broker.stop()
        topic = f"{PREFIX}/bikes/{bike.bike_id}/%"
        await wait_until(
            lambda: pool.fetchval(
                "SELECT count(*) = 2 FROM outbox WHERE topic LIKE $1 AND published_at IS NULL",
                topic,
            ),
            what="finalized and billing waiting in the outbox",
        )
        assert daemon.ready()["mqtt"] is False
        await asyncio.sleep(1)
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM outbox WHERE topic LIKE $1 AND published_at IS NULL", topic
            )
            == 2
        )

        own_broker.start()
        await wait_until(
            lambda: pool.fetchval(
                "SELECT bool_and(published_at IS NOT NULL) FROM outbox WHERE topic LIKE $1", topic
            ),
            timeout=40,
            what="outbox published after the broker returned",
        )

    received: dict[str, dict] = {}
    async with mqtt_client(own_broker.fleet_url, listener_id, session_expiry_s=600) as listener:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                async for message in listener.messages:
                    received[message.topic.value.rsplit("/", 1)[-1]] = json.loads(message.payload)
                    if len(received) == 2:
                        break
    assert received["finalized"]["session_id"] == session_id
    assert received["finalized"]["missing_samples"] == 1
    assert received["billing"]["amount"] == "0.45"  # 1.5 kWh x 0.30 EUR


async def test_sigterm_commits_acknowledges_and_disconnects_cleanly(
    database_url, broker, pool, tmp_path
):
    port = free_port()
    log_path = tmp_path / "daemon.log"
    client_id = f"cf-term-{uuid.uuid4().hex[:8]}"
    daemon = _spawn_daemon(database_url, broker.daemon_url, client_id, port, log_path)
    try:
        await _wait_ready(daemon, port)
        async with mqtt_client(broker.fleet_url) as client:
            bike = Bike(client)
            session_id = await bike.start()
            for seq in range(1, 201):
                await bike.sample(session_id, seq, "1")
            await bike.end(session_id, 200)
        daemon.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert events.index("shutting down: finishing the batch in hand") < events.index("stopped")
    # Whatever was committed before the exit was acknowledged; what was not stays queued
    # in the broker for this client id. A restart finishes the session either way.
    daemon = _spawn_daemon(database_url, broker.daemon_url, client_id, port, log_path)
    try:
        await _wait_ready(daemon, port)
        await wait_until(
            lambda: pool.fetchval(
                "SELECT state = 'finalized' AND telemetry_count = 200 FROM sessions"
                " WHERE session_id = $1",
                uuid.UUID(session_id),
            ),
            what="session finalized",
        )
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
