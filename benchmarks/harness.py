"""What the benchmarks that run `chargeflow run` as its own process share: a fresh database,
the daemon's environment, and the example users of the repo's Mosquitto config."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from daemon.config import Settings
from daemon.mqtt.publisher import Publisher

__all__ = ["DAEMON", "FLEET", "daemon_environment", "fleet_url", "fresh_database", "publish"]

DAEMON = ("chargeflow-daemon", "daemon-example-password")
FLEET = ("fleet-simulator", "simulator-example-password")


async def fresh_database(url: str) -> None:
    """Drop the database the URL names; the daemon creates and migrates it again."""
    parts = urlsplit(url)
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{parts.path.strip("/")}" WITH (FORCE)')
    finally:
        await admin.close()


def daemon_environment(
    broker_port: int, database_url: str, http_port: int, name: str, **extra: str
) -> dict[str, str]:
    """The environment of a daemon on the repo's broker, quiet but for warnings."""
    return {
        **os.environ,
        "CHARGEFLOW_MQTT_URL": f"mqtt://{DAEMON[0]}:{DAEMON[1]}@127.0.0.1:{broker_port}",
        "CHARGEFLOW_DATABASE_URL": database_url,
        "CHARGEFLOW_HTTP_PORT": str(http_port),
        "CHARGEFLOW_HTTP_HOST": "127.0.0.1",
        "CHARGEFLOW_CLIENT_ID": f"cf-{name}-{uuid.uuid4().hex[:6]}",
        "CHARGEFLOW_LOG_LEVEL": "warning",
        "CHARGEFLOW_LOG_FORMAT": "json",
        **extra,
    }


def fleet_url(broker_port: int) -> str:
    """A publisher allowed to write every bike's inbound topics (and read bikes/#)."""
    return f"mqtt://{FLEET[0]}:{FLEET[1]}@127.0.0.1:{broker_port}"


async def publish(
    url: str, stream: Iterator[tuple[str, bytes]], total: int, what: str, protocol: str = "5"
) -> int:
    """Publish (topic, payload) with QoS 1 through the daemon's own link (500 PUBACKs
    outstanding at most), with progress."""
    began = time.perf_counter()
    settings = Settings(mqtt_url=url, mqtt_protocol=protocol)  # type: ignore[arg-type]

    def progress(done: int) -> None:
        print(f"\r  {what}: published {done:,}/{total:,}", end="", flush=True)

    async with Publisher(settings, window=500).connected() as publisher:
        report = await publisher.publish_all(stream, progress=progress)
    rate = report.sent / (time.perf_counter() - began)
    print(f"\r  {what}: published {report.sent:,}/{total:,} ({rate:,.0f} msg/s)" + " " * 10)
    return report.sent
