"""The `chargeflow` command line against the real services."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from decimal import Decimal

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
    if problem is None:  # this PostgreSQL loads TimescaleDB: `on` is taken, not refused
        run = await asyncio.to_thread(
            chargeflow, "migrate", CHARGEFLOW_DATABASE_URL=database_url,
            CHARGEFLOW_TIMESCALEDB="on",
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "TIMESCALEDB" not in run.stderr
        assert await pool.fetchval(
            "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
        ) == 1  # fmt: skip
        return

    run = await asyncio.to_thread(
        chargeflow, "run", CHARGEFLOW_DATABASE_URL=database_url, CHARGEFLOW_TIMESCALEDB="on",
        CHARGEFLOW_HTTP_PORT="0",
    )  # fmt: skip

    assert run.returncode == 2
    said = [line for line in run.stderr.splitlines() if "TIMESCALEDB" in line]
    assert said == [f"chargeflow: configuration error: CHARGEFLOW_TIMESCALEDB=on, but {problem}"]
    assert run.stderr.splitlines()[-1] == said[0]
    assert "Traceback" not in run.stdout + run.stderr


def on_a_terminal(*args: str, **env: str) -> tuple[int, str]:
    """Run chargeflow with stdout on a pseudo-terminal; (exit code, what it showed there).
    stderr (logs, progress) goes elsewhere, as a terminal user's would scroll by."""
    import pty

    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEFLOW_")}
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", *args],
        env={**clean, "CHARGEFLOW_LOG_LEVEL": "warning", "COLUMNS": "160", "TERM": "xterm", **env},
        stdin=subprocess.DEVNULL, stdout=terminal, stderr=subprocess.DEVNULL, close_fds=True,
    )  # fmt: skip
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal is gone: the process closed it
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    return proc.wait(timeout=60), shown.decode(errors="replace")


async def test_on_a_terminal_analytics_is_a_table_and_with_json_it_is_json(daemon, bike, outbound,
                                                                          database_url):  # fmt: skip
    session_id = await bike.start("ride")
    await bike.sample(session_id, 1, "1234.5")
    await bike.end(session_id, 1)
    await outbound.wait_for(bike.bike_id, "billing")
    env = {"CHARGEFLOW_DATABASE_URL": database_url}

    code, shown = await asyncio.to_thread(on_a_terminal, "analytics", "--bike-id", bike.bike_id,
                                          **env)  # fmt: skip
    assert code == 0, shown
    assert "Finalized sessions" in shown
    assert "━" in shown or "─" in shown  # a drawn table, not JSON
    assert "1234.5" in shown and "0.37" in shown

    code, shown = await asyncio.to_thread(
        on_a_terminal, "analytics", "--bike-id", bike.bike_id, "--json", **env
    )
    assert code == 0, shown
    assert json.loads(shown)["rides"]["energy_wh"] == "1234.5"


def test_exit_codes_scripts_can_rely_on(database_url):
    env = {"CHARGEFLOW_DATABASE_URL": database_url}
    assert chargeflow("--version").stdout.startswith("chargeflow ")
    missing = chargeflow("session", "00000000-0000-4000-8000-000000000000", **env)
    assert (missing.returncode, missing.stderr.splitlines()[-1]) == (
        3, "no session 00000000-0000-4000-8000-000000000000"
    )  # fmt: skip
    assert chargeflow("analytics", "--no-such-option", **env).returncode == 2
    bad = chargeflow("rejections", "list", "--reason", "bad_mood", **env)
    assert bad.returncode == 2
    assert "--reason must be one of malformed_json" in bad.stderr


async def test_a_sample_rejected_before_its_late_start_is_replayed_once_into_its_session(
    daemon, bike, outbound, database_url, pool
):
    session_id = str(uuid.uuid4())
    await bike.sample(session_id, 1, "42")  # its start is late: past the 1 s grace period
    (rejection,) = await outbound.wait_for(bike.bike_id, "rejections")
    assert rejection["reason"] == "unknown_session"
    await bike.send("telemetry", b"{not json")
    await outbound.wait_for(bike.bike_id, "rejections", count=2)
    await bike.start("ride", session_id=session_id)  # the start, at last
    await wait_until(lambda: pool.fetchval(
        "SELECT count(*) = 1 FROM sessions WHERE session_id = $1", uuid.UUID(session_id)),
        what="the late start accepted")  # fmt: skip
    env = {"CHARGEFLOW_DATABASE_URL": database_url}
    kept_before = await pool.fetchval(
        "SELECT count(*) FROM rejected_messages WHERE bike_id = $1", bike.bike_id
    )

    first = await asyncio.to_thread(
        chargeflow, "rejections", "replay", "--bike-id", bike.bike_id, "--json", **env
    )
    again = await asyncio.to_thread(
        chargeflow, "rejections", "replay", "--bike-id", bike.bike_id, "--json", **env
    )

    assert first.returncode == 0, first.stderr
    became = [(r["was"], r["now"], r["reason"]) for r in json.loads(first.stdout)["replayed"]]
    assert became == [
        ("unknown_session", "accepted", None),
        ("malformed_json", "rejected", "malformed_json"),
    ]
    assert "replayed 2: 1 accepted, 1 rejected" in first.stderr
    assert [r["now"] for r in json.loads(again.stdout)["replayed"]] == ["duplicate", "rejected"]
    stored = await pool.fetch(
        "SELECT energy_wh FROM telemetry WHERE session_id = $1", uuid.UUID(session_id)
    )
    assert [r["energy_wh"] for r in stored] == [Decimal(42)]
    kept_after = await pool.fetchval(
        "SELECT count(*) FROM rejected_messages WHERE bike_id = $1", bike.bike_id
    )
    assert kept_after == kept_before  # still-invalid ones are not kept twice
    listed = await asyncio.to_thread(
        chargeflow, "rejections", "list", "--bike-id", bike.bike_id, "--reason",
        "unknown_session", "--json", **env,
    )  # fmt: skip
    assert [r["session_id"] for r in json.loads(listed.stdout)["rejections"]] == [session_id]


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_run_says_which_event_loop_it_runs_on_and_stops_cleanly(broker, database_url, loop):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEFLOW_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "run",
        env={**clean, "CHARGEFLOW_LOG_FORMAT": "json", "CHARGEFLOW_MQTT_URL": broker.daemon_url,
             "CHARGEFLOW_DATABASE_URL": database_url, "CHARGEFLOW_HTTP_PORT": "0",
             "CHARGEFLOW_CLIENT_ID": f"loop-{uuid.uuid4().hex[:8]}",
             "CHARGEFLOW_EVENT_LOOP": loop},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        running = None
        while running is None:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            assert line, "the daemon exited before it was running"
            if b'"chargeflow running"' in line:
                running = json.loads(line)
        assert running["event_loop"] == loop
    finally:
        proc.terminate()
        rest = await asyncio.wait_for(proc.stdout.read(), timeout=30)
        await proc.wait()
    assert proc.returncode == 0, rest
    assert b'"stopped"' in rest


def test_without_uvloop_the_default_loop_says_how_to_run_anyway(monkeypatch):
    from daemon.cli import _event_loop
    from daemon.config import ConfigError, Settings

    monkeypatch.setitem(sys.modules, "uvloop", None)  # what a platform without it shows

    with pytest.raises(ConfigError, match="CHARGEFLOW_EVENT_LOOP=asyncio"):
        _event_loop(Settings())
    assert _event_loop(Settings(event_loop="asyncio")) is None


async def test_every_read_command_draws_a_table_on_a_terminal(daemon, bike, outbound, database_url):
    """`pricing` crashed on a terminal (KeyError 'rules') while its JSON worked: each read
    command's table is drawn here, on a pseudo-terminal, as a user sees it."""
    session_id = await bike.start("ride")
    await bike.sample(session_id, 1, "1234.5")
    await bike.end(session_id, 1)
    await bike.send("telemetry", b"not json")
    await outbound.wait_for(bike.bike_id, "billing")
    await outbound.wait_for(bike.bike_id, "rejections")
    env = {"CHARGEFLOW_DATABASE_URL": database_url}
    commands = {
        ("pricing",): ["Pricing versions", "ride: 0.30/kWh + 0", "charging: 0.25/kWh + 0"],
        ("session", session_id): [f"Session {session_id}", "billing.amount", "0.37"],
        ("rejections", "list", "--bike-id", bike.bike_id): ["Kept rejections", "malformed_json"],
        ("analytics", "--bike-id", bike.bike_id): ["Finalized sessions", "By pricing version"],
    }
    for args, expected in commands.items():
        code, shown = await asyncio.to_thread(on_a_terminal, *args, **env)
        assert code == 0, (args, shown)
        assert "Traceback" not in shown
        for text in expected:
            assert text in shown, (args, text, shown)


def test_read_commands_answer_without_start_up_noise_or_other_commands_settings(database_url):
    """A read neither migrates nor logs on the way, and settings it does not use (a bad HTTP
    port) are not its business."""
    env = {"CHARGEFLOW_DATABASE_URL": database_url, "CHARGEFLOW_LOG_FORMAT": "console",
           "CHARGEFLOW_HTTP_PORT": "abc"}  # fmt: skip
    for args in (["analytics"], ["pricing"], ["rejections", "list", "--limit", "1"]):
        done = chargeflow(*args, "--json", **env)
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", (args, done.stderr)
        json.loads(done.stdout)
    assert chargeflow("run", **env).returncode == 2  # the daemon does listen on that port


def test_a_read_of_a_database_never_migrated_says_what_to_run(postgres_url):
    from urllib.parse import urlsplit, urlunsplit

    missing = urlunsplit(urlsplit(postgres_url)._replace(path=f"/cf_none_{uuid.uuid4().hex[:8]}"))
    done = chargeflow("analytics", CHARGEFLOW_DATABASE_URL=missing)
    assert done.returncode == 2
    assert done.stderr.strip().endswith(
        "does not exist; run `chargeflow migrate` (or the daemon) first"
    )


def test_a_time_that_is_not_rfc_3339_is_a_usage_error_with_an_example(database_url):
    done = chargeflow("analytics", "--from", "yesterday", CHARGEFLOW_DATABASE_URL=database_url)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "chargeflow: usage error: --from must be an RFC 3339 timestamp with an offset "
        "(e.g. 2026-12-06T08:00:00Z), got 'yesterday'"
    ]


@pytest.mark.parametrize("option", ["--bikes", "--sessions"])
def test_simulate_refuses_a_fleet_of_nothing(option):
    done = chargeflow("simulate", option, "0")
    assert done.returncode == 2
    assert option in done.stderr


def test_simulate_with_a_wrong_password_is_a_start_up_failure_in_one_line(broker):
    url = f"mqtt://fleet-simulator:wrong@127.0.0.1:{broker.port}"
    done = chargeflow("simulate", "--bikes", "1", CHARGEFLOW_SIMULATOR_MQTT_URL=url)
    assert done.returncode == 2
    last = done.stderr.splitlines()[-1]
    assert last.startswith("chargeflow: configuration error: cannot publish")
    assert "NOT_AUTHORIZED" in last and "wrong" not in last


def test_simulate_counts_what_the_broker_refuses_instead_of_calling_it_sent(broker):
    """Logged in as a bike, the simulator may write only that bike's topics: Mosquitto
    answers the others' PUBLISH with PUBACK 0x87, which is a refusal, not a message sent."""
    url = f"mqtt://bike-0001:bike-0001-example-password@127.0.0.1:{broker.port}"
    done = chargeflow("simulate", "--bikes", "1", "--sessions", "1", "--samples", "4",
                      CHARGEFLOW_SIMULATOR_MQTT_URL=url)  # fmt: skip
    assert done.returncode == 1
    assert "0/6 messages" in done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        "chargeflow: the broker refused 6 of 6 messages (the broker refused to publish on "
    )
    assert "NOT_AUTHORIZED" in done.stderr.splitlines()[-1]


async def test_riders_erase_says_what_it_did_then_that_nothing_is_left(
    daemon, bike, outbound, database_url
):
    rider = f"rider-{uuid.uuid4().hex}"
    session_id = await bike.start(party=rider)
    await bike.end(session_id, 0)
    await outbound.wait_for(bike.bike_id, "sessions/finalized")

    first = chargeflow("riders", "erase", rider, CHARGEFLOW_DATABASE_URL=database_url)
    again = chargeflow("riders", "erase", rider, CHARGEFLOW_DATABASE_URL=database_url)
    shown = chargeflow("session", session_id, CHARGEFLOW_DATABASE_URL=database_url)

    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)  # piped: JSON, as every command's answer
    assert report["erased"] is True
    assert (report["sessions"], report["rejections_redacted"], report["outbox_redacted"]) == (
        1,
        0,
        1,  # the finalized message (the bill never names the rider)
    )
    assert again.returncode == 0 and json.loads(again.stdout)["erased"] is False
    code, screen = on_a_terminal("riders", "erase", rider, CHARGEFLOW_DATABASE_URL=database_url)
    assert code == 0 and "nothing left to erase" in screen
    document = json.loads(shown.stdout)
    assert document["rider_erased"] is True and rider not in shown.stdout
