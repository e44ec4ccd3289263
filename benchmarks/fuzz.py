"""Hostile input against a running daemon: every bad message answered and kept, none dropped.

Starts a Mosquitto with the repo's config on a free port, a fresh database and `chargeflow run`
as a separate process, then, in two phases with the daemon restarted in between:

1. BAD: ``--messages`` generated bad payloads (default 100,000: truncated and mutated JSON,
   wrong types, huge and exotic numbers, deep nesting, long strings, invalid UTF-8, NUL and
   lone surrogates, oversized payloads, bike ids outside the pattern, impossible timestamps,
   samples of sessions that never start) are queued while the daemon is away;
2. VALID: as many valid messages (rides and charging sessions) are queued the same way;

and each time the daemon is started on the backlog and timed until every message is settled.
Prints messages sent, rejections kept (rows) and answered (on the rejections topics) by reason,
dropped (must be 0), the daemon's peak RSS in each phase, and the settle rate of bad against
valid traffic from the same run.

    python -m benchmarks.fuzz [--messages 100000] [--valid 100000] [--seed 7]
        [--daemon-pythonpath /path/to/another/checkout]
        [--database-url postgresql://postgres@127.0.0.1:5432/chargeflow_fuzz]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.harness import daemon_environment, fleet_url, fresh_database, publish
from daemon.devbroker import free_port, start_broker
from daemon.simulate import FleetPlan, json_payload, messages
from tests.peers import mqtt_client

PREFIX = "chargeflow/v1"
MAX_PAYLOAD = 16_384  # the daemon's default CHARGEFLOW_MAX_PAYLOAD_BYTES

# -- the generator ------------------------------------------------------------------------

_EXOTIC_NUMBERS = [
    "1e400", "-1e400", "1e-400", "1e999999999", "1E+3", "-0", "0.1234567", "1000000000.000001",
    "123456789012345678901234567890", "2147483648", str(2**70), "-1", "NaN", "Infinity",
    "-Infinity", "00012", "1.", ".5", "0x10", "1_000",
]  # fmt: skip
_WRONG_VALUES: list[object] = [
    None, True, False, [], {}, "x", "", -1, 0, 1.5, "12.5", "2026-13-45T00:00:00Z", [1, [2]],
    {"a": 1}, 2**70, -(2**70), 2**31, "\x00", "a" * 300, "2026-01-01T00:00:00",
    "0001-01-01T00:00:00+14:00", 1_700_000_000,
]  # fmt: skip
_BAD_BIKES = ["b.1", "b 1", "bïke", "a" * 65, "", "x!", "\u202e"]
_NUMBER_FIELDS = ["energy_wh", "distance_m", "soc_pct", "seq"]


def _valid_sample(at: datetime) -> dict[str, object]:
    return {
        "telemetry_id": str(uuid.uuid4()),
        "session_id": str(uuid.uuid4()),
        "seq": 1,
        "emitted_at": at.isoformat(),
        "energy_wh": 12.5,
        "distance_m": 3,
        "soc_pct": 50,
    }


def _valid_start(at: datetime) -> dict[str, object]:
    return {
        "event": "ride_started",
        "session_id": str(uuid.uuid4()),
        "rider_id": "rider-1",
        "occurred_at": at.isoformat(),
    }


KINDS = (
    "truncated", "mutated", "wrong_type", "exotic_number", "deep_nesting", "long_string",
    "invalid_utf8", "nul_or_surrogate", "oversized", "bad_bike_id", "bad_timestamp",
    "not_an_object", "unknown_event", "unknown_session",
)  # fmt: skip


def bad_messages(
    count: int, seed: int, prefix: str = PREFIX, kinds: tuple[str, ...] = KINDS
) -> Iterator[tuple[str, bytes, str]]:
    """``count`` bad messages (topic, payload, what kind of bad), deterministic for a seed; each
    payload differs from every other, so that each is kept as its own rejection."""
    rng = random.Random(seed)
    at = datetime.now(UTC) - timedelta(minutes=5)
    for i in range(count):
        bike = f"fuzz-{rng.randrange(500)}"
        telemetry = rng.random() < 0.6
        suffix = "telemetry" if telemetry else "lifecycle"
        doc = _valid_sample(at) if telemetry else _valid_start(at)
        raw = json.dumps(doc).encode()
        kind = rng.choice(kinds)
        if kind == "truncated":
            payload = raw[: rng.randrange(1, len(raw) - 1)]
        elif kind == "mutated":
            data = bytearray(raw)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            payload = bytes(data)
        elif kind == "wrong_type":
            doc[rng.choice(list(doc))] = rng.choice(_WRONG_VALUES)
            payload = json.dumps(doc).encode()
        elif kind == "exotic_number":
            field = rng.choice(_NUMBER_FIELDS) if telemetry else "last_seq"
            if not telemetry:
                doc = {"event": "ride_ended", "session_id": doc["session_id"],
                       "occurred_at": at.isoformat(), "last_seq": 0}  # fmt: skip
            doc[field] = "@@N@@"
            payload = json.dumps(doc).replace('"@@N@@"', rng.choice(_EXOTIC_NUMBERS)).encode()
        elif kind == "deep_nesting":
            depth = rng.choice([50, 1_000, 5_000])
            payload = (b'{"a":' * depth) + str(i).encode() + (b"}" * depth)
        elif kind == "long_string":
            field = "session_id" if telemetry else "rider_id"
            doc[field] = "x" * rng.choice([129, 1_000, 15_000])
            payload = json.dumps(doc).encode()
        elif kind == "invalid_utf8":
            cut = rng.randrange(1, len(raw) - 1)
            junk = bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randint(1, 8)))
            payload = raw[:cut] + junk + raw[cut:]
        elif kind == "nul_or_surrogate":
            field = "telemetry_id" if telemetry else "rider_id"
            doc[field] = "@@S@@"
            text = rng.choice(["a\\u0000b", "\\ud800", "\\udfff\\ud800", "\\u0000"])
            payload = json.dumps(doc).replace("@@S@@", text).encode()
        elif kind == "oversized":
            payload = raw + b" " * rng.randrange(MAX_PAYLOAD, 60_000)
        elif kind == "bad_bike_id":
            bike = rng.choice(_BAD_BIKES)
            payload = raw
        elif kind == "bad_timestamp":
            field = "emitted_at" if telemetry else "occurred_at"
            doc[field] = rng.choice(
                ["2026-01-01T00:00:00", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",
                 "2026-02-30T00:00:00Z", "yesterday", "2999-01-01T00:00:00Z", "1970-01-01T00:00Z"]
            )  # fmt: skip
            payload = json.dumps(doc).encode()
        elif kind == "not_an_object":
            payload = rng.choice([b"[%d]", b"%d", b'"x%d"', b"[null, %d]"]) % i
        elif kind == "unknown_event":
            doc["event"] = rng.choice(["ride_paused", "RIDE_STARTED", 7, None])
            payload = json.dumps(doc).encode()
        else:  # a well-formed sample, or end, of a session that never starts
            if not telemetry:
                doc = {"event": "ride_ended", "session_id": doc["session_id"],
                       "occurred_at": at.isoformat(), "last_seq": 1}  # fmt: skip
            payload = json.dumps(doc).encode()
        yield f"{prefix}/bikes/{bike}/{suffix}", payload, kind


# -- the harness --------------------------------------------------------------------------


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metrics(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return found


def settled(m: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> float:
    """Messages acknowledged with an outcome (a deferred message that is later rejected is
    counted once, when it was deferred)."""

    def total(name: str) -> float:
        return sum(m.get(name, {}).values())

    later = sum(
        v
        for labels, v in m.get("chargeflow_waiting_settled_total", {}).items()
        if dict(labels).get("outcome") != "applied"
    )
    return (
        total("chargeflow_messages_accepted_total")
        + total("chargeflow_messages_duplicate_total")
        + total("chargeflow_messages_deferred_total")
        + total("chargeflow_messages_dropped_total")
        + total("chargeflow_messages_rejected_total")
        - later
    )


class Daemon:
    def __init__(self, env: dict[str, str], http_port: int) -> None:
        self.env, self.http_port = env, http_port
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> float:
        # `python -m` puts the working directory first on sys.path: run from the checkout
        # whose daemon is wanted (PYTHONPATH alone would still find this one's).
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon", "run", env=self.env,
            cwd=self.env.get("PYTHONPATH") or None,
        )  # fmt: skip
        for _ in range(600):
            if self.proc.returncode is not None:
                raise RuntimeError("the daemon exited at start-up")
            try:
                await asyncio.to_thread(
                    urllib.request.urlopen, f"http://127.0.0.1:{self.http_port}/readyz", timeout=1
                )
                return time.perf_counter()
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("the daemon never became ready")

    async def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(self.proc.wait(), timeout=60)


async def drain(daemon: Daemon, want: int, what: str) -> tuple[float, float]:
    """Seconds from ready until ``want`` messages are settled, and the daemon's peak RSS."""
    began = await daemon.start()
    assert daemon.proc is not None
    while (done := settled(await asyncio.to_thread(metrics, daemon.http_port))) < want:
        if daemon.proc.returncode is not None:
            raise RuntimeError("the daemon exited")
        print(f"\r  {what}: settled {done:,.0f}/{want:,}", end="", flush=True)
        await asyncio.sleep(0.1)
    elapsed = time.perf_counter() - began
    print(f"\r  {what}: settled {want:,}/{want:,} in {elapsed:.1f} s" + " " * 10)
    return elapsed, peak_rss_mib(daemon.proc.pid)


async def outbox_drained(pool: asyncpg.Pool, timeout_s: float = 600) -> float:
    """Seconds until the daemon has published every answer it committed."""
    began = time.perf_counter()
    while await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"):
        if time.perf_counter() - began > timeout_s:
            break
        await asyncio.sleep(0.2)
    return time.perf_counter() - began


async def listen(url: str, answered: Counter[str], stop: asyncio.Event) -> None:
    async with mqtt_client(url) as client:
        await client.subscribe(f"{PREFIX}/bikes/+/rejections", qos=1)
        async with asyncio.timeout(None):
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes | bytearray)
                answered[json.loads(payload)["reason"]] += 1
                if stop.is_set():
                    return


async def main(args: argparse.Namespace) -> int:
    data_dir = Path(tempfile.mkdtemp(prefix="cf-fuzz-"))
    port, http_port = free_port(), free_port()
    broker = start_broker(port, data_dir)
    await fresh_database(args.database_url)
    env = daemon_environment(
        port, args.database_url, http_port, "fuzz", CHARGEFLOW_FINALIZE_GRACE_S="2"
    )
    if args.daemon_pythonpath:  # another checkout's daemon, for a side-by-side comparison
        env["PYTHONPATH"] = args.daemon_pythonpath
    fleet = fleet_url(port)
    answered: Counter[str] = Counter()
    stop_listening = asyncio.Event()
    listener = asyncio.create_task(listen(fleet, answered, stop_listening))
    daemon = Daemon(env, http_port)
    pool = None
    try:
        await daemon.start()  # the broker now keeps a persistent session for the daemon
        await daemon.stop()
        kinds: Counter[str] = Counter()

        def bad() -> Iterator[tuple[str, bytes]]:
            for topic, payload, kind in bad_messages(args.messages, args.seed, kinds=args.kinds):
                kinds[kind] += 1
                yield topic, payload

        print(f"phase 1: {args.messages:,} bad messages queued while the daemon is away")
        sent_bad = await publish(fleet, bad(), args.messages, "bad")
        bad_s, bad_rss = await drain(daemon, sent_bad, "bad")
        pool = await asyncpg.create_pool(args.database_url, min_size=1, max_size=2)
        answered_in = await outbox_drained(pool)
        await asyncio.sleep(args.finalize_wait)  # deferred samples settle after the grace
        await outbox_drained(pool)
        m = await asyncio.to_thread(metrics, http_port)
        await daemon.stop()

        plan = FleetPlan(max(1, args.valid // 102), 1, 100, PREFIX, seed=args.seed)
        valid_total = plan.bikes * (plan.samples_per_session + 2)
        start = datetime.now(UTC) - timedelta(minutes=30)
        print(f"phase 2: {valid_total:,} valid messages queued while the daemon is away")
        sent_valid = await publish(
            fleet,
            ((t, json_payload(p)) for t, p in messages(plan, start)),
            valid_total,
            "valid",
        )
        valid_s, valid_rss = await drain(daemon, sent_valid, "valid")
        await daemon.stop()

        kept = dict(
            await pool.fetch(
                "SELECT reason, count(*) FROM rejected_messages GROUP BY reason ORDER BY 2 DESC"
            )
        )
        unanswerable = await pool.fetchval(
            "SELECT count(*) FROM rejected_messages WHERE bike_id IS NULL"
        )
        pending = await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        for _ in range(100):  # let the listener catch up with the outbox
            if sum(answered.values()) >= sum(kept.values()) - unanswerable:
                break
            await asyncio.sleep(0.1)
        stop_listening.set()

        dropped = sum(m.get("chargeflow_messages_dropped_total", {}).values())
        print()
        print(f"bad messages sent: {sent_bad:,}, by kind of bad:")
        for kind, n in sorted(kinds.items()):
            print(f"  {kind:<18} {n:>8,}")
        print(f"{'reason':<24} {'kept (rows)':>12} {'answered':>10}")
        for reason, n in kept.items():
            print(f"  {reason:<22} {n:>12,} {answered[reason]:>10,}")
        print(f"  {'total':<22} {sum(kept.values()):>12,} {sum(answered.values()):>10,}")
        print(f"kept without a bike to answer (empty bike id in the topic): {unanswerable:,}")
        print(f"outbox rows not yet published: {pending:,}")
        print(f"every answer published {answered_in:.1f} s after the last bad message settled")
        accepted = sum(m.get("chargeflow_messages_accepted_total", {}).values())
        print(f"accepted (mutations that happen to be valid, e.g. a start): {accepted:.0f}")
        print(f"dropped: {dropped:.0f}")
        print(f"{'phase':<8} {'messages':>9} {'seconds':>8} {'msg/s':>8} {'peak RSS MiB':>13}")
        print(f"{'bad':<8} {sent_bad:>9,} {bad_s:>8.1f} {sent_bad / bad_s:>8,.0f} {bad_rss:>13.0f}")
        print(
            f"{'valid':<8} {sent_valid:>9,} {valid_s:>8.1f} {sent_valid / valid_s:>8,.0f} "
            f"{valid_rss:>13.0f}"
        )
        ratio = (sent_bad / bad_s) / (sent_valid / valid_s)
        print(f"bad settled at {ratio:.2f}x the rate of valid traffic")
        return 1 if dropped else 0
    finally:
        stop_listening.set()
        listener.cancel()
        if pool is not None:
            await pool.close()
        if daemon.proc is not None and daemon.proc.returncode is None:
            daemon.proc.kill()
        broker.terminate()
        broker.wait(timeout=10)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--valid", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--finalize-wait", type=float, default=4.0)
    parser.add_argument(
        "--kinds",
        type=lambda text: tuple(text.split(",")),
        default=KINDS,
        help=f"comma-separated kinds of bad to send (default: all of {', '.join(KINDS)})",
    )
    parser.add_argument(
        "--daemon-pythonpath", help="run the daemon from another checkout (e.g. a git worktree)"
    )
    parser.add_argument(
        "--database-url", default="postgresql://postgres@127.0.0.1:5432/chargeflow_fuzz"
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
