"""A database outage: the daemon holds its batch unacknowledged, reports not ready, catches up."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import pytest

from daemon.devbroker import free_port
from tests.e2e.helpers import http_get, running_daemon, settings_for, wait_until

pytestmark = pytest.mark.e2e


class CuttableProxy:
    """A TCP proxy in front of PostgreSQL whose line can be cut and restored."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.up = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()

    def cut(self) -> None:
        self.up = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.up = True

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_the_daemon_rides_out_a_database_outage_and_catches_up(
    database_url, broker, bike, outbound, pool
):
    parts = urlsplit(database_url)
    async with CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        via_proxy = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
        async with running_daemon(settings_for(database_url=via_proxy,
                                               mqtt_url=broker.daemon_url)) as daemon:  # fmt: skip
            session_id = await bike.start()
            await bike.sample(session_id, 1, "100")
            await wait_until(lambda: pool.fetchval(
                "SELECT count(*) = 1 FROM telemetry WHERE session_id = $1",
                uuid.UUID(session_id)), what="first sample stored")  # fmt: skip

            proxy.cut()
            for seq in range(2, 6):
                await bike.sample(session_id, seq, "100")
            await bike.end(session_id, 5)
            await wait_until(lambda: not daemon.ready()["database"], what="not ready")
            status, body = await http_get(daemon, "/readyz")
            assert status == 503
            assert body["checks"]["database"] is False
            stored = await pool.fetchval(
                "SELECT count(*) FROM telemetry WHERE session_id = $1", uuid.UUID(session_id)
            )
            assert stored == 1
            assert outbound.of(bike.bike_id, "sessions/finalized") == []

            proxy.restore()
            (finalized,) = await outbound.wait_for(bike.bike_id, "sessions/finalized", timeout=40)
            assert Decimal(finalized["energy_wh"]) == 500
            assert finalized["missing_samples"] == 0
            await wait_until(lambda: daemon.ready()["database"], what="ready again")
