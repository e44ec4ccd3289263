"""The repo's broker tooling works wherever the repository lives, a 0700 home included."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
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
