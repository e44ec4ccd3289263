"""The composition root: wires settings, store, pipeline, MQTT link, outbox and HTTP together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from dataclasses import dataclass, field

import asyncpg
import structlog

from daemon.backoff import Backoff
from daemon.config import ConfigError, DatabaseUnavailable, Settings
from daemon.db.claims import Claims
from daemon.db.migrate import TimescaleUnavailable, ensure_database, migrate, pending_migrations
from daemon.db.outbox import OutboxStore
from daemon.db.store import Store
from daemon.db.views import ReadModel
from daemon.http import HttpServer
from daemon.metrics import Metrics
from daemon.mqtt.connection import MqttLink
from daemon.mqtt.contract import asyncapi_document
from daemon.mqtt.delivery import Link, ReadGate
from daemon.partition import Ownership, PartitionRegistry
from daemon.service.ingestion import Ingestion, configured_ingestion
from daemon.service.outbox import OutboxPublisher
from daemon.service.pipeline import Pipeline, PipelineConfig
from daemon.service.retention import Retention, RetentionPolicy

__all__ = ["Daemon", "open_reader", "open_store", "run_daemon"]

log = structlog.get_logger(__name__)


async def open_store(settings: Settings, *, create: bool = True) -> Store:
    """Connect (creating the database if asked), migrate, and return the store."""
    try:
        if create:
            await ensure_database(settings.database_url)
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=6)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(
            f"CHARGEFLOW_DATABASE_URL: cannot use {settings.database_display}: {exc}"
        ) from None
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            await migrate(
                conn,
                settings.redelivery_window_days,
                settings.telemetry_retention_days,
                settings.timescaledb,
            )
    except TimescaleUnavailable as exc:
        await pool.close()
        raise ConfigError(str(exc)) from None
    except asyncpg.PostgresError as exc:
        await pool.close()
        raise ConfigError(
            f"the schema of {settings.database_display} cannot be migrated: {exc}"
        ) from None
    except (OSError, asyncpg.InterfaceError) as exc:
        await pool.close()
        raise DatabaseUnavailable(
            f"lost {settings.database_display} while migrating: {exc}"
        ) from None
    return Store(pool)


async def open_reader(settings: Settings) -> Store:
    """The store for a read command: no database created, nothing migrated, nothing logged;
    a database that is missing or behind its migrations is a ConfigError saying what to run."""
    try:
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    except asyncpg.InvalidCatalogNameError:
        raise ConfigError(
            f"CHARGEFLOW_DATABASE_URL: {settings.database_display} does not exist; "
            "run `chargeflow migrate` (or the daemon) first"
        ) from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(
            f"CHARGEFLOW_DATABASE_URL: cannot use {settings.database_display}: {exc}"
        ) from None
    assert pool is not None
    async with pool.acquire() as conn:
        pending = await pending_migrations(conn)
    if pending:
        await pool.close()
        raise ConfigError(
            f"the schema of {settings.database_display} is behind this version of chargeflow "
            f"({', '.join(pending)} not applied); run `chargeflow migrate`"
        )
    return Store(pool)


@dataclass
class Daemon:
    """A running daemon's parts, for the CLI and for tests that run it in-process."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    store: Store | None = None
    pipeline: Pipeline | None = None
    link: Link | None = None
    http: HttpServer | None = None
    registry: PartitionRegistry | None = None
    database_ok: bool = False

    def read_model(self) -> ReadModel | None:
        """What HTTP reads from: None until the store is open (then it answers 503)."""
        return None if self.store is None else ReadModel(self.store.pool)

    def ready(self) -> dict[str, bool]:
        return {
            "database": self.database_ok and self.store is not None,
            "mqtt": self.link is not None and self.link.connected.is_set(),
            "accepting": self.pipeline is not None and self.pipeline.accepting,
        }

    def broker_node(self) -> str | None:
        """The broker the daemon is on now (of CHARGEFLOW_MQTT_URL's list), for /readyz."""
        node = None if self.link is None else self.link.node
        return None if node is None else node.display

    def partition_view(self) -> dict[str, list[str]] | None:
        """The claims this instance takes and the others' it sees (CHARGEFLOW_PARTITION)."""
        if self.registry is None:
            return None
        ownership = self.registry.ownership
        return {
            "takes": [str(p) for p in ownership.mine],
            "others": sorted({str(p) for p in ownership.others}),
        }

    def _idle(self) -> float:
        """How long the inbox has been empty while connected: what the broker queued for this
        instance has been taken once this grows (0 while disconnected)."""
        if self.pipeline is None or self.link is None or not self.link.connected.is_set():
            return 0.0
        connected_for = time.monotonic() - self.link.connected_since
        return min(connected_for, self.pipeline.idle_s())

    async def _start_store(self) -> Store | None:
        """Open the store, retrying while the database is away; None if stopped meanwhile."""
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                store = await open_store(self.settings)
                self.database_ok = True
                self.metrics.database_up.set(1)
                return store
            except DatabaseUnavailable as exc:
                wait = backoff.next_wait()
                log.error(
                    "database unavailable at start-up; retrying",
                    error=str(exc),
                    retry_in_s=round(wait, 2),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=wait)
        return None

    async def _watch_database(self, store: Store) -> None:
        while True:
            try:
                await asyncio.wait_for(store.pool.fetchval("SELECT 1"), timeout=5)
                self.database_ok = True
            except Exception as exc:
                if self.database_ok:
                    log.warning("database check failed", error=repr(exc))
                self.database_ok = False
            self.metrics.database_up.set(1 if self.database_ok else 0)
            if self.database_ok:
                with contextlib.suppress(Exception):
                    self.metrics.outbox_pending.set(await OutboxStore(store.pool).pending_count())
                    self.metrics.waiting_messages.set(await store.waiting_count())
            await asyncio.sleep(2)

    async def run(self) -> None:
        s = self.settings
        pricing = s.load_pricing()  # fail at once: retrying cannot fix it
        tokens = s.load_tokens()
        s.tls_context()  # a certificate, key or CA that cannot be used stops the start at once
        self.http = HttpServer(
            self.metrics,
            self,
            s.http_host,
            s.http_port,
            asyncapi=asyncapi_document(s.topic_prefix),
            tokens=tokens,
            metrics_auth=s.metrics_auth,
        )
        async with asyncio.TaskGroup() as tg:
            http_task = tg.create_task(self.http.serve())
            store = await self._start_store()
            if store is None:
                http_task.cancel()
                return
            self.store = store
            ingestion = await configured_ingestion(s, store, pricing)
            ownership = Ownership()
            registry = self.registry = await self._claim_partition(store, ownership)
            pipeline, link, publisher = self._wire(store, ingestion, ownership)
            link_task = tg.create_task(link.run())
            pipeline_task = tg.create_task(pipeline.run())
            others = [
                *([tg.create_task(registry.run())] if registry else []),
                tg.create_task(publisher.run()),
                tg.create_task(self._retention(store).run(s.retention_interval_s, self.stop)),
                tg.create_task(self._watch_database(store)),
                http_task,
            ]
            _log_running(s)
            stop_task = tg.create_task(self.stop.wait())
            await asyncio.wait(
                [stop_task, link_task, pipeline_task], return_when=asyncio.FIRST_COMPLETED
            )
            await _shut_down(pipeline, pipeline_task, link, link_task)
            for task in [link_task, *others]:
                task.cancel()
        await store.pool.close()
        log.info("stopped")

    async def _claim_partition(
        self, store: Store, ownership: Ownership
    ) -> PartitionRegistry | None:
        """With CHARGEFLOW_PARTITION, this instance's claim, registered before connecting:
        from the first message on, it knows which bikes it takes (daemon.partition)."""
        s = self.settings
        if s.partition_of is None:
            return None
        registry = PartitionRegistry(
            Claims(store.pool),
            s.client_id,
            s.partition_of,
            ownership,
            lease_s=s.partition_lease_s,
            idle=self._idle,
        )
        await registry.claim()
        return registry

    def _retention(self, store: Store) -> Retention:
        s = self.settings
        policy = RetentionPolicy(
            rejection_payload_days=s.rejection_payload_retention_days,
            outbox_days=s.outbox_retention_days,
            telemetry_days=s.telemetry_retention_days,
        )
        return Retention(store.pool, self.metrics, policy, batch=s.retention_batch)

    def _wire(
        self, store: Store, ingestion: Ingestion, ownership: Ownership
    ) -> tuple[Pipeline, Link, OutboxPublisher]:
        """The pipeline, the broker link and the outbox relay, built in that order, each
        given what it needs: the link delivers to the pipeline, the pipeline closes and opens
        the gate the link reads by and sets the event the relay wakes on, the relay publishes
        on the link."""
        s = self.settings
        gate = ReadGate()  # the pipeline closes it when it holds enough; the link follows it
        committed = asyncio.Event()  # set by the pipeline at each commit; wakes the relay
        config = PipelineConfig(
            prefix=s.topic_prefix,
            max_batch=s.max_batch,
            max_payload_bytes=s.max_payload_bytes,
            max_inbox=s.receive_maximum,
            pipelined=s.pipelined_commits,
        )
        pipeline = self.pipeline = Pipeline(
            ingestion, self.metrics, config, takes=ownership.takes, gate=gate,
            on_commit=committed.set,
        )  # fmt: skip
        link = self.link = MqttLink(s, self.metrics, pipeline.deliver, gate)
        publisher = OutboxPublisher(OutboxStore(store.pool), link, self.metrics, wake=committed)
        return pipeline, link, publisher


def _log_running(s: Settings) -> None:
    log.info(
        "chargeflow running",
        brokers=", ".join(b.display for b in s.brokers),
        database=s.database_display,
        prefix=s.topic_prefix,
        partition=s.partition,
        share_group=s.share_group,
        mqtt_protocol=s.mqtt_protocol,
        event_loop=type(asyncio.get_running_loop()).__module__.partition(".")[0],
    )


async def _shut_down(
    pipeline: Pipeline, pipeline_task: asyncio.Task[None], link: Link, link_task: asyncio.Task[None]
) -> None:
    """Finish the batch in hand, commit and acknowledge what has arrived, then say goodbye to
    the broker (it keeps the session and what is not acknowledged)."""
    log.info("shutting down: finishing the batch in hand")
    pipeline.stop()
    await pipeline_task
    await pipeline.drain()
    await link.disconnect()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(link_task, timeout=5)


async def run_daemon(settings: Settings) -> None:
    """`chargeflow run`: until SIGTERM or SIGINT, which drain and disconnect cleanly."""
    daemon = Daemon(settings)
    loop = asyncio.get_running_loop()
    # What is loaded by now (modules, pydantic's validators, the pricing) lives as long as the
    # process: out of the cyclic collector's sight, its full collections no longer walk it for
    # every few thousand messages. Measured draining a 50,000-message backlog: 0.66 s of
    # collection before, 0.20 s after, of about 4.5 s (README, "Measured").
    gc.collect()
    gc.freeze()
    # What is made later is mostly the fleet's cache: a few tracked objects per Active bike,
    # acyclic, freed by reference counting when the session ends. With the default thresholds
    # a young collection ran 90 times a second at 10,000 msg/s and a full one, walking all
    # 100,000 bikes, several times a minute (up to 115 ms each): 4.7 s of collection in a
    # 100,000-bike run, p50 publish-to-row 823 ms. A young collection every 100,000 net
    # allocations (a few ms), a full one every 50 million: p50 79 ms (README, "Measured").
    gc.set_threshold(100_000, 50, 10)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop.set)
    try:
        await daemon.run()
    except* ConfigError as group:
        raise group.exceptions[0] from None  # one line to the operator, not a task group
