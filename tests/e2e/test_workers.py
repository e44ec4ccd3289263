"""`chargeflow run --workers 2`: two processes, each bike with one home, exactly what one would do."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from decimal import Decimal

import pytest

from daemon.devbroker import free_port
from tests.e2e.helpers import Bike, readyz, sees_the_other_claims, wait_until

pytestmark = pytest.mark.e2e


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def test_two_workers_share_the_load_and_finalize_every_session_once(
    broker, database_url, pool, bike, outbound
):
    base = _two_free_ports()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEFLOW_")}
    env = {**clean, "CHARGEFLOW_MQTT_URL": broker.daemon_url,
           "CHARGEFLOW_DATABASE_URL": database_url, "CHARGEFLOW_HTTP_PORT": str(base),
           "CHARGEFLOW_HTTP_HOST": "127.0.0.1", "CHARGEFLOW_FINALIZE_GRACE_S": "2",
           "CHARGEFLOW_CLIENT_ID": f"cf-workers-{uuid.uuid4().hex[:6]}",
           "CHARGEFLOW_LOG_LEVEL": "warning"}  # fmt: skip
    await pool.execute("DELETE FROM instance_partitions")  # earlier tests' instances are gone
    proc = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, "-m", "daemon", "run", "--workers", "2"], env=env
    )
    try:
        # Each worker reads the others' claims every second; until it has seen the other's,
        # it takes every bike. /readyz says which claims it sees.
        for port in (base, base + 1):
            await wait_until(
                lambda p=port: sees_the_other_claims(p), timeout=30,
                what=f"worker on port {port} ready and seeing the other's claim",
            )  # fmt: skip
        views = [readyz(port)["partition"] for port in (base, base + 1)]
        assert sorted(v["takes"][0] for v in views) == ["0/2", "1/2"]
        bikes = [Bike(bike.client) for _ in range(12)]
        sessions = {}
        for one in bikes:  # one ride per bike: each worker takes its own bikes
            session_id = await one.start("ride")
            for seq in range(1, 11):
                await one.sample(session_id, seq, "1.5")
            await one.end(session_id, 10)
            sessions[one.bike_id] = session_id
        for one in bikes:
            (finalized,) = await outbound.wait_for(one.bike_id, "sessions/finalized", timeout=30)
            assert (finalized["session_id"], finalized["energy_wh"]) == (
                sessions[one.bike_id], "15"
            )  # fmt: skip

        received = [_metric(p, "chargeflow_messages_received_total") for p in (base, base + 1)]
        assert all(n > 0 for n in received), received  # both workers took messages
        # ... and each left the other's bikes alone, from the topic alone.
        assert all(_metric(p, "chargeflow_messages_not_owned_total") > 0 for p in (base, base + 1))
        rows = await pool.fetch(
            "SELECT energy_wh FROM sessions WHERE bike_id = ANY($1) AND state = 'finalized'",
            list(sessions),
        )
        assert [r["energy_wh"] for r in rows] == [Decimal(15)] * 12
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
    assert code == 0


def _two_free_ports() -> int:
    """A port whose next one is free too."""
    while True:
        base = free_port()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", base + 1)) != 0:
                return base


def _ready(port: int) -> bool:
    return bool(readyz(port).get("ready"))
