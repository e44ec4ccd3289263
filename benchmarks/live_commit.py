"""Where a live batch's commit time goes, at rest: the database's share of the live lag.

Live traffic is many bikes with a sample or two each, so a batch of N messages locks N bikes,
copies N samples and updates N session summaries. This builds a fresh database with
``--bikes`` Active sessions, then decides and commits ``--batches`` batches of ``--batch``
samples, each for distinct bikes chosen at random, through the daemon's own unit of work
(decided on the cache, as the pipeline does, then locked, checked, written and committed),
with no broker and no other work in the process. Prints the decision and the commit, and
each statement's share, as p50 and p99 (the first tenth left out as warm-up).

    python -m benchmarks.live_commit [--batch 121] [--bikes 10000] [--batches 200]
        [--database-url postgresql://postgres@127.0.0.1:5432/chargeflow_live_commit]

Compare with the lag benchmark's ``commit ms`` (``python -m benchmarks.throughput
--skip-drain``): what exceeds this is time the commit's round trips waited for the daemon's
event loop, or for a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import asyncpg.connection
import asyncpg.transaction

from benchmarks.harness import fresh_database
from daemon.config import DEFAULT_PRICING_FILE
from daemon.db.migrate import ensure_database, migrate
from daemon.db.pricing import PricingRecords
from daemon.db.store import Store
from daemon.documents import utc_text
from daemon.mqtt.schemas import decode
from daemon.pricing_text import parse_pricing
from daemon.service.arrival import Arrival
from daemon.service.ingestion import Ingestion
from domain.session_values import SessionPolicy

PREFIX = "chargeflow/v1"
_SPANS: dict[str, list[float]] = {}


def _timed(name: str, call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return await call(*args, **kwargs)
        finally:
            _SPANS.setdefault(name, []).append(time.perf_counter() - began)

    return timed


def _statements_timed() -> None:
    """Each round trip of the commit, by the asyncpg call that makes it."""
    connection = asyncpg.connection.Connection
    for name, label in [("fetch", "lock the bikes (fetch)"),
                        ("copy_to_table", "COPY the samples"),
                        ("execute", "update the summaries (execute)")]:  # fmt: skip
        setattr(connection, name, _timed(label, getattr(connection, name)))
    transaction = asyncpg.transaction.Transaction
    transaction.start = _timed("BEGIN", transaction.start)  # type: ignore[method-assign]
    transaction.commit = _timed("COMMIT", transaction.commit)  # type: ignore[method-assign]


_COLLECTIONS: dict[int, list[float]] = {}
_COLLECTING: list[float] = []


def _collections_timed(phase: str, info: dict[str, int]) -> None:
    """gc.callbacks: how long each collection of each generation took."""
    if phase == "start":
        _COLLECTING[:] = [time.perf_counter()]
    elif _COLLECTING:
        _COLLECTIONS.setdefault(info["generation"], []).append(time.perf_counter() - _COLLECTING[0])


def _arrival(topic: str, document: dict[str, Any], now: datetime) -> Arrival:
    payload = json.dumps(document).encode()
    return Arrival(topic, payload, now, decode(topic, payload, PREFIX, 16_384))


async def _open_sessions(ingestion: Ingestion, bikes: list[str], now: datetime) -> dict[str, str]:
    sessions = {bike: str(uuid.uuid4()) for bike in bikes}
    begun = utc_text(now - timedelta(minutes=1))
    starts = [
        _arrival(
            f"{PREFIX}/bikes/{bike}/lifecycle",
            {"event": "ride_started", "session_id": sessions[bike], "rider_id": "rider-1",
             "occurred_at": begun},
            now,
        )
        for bike in bikes
    ]  # fmt: skip
    for i in range(0, len(starts), 1000):
        await ingestion.commit_batch(starts[i : i + 1000])
    return sessions


def _percentiles(values: list[float]) -> str:
    kept = sorted(values[len(values) // 10 :])
    p99 = kept[min(len(kept) - 1, int(0.99 * len(kept)))]
    return f"p50 {1000 * statistics.median(kept):6.2f} ms   p99 {1000 * p99:6.2f} ms"


async def run(args: argparse.Namespace) -> None:
    await fresh_database(args.database_url)
    await ensure_database(args.database_url)
    pool = await asyncpg.create_pool(args.database_url, min_size=2, max_size=4)
    assert pool is not None
    async with pool.acquire() as conn:
        await migrate(conn, 7, 30, "auto")
    pricing = parse_pricing(DEFAULT_PRICING_FILE.read_text(encoding="utf-8"))
    store = Store(pool)
    await PricingRecords(store.pool).record(pricing, datetime.now(UTC))
    policy = SessionPolicy(pricing_version=pricing.version)
    ingestion = Ingestion(store, policy, pricing, prefix=PREFIX, max_payload_bytes=16_384)
    now = datetime.now(UTC)
    bikes = [f"bike-{i:05d}" for i in range(args.bikes)]
    sessions = await _open_sessions(ingestion, bikes, now)
    seqs = dict.fromkeys(bikes, 0)
    rng = random.Random(1)
    _statements_timed()
    gc.collect()
    gc.freeze()  # as the daemon does after start-up (daemon.app.run_daemon)
    gc.callbacks.append(_collections_timed)
    decided, committed, commit_cpu = [], [], []
    for _ in range(args.batches):
        arrivals = []
        for bike in rng.sample(bikes, args.batch):
            seqs[bike] += 1
            document = {
                "telemetry_id": str(uuid.uuid4()), "session_id": sessions[bike],
                "seq": seqs[bike], "emitted_at": utc_text(now), "energy_wh": 12.5,
            }  # fmt: skip
            arrivals.append(_arrival(f"{PREFIX}/bikes/{bike}/telemetry", document, now))
        began = time.perf_counter()
        batch = ingestion.decide_ahead(arrivals)
        decided.append(time.perf_counter() - began)
        began, cpu = time.perf_counter(), time.process_time()
        if batch is None:
            batch = await ingestion.begin_batch(arrivals)
        await ingestion.finish_batch(batch)
        committed.append(time.perf_counter() - began)
        commit_cpu.append(time.process_time() - cpu)
    await pool.close()
    print(f"{args.batches} batches of {args.batch} samples for distinct bikes "
          f"(of {args.bikes:,} with an Active session), PostgreSQL at rest:")  # fmt: skip
    print(f"  {'decide on the cache':<32} {_percentiles(decided)}")
    print(f"  {'commit: lock, write, commit':<32} {_percentiles(committed)}")
    print(f"  {'  of which the daemon side CPU':<32} {_percentiles(commit_cpu)}")
    for name, spans in _SPANS.items():
        print(f"    {name:<30} {_percentiles(spans)}")
    for generation, spans in sorted(_COLLECTIONS.items()):
        print(f"  garbage collections of generation {generation}: {len(spans)}, "
              f"longest {1000 * max(spans):.2f} ms, {1000 * sum(spans):.1f} ms in all")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=121)
    parser.add_argument("--bikes", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument(
        "--database-url", default="postgresql://postgres@127.0.0.1:5432/chargeflow_live_commit"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
