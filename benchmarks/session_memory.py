"""Daemon memory against samples per Active session: it must grow with sessions, not samples.

Starts a Mosquitto with the repo's config on a free port, a fresh database, and `chargeflow run`
as a separate process; opens N sessions (default 1,000), sends 1 sample to each and reads the
daemon's RSS, then sends samples until each session has taken M (default 1,000) and reads it
again. Prints both, the growth, and the growth per stored sample.

    python -m benchmarks.session_memory [--sessions 1000] [--samples 1000]
        [--database-url postgresql://postgres@127.0.0.1:5432/chargeflow_memory_bench]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from benchmarks.harness import daemon_environment, fleet_url, fresh_database, publish
from daemon.devbroker import free_port, start_broker

PREFIX = "chargeflow/v1"


def rss_mib(pid: int) -> float:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    anon, file = (int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile"))
    print(f"  (RSS: {anon:.1f} MiB anonymous, {file:.1f} MiB file-backed)")
    return int(status["VmRSS"].split()[0]) / 1024


async def stored(pool: asyncpg.Pool, want: int, daemon: asyncio.subprocess.Process) -> None:
    while (count := await pool.fetchval("SELECT count(*) FROM telemetry")) < want:
        if daemon.returncode is not None:
            raise RuntimeError("the daemon exited")
        print(f"\r  stored {count:,}/{want:,}", end="")
        await asyncio.sleep(0.5)
    print(f"\r  stored {want:,}/{want:,}" + " " * 20)


def sample(bike: str, session: str, seq: int, t0: datetime) -> tuple[str, bytes]:
    body = {
        "telemetry_id": str(uuid.uuid4()),
        "session_id": session,
        "seq": seq,
        "emitted_at": (t0 + timedelta(milliseconds=seq)).isoformat(),
        "energy_wh": 1.5,
        "distance_m": 3,
        "soc_pct": 50,
    }
    return f"{PREFIX}/bikes/{bike}/telemetry", json.dumps(body).encode()


async def main(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="cf-memory-bench-"))
    port, http_port = free_port(), free_port()
    broker = start_broker(port, data_dir)
    await fresh_database(args.database_url)
    env = daemon_environment(port, args.database_url, http_port, "memory")
    daemon = await asyncio.create_subprocess_exec(sys.executable, "-m", "daemon", "run", env=env)
    fleet = fleet_url(port)
    pool = None
    try:
        for _ in range(300):
            try:
                await asyncio.to_thread(
                    urllib.request.urlopen, f"http://127.0.0.1:{http_port}/readyz", timeout=1
                )
                break
            except OSError:
                await asyncio.sleep(0.1)
        pool = await asyncpg.create_pool(args.database_url, min_size=1, max_size=2)
        t0 = datetime.now(UTC) - timedelta(hours=1)
        run = uuid.uuid4().hex[:6]
        sessions = [(f"mem-{run}-{i:05d}", str(uuid.uuid4())) for i in range(args.sessions)]
        starts = (
            (
                f"{PREFIX}/bikes/{bike}/lifecycle",
                json.dumps(
                    {
                        "event": "ride_started",
                        "session_id": sid,
                        "rider_id": "r",
                        "occurred_at": t0.isoformat(),
                    }
                ).encode(),
            )
            for bike, sid in sessions
        )
        print(f"{args.sessions:,} sessions started, 1 sample each")
        await publish(fleet, starts, args.sessions, "sessions")
        await publish(fleet, (sample(b, s, 1, t0) for b, s in sessions), args.sessions, "sessions")
        await stored(pool, args.sessions, daemon)
        await asyncio.sleep(2)
        first = rss_mib(daemon.pid)
        rest = args.samples - 1
        total = args.sessions * rest
        print(f"then {args.samples:,} samples each ({total:,} more messages)")
        later = (sample(b, s, seq, t0) for seq in range(2, args.samples + 1) for b, s in sessions)
        await publish(fleet, later, total, "sessions")
        await stored(pool, args.sessions * args.samples, daemon)
        await asyncio.sleep(2)
        second = rss_mib(daemon.pid)
        growth = second - first
        print()
        n = f"{args.sessions:,} Active sessions"
        print(f"daemon RSS, {n} x 1 sample each: {first:7.1f} MiB")
        print(f"daemon RSS, {n} x {args.samples:,} samples each: {second:7.1f} MiB")
        print(
            f"growth: {growth:+.1f} MiB for {total:,} more stored samples"
            f" ({1024 * 1024 * growth / max(total, 1):.2f} bytes per sample)"
        )
    finally:
        if pool is not None:
            await pool.close()
        daemon.terminate()
        await asyncio.wait_for(daemon.wait(), timeout=30)
        broker.terminate()
        broker.wait(timeout=10)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/chargeflow_memory_bench",
    )
    asyncio.run(main(parser.parse_args()))
