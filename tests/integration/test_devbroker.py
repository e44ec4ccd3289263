"""The repo's broker tooling works wherever the repository lives, a 0700 home included."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from daemon.devbroker import REPO_ROOT, free_port
from tests.conftest import missing_service
from tests.peers import mqtt_client

pytestmark = pytest.mark.integration


@pytest.fixture
def private_clone():
    """What the broker tooling needs of the repository, in a 0700 directory as a clone in
    root's home is: run as root, mosquitto drops to the mosquitto user, which cannot enter it."""
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        missing_service("mosquitto")
    home = Path(tempfile.mkdtemp(prefix="cf-home-"))  # mode 0700
    clone = home / "cf-newcomer"
    clone.mkdir()
    for package in ("daemon", "domain"):
        shutil.copytree(REPO_ROOT / package, clone / package)
    shutil.copy(REPO_ROOT / "mosquitto.conf", clone)
    shutil.copytree(REPO_ROOT / "deploy" / "mosquitto", clone / "deploy" / "mosquitto")
    assert home.stat().st_mode & 0o777 == 0o700
    yield clone
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def devbroker_from(private_clone):
    """`python -m daemon.devbroker` run from the clone (as deploy/run-local does)."""
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-m", "daemon.devbroker", "--port", str(port)],
        cwd=private_clone,
        env={**os.environ, "PYTHONPATH": str(private_clone)},
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    pid = int(re.search(r"pid (\d+)", done.stdout).group(1))  # type: ignore[union-attr]
    yield port
    os.kill(pid, signal.SIGTERM)
    shutil.rmtree(Path(tempfile.gettempdir()) / f"chargeflow-mosquitto-{port}", ignore_errors=True)


async def test_a_broker_started_from_a_0700_clone_reads_its_password_and_acl_files(
    devbroker_from,
):
    url = f"mqtt://fleet-simulator:simulator-example-password@127.0.0.1:{devbroker_from}"
    topic = f"chargeflow/v1/bikes/b-{uuid.uuid4().hex[:6]}/telemetry"
    async with mqtt_client(url) as client:  # authenticates: the password file was read
        await client.subscribe(topic, qos=1)
        await client.publish(topic, b"{}", qos=1)  # allowed by the ACL it read
        async for message in client.messages:
            assert message.payload == b"{}"
            break


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run_local(database_url: str, port: int, *args: str) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEFLOW_")}
    env = {
        **clean,
        "RUN_LOCAL_VENV": sys.prefix,  # this run's virtualenv, not a new .venv
        "RUN_LOCAL_MQTT_PORT": str(port),
        "CHARGEFLOW_DATABASE_URL": database_url,
        "CHARGEFLOW_HTTP_HOST": "127.0.0.1",
        "CHARGEFLOW_HTTP_PORT": str(free_port()),
        "CHARGEFLOW_LOG_FORMAT": "json",
        "CHARGEFLOW_CLIENT_ID": f"run-local-{uuid.uuid4().hex[:6]}",
    }
    return subprocess.Popen(
        [str(REPO_ROOT / "deploy" / "run-local"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job
    )


def test_run_local_stops_the_broker_it_started_when_the_daemon_stops(database_url):
    port = free_port()
    job = _run_local(database_url, port)
    try:
        for _ in range(300):
            if _listening(port) and job.poll() is None:
                break
            time.sleep(0.1)
        assert _listening(port), "run-local started no broker"
        time.sleep(3)  # the daemon up and connected
        os.killpg(job.pid, signal.SIGINT)  # Ctrl-C on the terminal: the whole job
        out, _ = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, out
    assert f"stopped the mosquitto on port {port}" in out
    assert not _listening(port)


def test_run_local_says_how_to_stop_a_broker_it_leaves_running_for_the_daemon(database_url):
    port = free_port()
    job = _run_local(database_url, port, "pricing", "--json")
    out, _ = job.communicate(timeout=120)
    try:
        assert job.returncode == 0, out
        pid = int(re.search(r"stop it with: kill (\d+)", out).group(1))  # type: ignore[union-attr]
        assert _listening(port)
    finally:
        found = re.search(r"pid (\d+)", out)
        if found:
            os.kill(int(found.group(1)), signal.SIGTERM)
    assert pid == int(found.group(1))  # type: ignore[union-attr]
