"""`chargeflow bench`: a backlog of telemetry ingested end to end, with numbers printed.

1. A fresh database (the configured one, suffixed ``_bench``) and a bench client id.
2. The daemon connects once so the broker holds a persistent session for it, then stops.
3. A backlog is published while it is away: ``bikes`` sessions, ``messages`` samples in all.
4. The daemon starts again; the clock runs until every session is finalized.

Needs a broker that queues a large backlog for an offline client (the repo's mosquitto.conf).
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from daemon.app import Daemon
from daemon.config import Settings
from daemon.logs import configure_logging
from daemon.simulate import FleetPlan, publish

__all__ = ["BacklogStalled", "run_bench"]

_STALL_S = 10.0  # no new sample stored for this long, with sessions still open: stalled


class BacklogStalled(Exception):
    """The daemon took everything the broker had and sessions are still open."""


async def _fresh_database(url: str) -> str:
    parts = urlsplit(url)
    name = f"{parts.path.strip('/')}_bench"
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _until_ready(daemon: Daemon, task: asyncio.Task[None]) -> None:
    while not all(daemon.ready().values()):
        if task.done():
            task.result()
        await asyncio.sleep(0.05)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_bench(settings: Settings, publisher: Settings, messages: int, bikes: int) -> None:
    configure_logging(settings.log_format, "warning")  # the numbers, not every finalization
    per_session = max(1, messages // bikes)
    total = bikes * (per_session + 2)
    database_url = await _fresh_database(settings.database_url)
    bench = settings.model_copy(
        update={
            "database_url": database_url,
            "client_id": f"chargeflow-bench-{uuid.uuid4().hex[:6]}",
            "http_port": 0,
            "log_level": "warning",
        }
    )
    # Started once so that the broker keeps a session for it, then stopped: the backlog is
    # queued for that session while no daemon runs.
    daemon = Daemon(bench)
    task = asyncio.create_task(daemon.run())
    await _until_ready(daemon, task)
    daemon.stop.set()
    await task
    print(f"backlog: {bikes} sessions x {per_session} samples + lifecycle = {total} messages")
    plan = FleetPlan(bikes, 1, per_session, settings.topic_prefix, seed=int(time.time()))
    await publish(publisher, plan)
    await _drain(bench, bikes, total)


async def _drain(bench: Settings, bikes: int, total: int) -> None:
    """Start the daemon on the backlog and time it to the last finalization."""
    daemon = Daemon(bench)
    cpu_before = time.process_time()
    started = time.perf_counter()
    task = asyncio.create_task(daemon.run())
    await _until_ready(daemon, task)
    assert daemon.store is not None
    pool = daemon.store.pool
    stalled_at, last_count = time.monotonic(), -1
    while await pool.fetchval("SELECT count(*) FROM sessions WHERE state = 'finalized'") < bikes:
        if task.done():
            task.result()
        count = await pool.fetchval("SELECT count(*) FROM telemetry")
        if count != last_count:
            stalled_at, last_count = time.monotonic(), count
        elif time.monotonic() - stalled_at > _STALL_S:
            daemon.stop.set()
            await task
            raise BacklogStalled(
                f"the backlog stopped arriving at {count:,} stored samples of {total:,} "
                f"messages: the broker dropped what it queued for the daemon's offline session "
                f"(Mosquitto keeps 1,000 messages by default, max_queued_messages; the repo's "
                f"mosquitto.conf keeps 1,000,000)"
            )
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    stored = await pool.fetchval("SELECT count(*) FROM telemetry")
    assert daemon.pipeline is not None
    sizes = list(daemon.pipeline.batch_sizes)
    commit_sum = next(
        s.value
        for m in daemon.metrics.commit_seconds.collect()
        for s in m.samples
        if s.name.endswith("_sum")
    )
    daemon.stop.set()
    await task
    _report(_Drained(total, stored, elapsed, cpu, sizes, commit_sum))


@dataclass(frozen=True, slots=True)
class _Drained:
    total: int
    stored: int
    elapsed: float
    cpu: float
    sizes: list[int]
    commit_sum: float


def _report(d: _Drained) -> None:
    total, stored, elapsed, cpu, sizes, commit_sum = (
        d.total, d.stored, d.elapsed, d.cpu, d.sizes, d.commit_sum
    )  # fmt: skip
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"ingested: {total} messages ({stored} samples stored) in {elapsed:.2f} s "
        f"= {total / elapsed:,.0f} msg/s end to end (from daemon start to last finalization)"
    )
    print(
        f"batches: {len(sizes)}, size mean {statistics.mean(sizes):.0f}, "
        f"p50 {_percentile(sizes, 0.5):.0f}, p95 {_percentile(sizes, 0.95):.0f}, "
        f"max {max(sizes)}"
    )
    print(
        f"daemon CPU: {cpu:.2f} s ({100 * cpu / elapsed:.0f}% of one core), "
        f"{1e6 * cpu / total:.0f} us per message"
    )
    print(
        f"commit time: {commit_sum:.2f} s in all, {1000 * commit_sum / len(sizes):.1f} ms "
        f"per batch on average; peak RSS {rss_mb:.0f} MiB"
    )
