"""Real services for integration and end-to-end tests.

PostgreSQL: TEST_DATABASE_URL, else 127.0.0.1:5432, else a testcontainers
TimescaleDB when a Docker engine answers. Mosquitto: the repo's mosquitto.conf started on a free
port (the binary must be installed). With CI=true a missing service fails the run; elsewhere the
tests that need it are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from daemon.db.migrate import migrate
from daemon.db.pricing import PricingRecords
from daemon.devbroker import free_port, start_broker
from daemon.pricing_text import parse_pricing
from domain.billing import PricingRules

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
DAEMON_USER = ("chargeflow-daemon", "daemon-example-password")
FLEET_USER = ("fleet-simulator", "simulator-example-password")


def missing_service(what: str) -> None:
    message = f"{what} is not available"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: services are required, not skipped)", pytrace=False)
    pytest.skip(message)


def _reachable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """An admin URL of a real PostgreSQL server."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    if _reachable("127.0.0.1", 5432):
        yield "postgresql://postgres@127.0.0.1:5432/postgres"
        return
    try:
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("timescale/timescaledb:latest-pg16", driver=None)
        container.start()
    except Exception as exc:
        missing_service(f"PostgreSQL (no server on 127.0.0.1:5432, no Docker: {exc})")
        return
    try:
        yield container.get_connection_url()
    finally:
        container.stop()


def shipped_pricing() -> PricingRules:
    text = resources.files("daemon").joinpath("pricing.toml").read_text()
    return parse_pricing(text, "daemon/pricing.toml")


@pytest.fixture(scope="session")
def database_url(postgres_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test run, dropped afterwards."""
    name = f"chargeflow_test_{uuid.uuid4().hex[:10]}"

    async def setup() -> None:
        admin = await asyncpg.connect(postgres_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(_with_database(postgres_url, name))
        try:
            await migrate(conn)
        finally:
            await conn.close()
        # The shipped price list is recorded, as the daemon does at start-up.
        pool = await asyncpg.create_pool(_with_database(postgres_url, name), min_size=1, max_size=1)
        assert pool is not None
        try:
            await PricingRecords(pool).record(shipped_pricing(), datetime.now(UTC))
        finally:
            await pool.close()

    async def teardown() -> None:
        admin = await asyncpg.connect(postgres_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    try:
        asyncio.run(setup())
    except (OSError, asyncpg.PostgresError) as exc:
        missing_service(f"PostgreSQL at {postgres_url} ({exc})")
    yield _with_database(postgres_url, name)
    asyncio.run(teardown())


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture
async def fresh_url(postgres_url: str) -> AsyncIterator[str]:
    """An empty database of its own (nothing migrated, never analyzed), dropped afterwards."""
    name = f"chargeflow_fresh_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(postgres_url, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def fresh(fresh_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(fresh_url)
    try:
        yield conn
    finally:
        await conn.close()


@dataclass
class Broker:
    """A Mosquitto running the repo's mosquitto.conf."""

    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None

    def url(self, user: tuple[str, str]) -> str:
        return f"mqtt://{user[0]}:{user[1]}@127.0.0.1:{self.port}"

    @property
    def daemon_url(self) -> str:
        return self.url(DAEMON_USER)

    @property
    def fleet_url(self) -> str:
        return self.url(FLEET_USER)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def start(self) -> None:
        assert self.proc is None
        self.proc = start_broker(self.port, self.data_dir)


@contextlib.contextmanager
def _launched_broker() -> Iterator[Broker]:
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        missing_service("mosquitto (install Debian's mosquitto package)")
    # Not under pytest's tmp_path: its 0700 parents would keep a root-started mosquitto, which
    # drops to the mosquitto user, from saving its persistence database.
    data_dir = Path(tempfile.mkdtemp(prefix="chargeflow-mosquitto-"))
    broker = Broker(free_port(), data_dir, None)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """One broker for the run; tests use random bike ids so they never collide."""
    with _launched_broker() as broker:
        yield broker


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    """A broker of this test's own, which it may stop and start."""
    with _launched_broker() as broker:
        yield broker
