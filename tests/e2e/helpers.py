"""Helpers for end-to-end tests: a daemon in-process, publishers and an outbound listener."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiomqtt

from daemon.app import Daemon
from daemon.config import Settings
from daemon.simulate import json_payload
from tests.peers import mqtt_client

PREFIX = "chargeflow/v1"


def settings_for(database_url: str, mqtt_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "mqtt_url": mqtt_url,
        "database_url": database_url,
        "http_port": 0,
        "http_host": "127.0.0.1",
        "client_id": f"cf-test-{uuid.uuid4().hex[:8]}",
        "finalize_grace_s": 1.0,
        "log_format": "json",
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[Daemon]:
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run())
    try:
        await wait_until(lambda: all(daemon.ready().values()), what="daemon ready")
        yield daemon
    finally:
        daemon.stop.set()
        await asyncio.wait_for(task, timeout=30)


async def wait_until(
    condition: Callable[[], Any], timeout: float = 15, what: str = "condition"
) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def http_get(daemon: Daemon, path: str) -> tuple[int, Any]:
    """GET a daemon path from a thread (the daemon serves on this event loop)."""
    assert daemon.http is not None and daemon.http.bound_port is not None
    url = f"http://127.0.0.1:{daemon.http.bound_port}{path}"

    def fetch() -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    return await asyncio.to_thread(fetch)


def iso(at: datetime) -> str:
    return at.isoformat()


def _number(value: Any) -> Any:
    """A quantity given as text ("1234.5") is sent as that exact JSON number."""
    return Decimal(value) if isinstance(value, str) else value


class Bike:
    """One simulated bike publishing its lifecycle and telemetry with QoS 1."""

    def __init__(self, client: aiomqtt.Client, bike_id: str | None = None) -> None:
        self.client = client
        self.bike_id = bike_id or f"bike-{uuid.uuid4().hex[:10]}"
        self.t0 = datetime.now(UTC) - timedelta(minutes=30)

    async def send(self, suffix: str, payload: dict[str, Any] | bytes) -> None:
        body = payload if isinstance(payload, bytes) else json_payload(payload)
        await self.client.publish(f"{PREFIX}/bikes/{self.bike_id}/{suffix}", body, qos=1)

    async def start(
        self,
        kind: str = "ride",
        session_id: str | None = None,
        party: str = "rider-1",
        at: datetime | None = None,
    ) -> str:
        session_id = session_id or str(uuid.uuid4())
        field = "rider_id" if kind == "ride" else "station_id"
        await self.send(
            "lifecycle",
            {
                "event": f"{kind}_started",
                "session_id": session_id,
                field: party,
                "occurred_at": iso(at or self.t0),
            },
        )
        return session_id

    async def sample(
        self,
        session_id: str,
        seq: int,
        energy_wh: Any = 10,
        telemetry_id: str | None = None,
        at: datetime | None = None,
        **extra: Any,
    ) -> str:
        telemetry_id = telemetry_id or str(uuid.uuid4())
        await self.send(
            "telemetry",
            {
                "telemetry_id": telemetry_id,
                "session_id": session_id,
                "seq": seq,
                "emitted_at": iso(at or self.t0 + timedelta(seconds=seq)),
                "energy_wh": _number(energy_wh),
                **{key: _number(value) for key, value in extra.items()},
            },
        )
        return telemetry_id

    async def end(
        self, session_id: str, last_seq: int, kind: str = "ride", at: datetime | None = None
    ) -> None:
        await self.send(
            "lifecycle",
            {
                "event": f"{kind}_ended",
                "session_id": session_id,
                "occurred_at": iso(at or self.t0 + timedelta(minutes=10)),
                "last_seq": last_seq,
            },
        )


class Outbound:
    """Collects what the daemon publishes on the bikes' outbound topics."""

    def __init__(self, url: str, client_id: str | None = None) -> None:
        self.url = url
        self.client_id = client_id
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self._client: aiomqtt.Client | None = None

    async def __aenter__(self) -> Outbound:
        self._client = mqtt_client(self.url, self.client_id)
        await self._client.__aenter__()
        for suffix in ("sessions/finalized", "billing", "rejections"):
            await self._client.subscribe(f"{PREFIX}/bikes/+/{suffix}", qos=1)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self._client is not None
        async for message in self._client.messages:
            payload = message.payload
            assert isinstance(payload, bytes | bytearray)
            self.messages.append((message.topic.value, json.loads(payload)))

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None and self._client is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(None, None, None)

    def of(self, bike_id: str, suffix: str) -> list[dict[str, Any]]:
        topic = f"{PREFIX}/bikes/{bike_id}/{suffix}"
        return [payload for t, payload in self.messages if t == topic]

    async def wait_for(
        self, bike_id: str, suffix: str, count: int = 1, timeout: float = 15
    ) -> list[dict[str, Any]]:
        await wait_until(
            lambda: len(self.of(bike_id, suffix)) >= count,
            timeout,
            what=f"{count} message(s) on {bike_id}/{suffix}",
        )
        return self.of(bike_id, suffix)


def readyz(port: int) -> dict[str, Any]:
    """An instance's /readyz body while it is ready; empty while it is not (503) or not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return dict(json.load(response))
    except OSError:
        return {}


def sees_the_other_claims(port: int) -> bool:
    """Ready, with one claim of its own (i/N) and the other workers' claims in view (other
    instances' claims may be in view too: those of earlier tests, until their lease ends)."""
    view = readyz(port).get("partition")
    if view is None or len(view["takes"]) != 1:
        return False
    index, count = map(int, view["takes"][0].split("/"))
    others = {f"{i}/{count}" for i in range(count) if i != index}
    return others <= set(view["others"])
