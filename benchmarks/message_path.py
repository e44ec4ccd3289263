"""The way one telemetry message takes through the code on the warm path, module by module.

One bike's ride is started and its first sample committed (the cache is warm); then one more
sample goes from ``Pipeline.deliver`` to its PUBACK call, pipelined as ``chargeflow run``
does it, on a real PostgreSQL. A profile hook records every call that enters one of our
modules (``daemon/``, ``domain/``) from another place (another module of ours, or the event
loop resuming a task), in order. Printed: that sequence, how many entries, how many modules,
and each module entered more than once, with where from.

    python -m benchmarks.message_path [--database-url postgresql://postgres@127.0.0.1:5432/chargeflow_path]
        [--all]  # every entry, the value objects' constructors included

The README's "How it works" tells this way; this shows what the code does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg

from benchmarks.harness import fresh_database
from daemon.db.migrate import ensure_database, migrate
from daemon.db.store import Store
from daemon.metrics import Metrics
from daemon.mqtt.delivery import Delivery
from daemon.partition import Ownership
from daemon.pricing_text import parse_pricing
from domain.session_values import SessionPolicy
from tests.builders import bike_id, sample, start
from tests.integration.test_store import payload_of

PREFIX = "chargeflow/v1"
ROOT = Path(__file__).resolve().parents[1]
# Value objects and records: constructed on the way, they are not stops of it.
_VALUES = {"domain.telemetry", "domain.commands", "domain.session_values", "domain.seqs",
           "domain.events", "daemon.mqtt.delivery", "daemon.service.arrival"}  # fmt: skip


class _Acks:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def ack(self, message: Delivery) -> bool:
        self.sent.append(message.mid)
        return True


def _module(frame: FrameType | None) -> str | None:
    if frame is None:
        return None
    path = Path(frame.f_code.co_filename)
    try:
        rel = path.resolve().relative_to(ROOT)
    except ValueError:
        return None
    if rel.parts[0] not in {"daemon", "domain"}:
        return None
    return ".".join(rel.with_suffix("").parts)


def _pipeline(pool: asyncpg.Pool) -> Any:
    """This checkout's pipeline, as ``chargeflow run`` wires it (pipelined commits)."""
    text = resources.files("daemon").joinpath("pricing.toml").read_text()
    pricing = parse_pricing(text, "daemon/pricing.toml")
    policy = SessionPolicy(pricing_version=pricing.version)
    # As app.Daemon._wire gives them: which bikes it takes, the event the outbox relay wakes on.
    hooks: dict[str, Any] = {"takes": Ownership().takes, "on_commit": asyncio.Event().set}
    try:
        from daemon.service.ingestion import Ingestion
        from daemon.service.pipeline import Pipeline, PipelineConfig
    except ImportError:  # the commit before the service-layer split
        from daemon.service.pipeline import Pipeline  # type: ignore[no-redef]
        from daemon.service.unit_of_work import UnitOfWork

        uow = UnitOfWork(Store(pool), policy, pricing, prefix=PREFIX, max_payload_bytes=16_384)
        return Pipeline(uow, Metrics(), prefix=PREFIX, pipelined=True, **hooks)  # type: ignore[call-arg]
    ingestion = Ingestion(Store(pool), policy, pricing, prefix=PREFIX, max_payload_bytes=16_384)
    return Pipeline(ingestion, Metrics(), PipelineConfig(PREFIX, pipelined=True), **hooks)


async def _one_batch(p: Any, deliveries: list[Delivery]) -> None:
    for d in deliveries:
        p.deliver(d)
    batch = p.next_batch() if hasattr(p, "next_batch") else p._next_batch()
    await p.process(batch)
    await p.finish_in_flight()


async def trace(database_url: str, everything: bool) -> list[tuple[str, str]]:
    await fresh_database(database_url)
    await ensure_database(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn, timescaledb="off")
        p = _pipeline(pool)
        acks = _Acks()
        now = datetime.now(UTC)
        ride = start(bike_id(), at=now - timedelta(minutes=1))

        def delivery(mid: int, command: Any) -> Delivery:
            kind = "telemetry" if hasattr(command, "sample") else "lifecycle"
            topic = f"{PREFIX}/bikes/{command.bike_id}/{kind}"
            return Delivery(topic, payload_of(command), mid, 1, acks, now)  # type: ignore[arg-type]

        first = sample(ride, 1, "1.5", at=now - timedelta(seconds=30))
        await _one_batch(p, [delivery(1, ride), delivery(2, first)])
        warm = delivery(3, sample(ride, 2, "2.5", at=now - timedelta(seconds=20)))
        entries: list[tuple[str, str]] = []
        started: dict[int, FrameType] = {}  # held, so that no id is reused while tracing

        def hook(frame: FrameType, event: str, _arg: Any) -> None:
            if event != "call" or id(frame) in started:
                return  # a coroutine resumed is not a new entry: it was entered when called
            started[id(frame)] = frame
            callee = _module(frame)
            if callee is None or (not everything and callee in _VALUES):
                return
            caller = _module(frame.f_back) or "(outside)"  # the event loop, or this script
            if caller != callee and (entries == [] or entries[-1][1] != callee):
                entries.append((caller, callee))

        sys.setprofile(hook)
        try:
            await _one_batch(p, [warm])
        finally:
            sys.setprofile(None)
        assert acks.sent == [1, 2, 3], acks.sent
        return entries
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url", default="postgresql://postgres@127.0.0.1:5432/chargeflow_path"
    )
    parser.add_argument("--all", action="store_true", help="value objects' entries too")
    args = parser.parse_args()
    entries = asyncio.run(trace(args.database_url, args.all))
    for i, (caller, callee) in enumerate(entries, start=1):
        print(f"{i:3} {callee:36} from {caller}")
    times = Counter(callee for _, callee in entries)
    callers: dict[str, set[str]] = defaultdict(set)
    for caller, callee in entries:
        if caller != "(outside)":  # a task the event loop starts, or this script's own calls
            callers[callee].add(caller)
    several = {m: sorted(c) for m, c in callers.items() if len(c) > 1}
    print(f"\n{len(entries)} entries into {len(times)} modules")
    print("entered from more than one of our modules: "
          + ("; ".join(f"{m} (from {', '.join(c)})" for m, c in sorted(several.items()))
             or "none"))  # fmt: skip


if __name__ == "__main__":
    main()
