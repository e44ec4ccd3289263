"""The `chargeflow` command line against the real services."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from daemon.simulate import FleetPlan, messages
from tests.e2e.helpers import PREFIX, wait_until

pytestmark = pytest.mark.e2e


def chargeflow(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEFLOW_")}
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        env={**clean, "CHARGEFLOW_LOG_FORMAT": "json", **env},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


async def test_simulate_then_analytics_and_session_trace_the_fleet(
    daemon, broker, database_url, pool
):
    seed = random.randrange(2**32)
    plan = FleetPlan(bikes=3, sessions_per_bike=2, samples_per_session=5, prefix=PREFIX,
                     seed=seed)  # fmt: skip
    first_topic = next(messages(plan, datetime.now(UTC)))[0]
    bike = first_topic.split("/")[3]
    run = await asyncio.to_thread(
        chargeflow, "simulate", "--bikes", "3", "--sessions", "2", "--samples", "5",
        "--seed", str(seed), CHARGEFLOW_SIMULATOR_MQTT_URL=broker.fleet_url,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "42/42 messages" in run.stderr

    await wait_until(lambda: pool.fetchval(
        "SELECT count(*) = 2 FROM sessions WHERE bike_id = $1 AND state = 'finalized'", bike),
        what="the simulated bike's sessions finalized")  # fmt: skip

    env = {"CHARGEFLOW_DATABASE_URL": database_url}
    report = await asyncio.to_thread(chargeflow, "analytics", "--bike-id", bike, **env)
    assert report.returncode == 0, report.stderr
    figures = json.loads(report.stdout)
    assert figures["rides"]["count"] == 1
    assert figures["charging"]["count"] == 1
    session_id = figures["rides"]["session_ids"][0]

    shown = await asyncio.to_thread(chargeflow, "session", session_id, **env)
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert view["stored_telemetry_count"] == 5
    assert view["billing"]["amount"] == figures["rides"]["revenue"]["EUR"]


def test_an_unknown_session_is_a_clear_error(database_url):
    shown = chargeflow("session", "not-a-uuid", CHARGEFLOW_DATABASE_URL=database_url)
    assert shown.returncode == 2
    assert "SESSION_ID must be a UUID" in shown.stderr


def test_a_bad_setting_stops_the_daemon_with_the_variable_named():
    run = chargeflow("run", CHARGEFLOW_MQTT_URL="http://user:hunter2@broker:1883")
    assert run.returncode == 2
    assert "CHARGEFLOW_MQTT_URL" in run.stderr
    assert "mqtt://" in run.stderr
    assert "hunter2" not in run.stderr


def test_migrate_says_which_database_it_cannot_reach():
    run = chargeflow("migrate", CHARGEFLOW_DATABASE_URL="postgresql://app:pw@127.0.0.1:9/x")
    assert run.returncode == 2
    assert "CHARGEFLOW_DATABASE_URL" in run.stderr
    assert "127.0.0.1:9" in run.stderr
    assert ":pw@" not in run.stderr


async def test_run_with_timescaledb_on_where_it_cannot_load_fails_in_one_line(database_url, pool):
    from daemon.db.migrate import timescale_problem

    async with pool.acquire() as conn:
        problem = await timescale_problem(conn)
    if problem is None:
        pytest.skip("this PostgreSQL loads TimescaleDB: `on` starts (tested in integration)")

    run = await asyncio.to_thread(
        chargeflow, "run", CHARGEFLOW_DATABASE_URL=database_url, CHARGEFLOW_TIMESCALEDB="on",
        CHARGEFLOW_HTTP_PORT="0",
    )  # fmt: skip

    assert run.returncode == 2
    said = [line for line in run.stderr.splitlines() if "TIMESCALEDB" in line]
    assert said == [f"chargeflow: configuration error: CHARGEFLOW_TIMESCALEDB=on, but {problem}"]
    assert run.stderr.splitlines()[-1] == said[0]
    assert "Traceback" not in run.stdout + run.stderr
