"""Throughput side by side: ChargeFlow against the MQTT clients' own ceiling, in one run.

One Mosquitto (the repo's config, on a free port) and one PostgreSQL. Every contender has a
persistent session subscribed to the bikes' topics before one backlog of ``--messages``
telemetry samples (plus each session's start and end) is published; the broker queues a copy
for each. Then, one at a time, each contender is started and drains its copy:

- ``paho 3.1.1`` / ``paho v5``: paho's own loop, a callback that only counts (the ceiling);
- ``aiomqtt``: ``async for message in client.messages``, counting;
- ``the daemon's connection``: ``daemon.mqtt.connection`` at v5 (the ``mqtt5`` codec) and at
  3.1.1 (ours), acknowledging every message;
- ``naive bridge``: aiomqtt, ``json.loads`` and one autocommitted INSERT per message (what a
  hand-rolled bridge does, without validation, sessions or ack after commit);
- ``ChargeFlow``: ``chargeflow run`` as its own process (validation, sessions, COPY, outbox,
  ack after commit), then ``chargeflow run --workers N``.

For each: msg/s from its first message to its last settled one, the ratio to paho 3.1.1, its
CPU per message over that span (for ChargeFlow: the whole process tree, less what a start on an
empty queue costs), and the broker's CPU per message. For ChargeFlow also the batch sizes.

Then the lag: for each count of ``--live-bikes`` (e.g. 10000,100000, side by side), that many
ride starts published while the daemon is stopped and timed from its start to the last one
committed (starts/s), with ``--warm-up yes`` one sample to each (untimed), then samples
offered at a steady rate
(each stamped with its publish time) for ``--lag-seconds``; p50/p99 from publish to committed.
Commits are read every 20 ms from the daemon's accepted counter (the i-th sample published
counts as committed once i samples are), so lags are good to about 20 ms.

    python -m benchmarks.throughput [--messages 50000] [--bikes 50] [--workers 2]
        [--rates 2000,4000,5000] [--live-bikes 10000,100000] [--lag-seconds 10] [--share-lag]
        [--warm-up no,yes]
        [--baseline /path/to/another/checkout] [--skip-lag]
        [--database-url postgresql://postgres@127.0.0.1:5432/chargeflow_throughput]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from benchmarks.harness import DAEMON, FLEET, daemon_environment, fleet_url, fresh_database, publish
from daemon.devbroker import free_port, start_broker
from daemon.simulate import FleetPlan, json_payload, messages
from tests.e2e.helpers import sees_the_other_claims
from tests.peers import mqtt_client

PREFIX = "chargeflow/v1"
FILTERS = [f"{PREFIX}/bikes/+/lifecycle", f"{PREFIX}/bikes/+/telemetry"]
SESSION_EXPIRY_S = 3600
RECEIVE_MAXIMUM = 1000  # as the daemon asks
_TICK = os.sysconf("SC_CLK_TCK")


# -- CPU of a process and its descendants (Linux /proc) ------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(p) for p in task.read_text().split()]
    return found


def _tree(pid: int) -> list[int]:
    """A process and its live descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            todo += _children(p)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process and all its live descendants."""
    total = 0.0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return total


# -- the raw contenders, each run as `python -m benchmarks.throughput drain ...` -------------


def _drain_paho(args: argparse.Namespace, v5: bool) -> dict[str, float]:
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    state: dict[str, float] = {"count": 0}
    expect = args.expect

    def on_connect(client: paho.Client, userdata: object, flags: object, rc: object,
                   props: object = None) -> None:  # fmt: skip
        client.subscribe([(f, 1) for f in FILTERS])

    def on_subscribe(client: paho.Client, *rest: object) -> None:
        if expect == 0:
            client.disconnect()  # priming: the persistent session now exists

    def on_message(client: paho.Client, userdata: object, message: object) -> None:
        n = state["count"] = state["count"] + 1
        if n == 1:
            state["first_wall"], state["first_cpu"] = time.time(), time.process_time()
        if n >= expect:
            state["last_wall"], state["last_cpu"] = time.time(), time.process_time()
            client.disconnect()

    if v5:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=args.client_id,
                             protocol=paho.MQTTv5)  # fmt: skip
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        connect_kw: dict[str, object] = {"clean_start": False, "properties": props}
    else:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=args.client_id,
                             protocol=paho.MQTTv311, clean_session=False)  # fmt: skip
        connect_kw = {}
    client.username_pw_set(*DAEMON)
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect("127.0.0.1", args.port, keepalive=60, **connect_kw)
    client.loop_forever()
    return state


async def _drain_aiomqtt(args: argparse.Namespace, insert: bool) -> dict[str, float]:
    state: dict[str, float] = {"count": 0}
    url = f"mqtt://{DAEMON[0]}:{DAEMON[1]}@127.0.0.1:{args.port}"
    db = await asyncpg.connect(args.database_url) if insert else None
    async with mqtt_client(url, args.client_id, SESSION_EXPIRY_S) as client:
        await client.subscribe([(f, 1) for f in FILTERS])
        if args.expect == 0:
            return state
        async for message in client.messages:
            n = state["count"] = state["count"] + 1
            if n == 1:
                state["first_wall"], state["first_cpu"] = time.time(), time.process_time()
            if db is not None:  # the hand-rolled bridge: parse, one INSERT, autocommit
                assert isinstance(message.payload, bytes)
                doc = json.loads(message.payload)
                if "telemetry_id" in doc:
                    await db.execute(
                        "INSERT INTO naive_telemetry VALUES ($1, $2, $3, $4, $5)",
                        message.topic.value, doc["telemetry_id"], doc["session_id"],
                        doc["seq"], str(doc["energy_wh"]),
                    )  # fmt: skip
                else:
                    await db.execute(
                        "INSERT INTO naive_lifecycle VALUES ($1, $2)",
                        message.topic.value, message.payload.decode(),
                    )  # fmt: skip
            if n >= args.expect:
                state["last_wall"], state["last_cpu"] = time.time(), time.process_time()
                break
    if db is not None:
        await db.close()
    return state


async def _drain_connection(args: argparse.Namespace, level: str) -> dict[str, float]:
    """The daemon's own connection (daemon.mqtt.connection: an asyncio protocol on the
    ``mqtt5`` codec for v5, on ours for 3.1.1), acknowledging each message as the pipeline does
    after commit, on the daemon's event loop."""
    from daemon.mqtt.connection import Connection
    from daemon.mqtt.delivery import Delivery
    from daemon.mqtt.packets import codec_for

    state: dict[str, float] = {"count": 0}
    done = asyncio.Event()
    expect = args.expect

    def deliver(delivery: Delivery) -> None:
        n = state["count"] = state["count"] + 1
        if n == 1:
            state["first_wall"], state["first_cpu"] = time.time(), time.process_time()
        delivery.ack()
        if n >= expect:
            state["last_wall"], state["last_cpu"] = time.time(), time.process_time()
            done.set()

    codec = codec_for(level)  # type: ignore[arg-type]
    connect = codec.connect(
        args.client_id, username=DAEMON[0], password=DAEMON[1], keep_alive=60,
        session_expiry_s=SESSION_EXPIRY_S, receive_max=RECEIVE_MAXIMUM,
    )  # fmt: skip
    connection = Connection(codec, connect, deliver, keep_alive=60)
    loop = asyncio.get_running_loop()
    await loop.create_connection(lambda: connection, args.host, args.port)
    await connection.connack
    await connection.subscribe(FILTERS)
    if expect:
        await done.wait()
    connection.disconnect()
    await connection.closed
    return state


def drain_main(args: argparse.Namespace) -> None:
    if args.contender in ("paho311", "paho5"):
        state = _drain_paho(args, v5=args.contender == "paho5")
    elif args.contender in ("conn5", "conn311"):
        import uvloop

        state = uvloop.run(_drain_connection(args, "5" if args.contender == "conn5" else "3.1.1"))
    else:
        state = asyncio.run(_drain_aiomqtt(args, insert=args.contender == "naive"))
    print(json.dumps(state))


# -- the steady publisher, run as `python -m benchmarks.throughput steady ...` --------------


def live_sessions(bikes: int, seed: int) -> list[tuple[str, str]]:
    """(bike id, session id) of the Active sessions the lag phase keeps."""
    return [
        (f"live-{seed % 10_000}-{b:05d}", str(uuid.uuid5(uuid.NAMESPACE_OID, f"{seed}-{b}")))
        for b in range(bikes)
    ]


def starts(bikes: int, seed: int) -> Iterator[tuple[str, bytes]]:
    at = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    for bike, sid in live_sessions(bikes, seed):
        body = {"event": "ride_started", "session_id": sid, "rider_id": "r", "occurred_at": at}
        yield f"{PREFIX}/bikes/{bike}/lifecycle", json_payload(body)


def warm_samples(bikes: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """Sample 1 of every Active session: the warm-up before a timed window (``--warm-up``)."""
    at = (datetime.now(UTC) - timedelta(seconds=4)).isoformat()
    for bike, sid in live_sessions(bikes, seed):
        body = {
            "telemetry_id": str(uuid.uuid4()), "session_id": sid, "seq": 1, "emitted_at": at,
            "energy_wh": 1.25, "distance_m": 2.5, "soc_pct": 50,
        }  # fmt: skip
        yield f"{PREFIX}/bikes/{bike}/telemetry", json_payload(body)


def _mqtt_string(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _mqtt_packet(first: int, body: bytes) -> bytes:
    """An MQTT control packet: the first byte, the remaining length (varint), the body."""
    head, n = bytearray([first]), len(body)
    while True:
        n, digit = divmod(n, 128)
        head.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(head) + body


def _steady(args: argparse.Namespace) -> None:
    """Publish samples on schedule, QoS 1, MQTT 3.1.1 written by hand on a plain socket.

    The load generator shares the two cores with what it measures, so it must cost little: paho
    took about a third of a core per 5,000 msg/s here (its own PUBACKs came seconds late at
    10,000 msg/s, which hid whatever the daemon did). Here every PUBLISH is encoded before the
    clock starts, the due ones are written with one ``sendall`` per millisecond, and a thread
    counts the broker's PUBACKs (it acknowledges QoS 1 in the order received)."""
    import socket
    import threading

    sessions = live_sessions(args.bikes, args.seed)
    total = int(args.rate * args.seconds)
    # Every payload is built before the clock starts, stamped with its planned send time.
    # Several publishers split the bikes (a bike's samples all from one, in order) and keep
    # one clock: sample i is due at start_at + i / rate whichever publisher sends it.
    start_at = args.start_at
    packets, due = [], []
    for i in range(total):
        if (i % len(sessions)) % args.parts != args.part:
            continue
        bike, sid = sessions[i % len(sessions)]
        body = {
            "telemetry_id": str(uuid.uuid4()), "session_id": sid,
            "seq": i // len(sessions) + args.first_seq,
            "emitted_at": datetime.fromtimestamp(start_at + i / args.rate, UTC).isoformat(),
            "energy_wh": 1.25, "distance_m": 2.5, "soc_pct": 50,
        }  # fmt: skip
        topic = _mqtt_string(f"{PREFIX}/bikes/{bike}/telemetry")
        mid = len(packets) % 65535 + 1
        packets.append(_mqtt_packet(0x32, topic + mid.to_bytes(2, "big") + json_payload(body)))
        due.append(i / args.rate)
    sock = socket.create_connection(("127.0.0.1", args.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connect = (
        _mqtt_string("MQTT") + bytes([4, 0xC2]) + (0).to_bytes(2, "big")  # 3.1.1, user+pass+clean
        + _mqtt_string(f"steady-{args.seed}-{args.part}-{uuid.uuid4().hex[:6]}")
        + _mqtt_string(FLEET[0]) + _mqtt_string(FLEET[1])
    )  # fmt: skip
    sock.sendall(_mqtt_packet(0x10, connect))
    connack = b""
    while len(connack) < 4:
        connack += sock.recv(4 - len(connack))
    if connack[0] != 0x20 or connack[3] != 0:
        raise RuntimeError(f"the broker refused the publisher: CONNACK {connack.hex()}")
    acked_at: list[float] = []

    def count_acks() -> None:
        pending = 0
        while len(acked_at) < len(packets):
            chunk = sock.recv(65536)
            if not chunk:
                return
            now = time.time()
            pending += len(chunk)  # PUBACKs only, 4 bytes each (0x40 0x02 id)
            acked_at.extend([now] * (pending // 4))
            pending %= 4

    reader = threading.Thread(target=count_acks, daemon=True)
    reader.start()
    time.sleep(max(0.0, start_at - time.time()))
    sent_at: list[float] = []
    began = time.perf_counter() - (time.time() - start_at)
    sent, cpu_before, wall_before = 0, time.process_time(), time.time()
    while sent < len(packets):
        now = time.perf_counter() - began
        upto = sent
        while upto < len(packets) and due[upto] <= now and upto - len(acked_at) < 65535:
            upto += 1
        if upto > sent:
            sock.sendall(b"".join(packets[sent:upto]))
            sent_at.extend([time.time()] * (upto - sent))
            sent = upto
        time.sleep(0.0005)
    reader.join(timeout=120)
    cpu = (time.process_time() - cpu_before) / (time.time() - wall_before)
    took = sorted(ack - at for ack, at in zip(acked_at, sent_at, strict=False))
    print(
        f"  publisher: {len(packets):,} sent, broker's PUBACK after p50 "
        f"{1000 * took[len(took) // 2]:.1f} ms, p99 {1000 * took[int(0.99 * len(took))]:.1f} ms, "
        f"{100 * cpu:.0f} % of a core while publishing",
        file=sys.stderr,
    )
    sock.sendall(bytes([0xE0, 0]))  # DISCONNECT
    sock.close()
    Path(args.out).write_text(json.dumps(sent_at))


# -- ChargeFlow as its own process(es) ------------------------------------------------------


class ChargeFlow:
    """``chargeflow run`` (``--workers N`` when workers > 1) from a checkout."""

    def __init__(self, env: dict[str, str], http_port: int, workers: int, cwd: str | None):
        self.env, self.http_port, self.workers, self.cwd = env, http_port, workers, cwd
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def ports(self) -> list[int]:
        return [self.http_port + i for i in range(self.workers)]

    async def start(self) -> None:
        extra = ["--workers", str(self.workers)] if self.workers > 1 else []
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon", "run", *extra, env=self.env, cwd=self.cwd
        )
        for port in self.ports:
            for _ in range(600):
                if self.proc.returncode is not None:
                    raise RuntimeError("the daemon exited at start-up")
                try:
                    await asyncio.to_thread(
                        urllib.request.urlopen, f"http://127.0.0.1:{port}/readyz", timeout=1
                    )
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            else:
                raise RuntimeError("the daemon never became ready")

    def cpu_s(self) -> float:
        assert self.proc is not None
        return tree_cpu_s(self.proc.pid)

    def rss_mib(self) -> float:
        """Resident memory of the largest process of the tree (one worker), MiB."""
        assert self.proc is not None
        return max(_rss_kib(pid) for pid in _tree(self.proc.pid)) / 1024

    async def wait_for_partitions(self, within_s: float = 30.0) -> None:
        """With several bike-affine workers: until each sees the others' claims (before then
        a worker takes every bike, and what it caches the owner reloads)."""
        if self.workers == 1 or "CHARGEFLOW_SHARE_GROUP" in self.env:
            return
        deadline = time.monotonic() + within_s
        while not all(map(sees_the_other_claims, self.ports)):
            if time.monotonic() > deadline:
                raise RuntimeError("the workers never saw each other's partition claims")
            await asyncio.sleep(0.1)

    def metric(self, name: str) -> float:
        """The sum of a metric's samples over every worker. A line scan, not the exposition
        parser: the lag phase reads this 50 times a second on the cores it measures."""
        total = 0.0
        for port in self.ports:
            # Only the metric asked for: the whole exposition 50 times a second cost each
            # daemon a third of a core, and more with two daemons on the same two cores.
            url = f"http://127.0.0.1:{port}/metrics?name%5B%5D={name}"
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            for line in text.splitlines():
                if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
                    total += float(line.rpartition(" ")[2])
        return total

    async def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(self.proc.wait(), timeout=60)


# -- the run ----------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    messages: int
    seconds: float
    cpu_s: float
    broker_cpu_s: float
    batch_mean: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


@dataclass
class Contender:
    name: str
    kind: str  # paho311, paho5, aiomqtt, conn5, conn311, naive, chargeflow
    client_id: str
    workers: int = 1
    checkout: str | None = None
    database_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    daemon: ChargeFlow | None = None
    startup_cpu_s: float = 0.0


def _database(base: str, suffix: str) -> str:
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}_{suffix}"))


async def _run_drainer(contender: Contender, port: int, expect: int, db: str) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.throughput", "drain", contender.kind,
        "--port", str(port), "--client-id", contender.client_id, "--expect", str(expect),
        "--database-url", db, stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=900)
    if proc.returncode:
        raise RuntimeError(f"{contender.name} exited with {proc.returncode}")
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


async def prime(c: Contender, port: int, args: argparse.Namespace, group: str) -> None:
    """Give the contender its persistent session (for ChargeFlow: its database too)."""
    if c.kind != "chargeflow":
        await _run_drainer(c, port, 0, args.database_url)
        return
    assert c.database_url is not None
    await fresh_database(c.database_url)
    env = daemon_environment(port, c.database_url, free_port(), c.name)
    env["CHARGEFLOW_CLIENT_ID"] = c.client_id
    env.update(c.env)
    if c.workers > 1:
        env["CHARGEFLOW_SHARE_GROUP"] = group
        env["CHARGEFLOW_HTTP_PORT"] = str(_port_block(c.workers))
    c.daemon = ChargeFlow(env, int(env["CHARGEFLOW_HTTP_PORT"]), c.workers, c.checkout)
    before = time.perf_counter()
    await c.daemon.start()
    c.startup_cpu_s = c.daemon.cpu_s()  # what starting on an empty queue costs
    await c.daemon.stop()
    print(f"  {c.name}: started once ({time.perf_counter() - before:.1f} s, "
          f"{c.startup_cpu_s:.2f} s CPU), session kept by the broker")  # fmt: skip


def _port_block(n: int) -> int:
    """A first port with the next n - 1 free as well (worker i listens on first + i)."""
    for _ in range(100):
        first = free_port()
        if all(_free(first + i) for i in range(1, n)):
            return first
    raise RuntimeError("no block of free ports")


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _broker_cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds of the broker: one Mosquitto, or every node of a NATS cluster."""
    return sum(tree_cpu_s(pid) for pid in pids)


async def run_contender(
    c: Contender, port: int, total: int, bikes: int, broker_pids: Sequence[int],
    args: argparse.Namespace,
) -> Result:  # fmt: skip
    broker_before = _broker_cpu_s(broker_pids)
    if c.kind != "chargeflow":
        db = args.database_url
        state = await _run_drainer(c, port, total, db)
        if state["count"] < total:
            raise RuntimeError(f"{c.name} received {state['count']} of {total}")
        return Result(
            c.name, total, state["last_wall"] - state["first_wall"],
            state["last_cpu"] - state["first_cpu"], _broker_cpu_s(broker_pids) - broker_before,
        )  # fmt: skip
    assert c.daemon is not None
    assert c.database_url is not None
    pool = await asyncpg.create_pool(c.database_url, min_size=1, max_size=1)
    try:
        await c.daemon.start()
        pg_before = _postgres_cpu_s()
        profiler = None
        if args.profile and c.workers == 1 and c.checkout is None:
            assert c.daemon.proc is not None
            profiler = await asyncio.create_subprocess_exec(
                "py-spy", "record", "--pid", str(c.daemon.proc.pid), "--format", "raw",
                "--rate", "200", "--nonblocking", "-o", args.profile,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        while (
            await pool.fetchval("SELECT count(*) FROM sessions WHERE state = 'finalized'") < bikes
        ):
            assert c.daemon.proc is not None
            if c.daemon.proc.returncode is not None:
                raise RuntimeError("the daemon exited")
            await asyncio.sleep(0.02)
        done_wall, cpu, pg_cpu = time.time(), c.daemon.cpu_s(), _postgres_cpu_s() - pg_before
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            await profiler.wait()
            print(f"  py-spy profile (collapsed stacks) of the drain: {args.profile}")
        broker_cpu = _broker_cpu_s(broker_pids) - broker_before
        first = await pool.fetchval("SELECT min(received_at) FROM telemetry")
        stored = await pool.fetchval("SELECT count(*) FROM telemetry")
        batches = c.daemon.metric("chargeflow_batch_size_count")
        batched = c.daemon.metric("chargeflow_batch_size_sum")
        await c.daemon.stop()
    finally:
        await pool.close()
    result = Result(
        c.name, total, done_wall - first.timestamp(), cpu - c.startup_cpu_s, broker_cpu,
        batched / batches if batches else None,
    )  # fmt: skip
    result.notes.append(
        f"{stored:,} samples stored, {bikes} sessions finalized; PostgreSQL CPU "
        f"{1e6 * pg_cpu / total:.0f} us/msg (every postgres process, start-up included)"
    )
    return result


async def lag(
    args: argparse.Namespace,
    port: int,
    rate: float,
    workers: int,
    seed: int,
    broker_pid: int,
    pipelined: str = "true",
    bikes: int = 10_000,
    warm: bool = False,
) -> str:
    """p50/p99 publish-to-commit of samples offered at a steady rate to Active sessions."""
    db = _database(args.database_url, f"lag{workers}")
    await fresh_database(db)
    http = _port_block(workers)
    env = daemon_environment(
        port, db, http, f"lag{workers}", CHARGEFLOW_MQTT_PROTOCOL=args.protocols[-1],
        CHARGEFLOW_PIPELINED_COMMITS=pipelined,
    )  # fmt: skip
    if workers > 1 and args.share_lag:
        env["CHARGEFLOW_SHARE_GROUP"] = f"lag-{uuid.uuid4().hex[:6]}"
    # Otherwise `--workers N` runs bike-affine partitions (the default way to run several).
    daemon = ChargeFlow(env, http, workers, None)
    await daemon.start()
    try:
        # The starts as a backlog (a morning's first rides, or the catch-up after an outage):
        # the daemon's persistent session exists, the daemon is stopped while they are
        # published, and the time is from its start to the last start committed.
        await daemon.stop()
        await publish(fleet_url(port), starts(bikes, seed), bikes, "starts")
        began_starts = time.perf_counter()
        await daemon.start()
        starts_profiler = None
        if args.profile_lag and workers == 1:
            starts_profiler = await _py_spy(daemon, f"{args.profile_lag}-{bikes}-starts.txt")
        await daemon.wait_for_partitions()
        while daemon.metric("chargeflow_messages_accepted_total") < bikes:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        done_wall, cold_s = time.time(), time.perf_counter() - began_starts
        # Timed as the drain is: from the first message received to the last committed. With
        # the daemon's own start-up (a process, its imports, migrations, the connections:
        # about 1.3 s here) it was 15-20 % slower, and no longer comparable with the drain.
        first = await _first_received(db)
        starts_rate = bikes / (done_wall - first.timestamp())
        print(f"  starts: {bikes:,} committed {done_wall - first.timestamp():.2f} s after the "
              f"first was received ({starts_rate:,.0f}/s), {cold_s:.2f} s after the daemon was "
              f"launched ({bikes / cold_s:,.0f}/s)", file=sys.stderr)  # fmt: skip
        if starts_profiler is not None:
            starts_profiler.send_signal(signal.SIGINT)
            await starts_profiler.wait()
        rss_after_starts = daemon.rss_mib()
        settled = bikes
        if warm:
            # Every session takes its first sample before the clock: the timed window then
            # holds a fleet's steady state (each bike's next sample), at any fleet size. Without
            # it, 10 s at 5,000 msg/s is every sample of 10,000 bikes but only the first of
            # half of 100,000.
            await publish(fleet_url(port), warm_samples(bikes, seed), bikes, "warm-up")
            settled += bikes
            while daemon.metric("chargeflow_messages_accepted_total") < settled:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        # One publisher keeps its schedule far past 10,000 msg/s here (about 2 % of a core
        # per 1,000 msg/s); the rate is split above 20,000.
        parts = max(1, math.ceil(rate / 20_000))
        total = int(rate * args.lag_seconds)
        start_at = time.time() + 2.0 + total / 100_000
        outs = [Path(tempfile.mkstemp(prefix="cf-steady-", suffix=".json")[1]) for _ in range(parts)]  # fmt: skip  # noqa: E501
        publishers = []
        for k, out in enumerate(outs):
            publisher = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.throughput", "steady", "--port", str(port),
                "--rate", str(rate), "--seconds", str(args.lag_seconds), "--bikes", str(bikes),
                "--seed", str(seed), "--out", str(out), "--part", str(k), "--parts", str(parts),
                "--start-at", str(start_at), "--first-seq", "2" if warm else "1",
            )  # fmt: skip
            publishers.append(publisher)
        profiler = None
        if args.profile_lag and workers == 1:
            assert daemon.proc is not None
            profiler = await _py_spy(
                daemon, f"{args.profile_lag}-{bikes}-{int(rate)}-{pipelined}.txt"
            )
        await asyncio.sleep(max(0.0, start_at - time.time()))
        seen: list[tuple[float, float]] = []
        pg_before, broker_before = _postgres_cpu_s(), tree_cpu_s(broker_pid)
        commit_s = daemon.metric("chargeflow_batch_commit_seconds_sum")
        commits = daemon.metric("chargeflow_batch_commit_seconds_count")
        batches = daemon.metric("chargeflow_batch_size_count")
        batched = daemon.metric("chargeflow_batch_size_sum")
        cpu_before, began = daemon.cpu_s(), time.time()
        deadline = time.monotonic() + args.lag_seconds * 20 + 60
        while time.monotonic() < deadline:
            n = await asyncio.to_thread(daemon.metric, "chargeflow_messages_accepted_total")
            seen.append((time.time(), n - settled))
            if n - settled >= total:
                break
            await asyncio.sleep(0.02)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            await profiler.wait()
        cpu = daemon.cpu_s() - cpu_before
        rss_at_end = daemon.rss_mib()
        pg_cpu = _postgres_cpu_s() - pg_before
        broker_cpu = tree_cpu_s(broker_pid) - broker_before
        elapsed = time.time() - began
        sent_at = []
        for publisher, out in zip(publishers, outs, strict=True):
            await publisher.wait()
            sent_at += json.loads(await asyncio.to_thread(out.read_text))
            out.unlink()
        sent_at.sort()
        # The lag window's batches only (not the starts before it).
        batches = daemon.metric("chargeflow_batch_size_count") - batches
        batched = daemon.metric("chargeflow_batch_size_sum") - batched
        commit_s = daemon.metric("chargeflow_batch_commit_seconds_sum") - commit_s
        commits = daemon.metric("chargeflow_batch_commit_seconds_count") - commits
    finally:
        await daemon.stop()
    lags, j = [], 0
    for i, sent in enumerate(sent_at):
        while j < len(seen) and seen[j][1] < i + 1:
            j += 1
        if j == len(seen):
            break
        lags.append(max(0.0, seen[j][0] - sent))
    achieved = len(sent_at) / (sent_at[-1] - sent_at[0])
    lost = len(sent_at) - len(lags)
    if args.lag_series:
        # p50/p99 of the samples sent in each second of the window: a transient (the first
        # pass over a large fleet) shows as seconds, where the whole window's p99 hides it.
        by_second: dict[int, list[float]] = {}
        for sent, took in zip(sent_at, lags, strict=False):
            by_second.setdefault(int(sent - sent_at[0]), []).append(took)
        series = "  ".join(
            f"{1000 * _pct(v, 0.5):.0f}/{1000 * _pct(v, 0.99):.0f}"
            for _, v in sorted(by_second.items())
        )
        print(f"  lag by second sent, p50/p99 ms ({bikes:,} bikes, {rate:,.0f} msg/s): {series}",
              file=sys.stderr)  # fmt: skip
    return (
        f"{bikes:>7,} {rate:>7,.0f} {achieved:>9,.0f} {workers:>8} "
        f"{1000 * _pct(lags, 0.5):>8.0f} {1000 * _pct(lags, 0.99):>8.0f} "
        f"{1000 * max(lags):>8.0f} {(batched / batches if batches else 0):>7.0f} "
        f"{(1000 * commit_s / commits if commits else 0):>9.1f} "
        f"{(1000 * commit_s / batched if batched else 0):>8.3f} "
        f"{100 * cpu / elapsed:>6.0f}% {100 * pg_cpu / elapsed:>6.0f}% "
        f"{100 * broker_cpu / elapsed:>6.0f}% "
        f"{rss_after_starts:>5.0f}/{rss_at_end:<5.0f} {starts_rate:>8,.0f}"
        + (f"  ({lost} not committed in time)" if lost else "")
    )


async def _first_received(db: str) -> datetime:
    conn = await asyncpg.connect(db)
    try:
        first: datetime = await conn.fetchval("SELECT min(received_at) FROM sessions")
    finally:
        await conn.close()
    return first


async def _py_spy(daemon: ChargeFlow, out: str) -> asyncio.subprocess.Process:
    """py-spy on the one daemon process, idle frames included, collapsed stacks to ``out``."""
    assert daemon.proc is not None
    return await asyncio.create_subprocess_exec(
        "py-spy", "record", "--pid", str(daemon.proc.pid), "--format", "raw", "--rate", "200",
        "--nonblocking", "--idle", "-o", out,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _postgres_cpu_s() -> float:
    """CPU seconds of every PostgreSQL process on this machine (its backends come and go, so
    they are summed from /proc each time)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() not in ("postgres", "postmaster"):
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="cf-throughput-"))
    port = free_port()
    broker = start_broker(port, data_dir)
    run = uuid.uuid4().hex[:6]
    group = f"tp-{run}"
    contenders = [
        Contender("paho 3.1.1", "paho311", f"tp-paho311-{run}"),
        Contender("paho v5", "paho5", f"tp-paho5-{run}"),
        Contender("aiomqtt", "aiomqtt", f"tp-aiomqtt-{run}"),
        Contender("the daemon's connection, v5", "conn5", f"tp-conn5-{run}"),
        Contender("the daemon's connection, 3.1.1", "conn311", f"tp-conn311-{run}"),
        Contender("naive bridge", "naive", f"tp-naive-{run}"),
    ]
    if args.baseline:
        # The level the workers run; a checkout that predates the setting (and refuses an
        # unknown one) runs MQTT v5.
        knows = "mqtt_protocol" in (Path(args.baseline) / "daemon" / "config.py").read_text()
        level = args.protocols[-1] if knows else "5"
        contenders.append(
            Contender(
                f"ChargeFlow (baseline), MQTT {level}",
                "chargeflow",
                f"tp-base-{run}",
                1,
                args.baseline,
                _database(args.database_url, "base"),
                {"CHARGEFLOW_MQTT_PROTOCOL": level} if knows else {},
            )
        )
    for protocol in args.protocols:
        contenders.append(
            Contender(
                f"ChargeFlow, MQTT {protocol}",
                "chargeflow",
                f"tp-cf{protocol}-{run}",
                1,
                None,
                _database(args.database_url, f"cf{protocol.replace('.', '')}"),
                {"CHARGEFLOW_MQTT_PROTOCOL": protocol},
            )
        )
    if args.workers > 1:
        protocol = args.protocols[-1]
        contenders.append(
            Contender(
                f"ChargeFlow, {protocol}, {args.workers} workers",
                "chargeflow",
                f"tp-cfn-{run}",
                args.workers,
                None,
                _database(args.database_url, "cfn"),
                {"CHARGEFLOW_MQTT_PROTOCOL": protocol},
            )
        )
    if args.skip_drain:
        contenders = []
    if args.only:
        contenders = [c for c in contenders if c.kind in args.only or c.name in args.only]
    try:
        admin = await asyncpg.connect(args.database_url.rsplit("/", 1)[0] + "/postgres")
        name = urlsplit(args.database_url).path.strip("/")
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.close()
        if contenders:
            if "mosquitto" in args.brokers:
                await drains(contenders, port, [broker.pid], group, args,
                             f"mosquitto on 127.0.0.1:{port} (repo config)")  # fmt: skip
            if "nats" in args.brokers:
                await drains_on_nats(contenders, data_dir, group, args)
        if not args.skip_lag:
            print()
            print(f"publish-to-commit lag, samples at a steady rate for "
                  f"{args.lag_seconds:.0f} s to each Active session in turn (ChargeFlow, MQTT "
                  f"{args.protocols[-1]}); RSS MiB after the starts/at the end; starts/s: "
                  f"the Active sessions' starts committed from a backlog")  # fmt: skip
            rows = []
            for bikes in args.live_bikes:
                for workers in sorted({1, args.workers}):
                    for rate in args.rates:
                        for pipelined, warm in itertools.product(args.pipelined, args.warm_up):
                            # A broker of its own for each: the persistent sessions of the
                            # drains and of earlier lag runs (offline now, subscribed to every
                            # bike) would otherwise have every live message queued for each.
                            broker.terminate()
                            broker.wait(timeout=10)
                            port = free_port()
                            broker = start_broker(port, data_dir / f"lag-{len(rows)}")
                            row = await lag(
                                args, port, rate, workers, args.seed + len(rows), broker.pid,
                                pipelined, bikes, warm == "yes",
                            )  # fmt: skip
                            rows.append(f"{row}  pipelined={pipelined} warm-up={warm}")
            print(f"{'bikes':>7} {'offered':>7} {'achieved':>9} {'workers':>8} {'p50 ms':>8} "
                  f"{'p99 ms':>8} {'max ms':>8} {'batch':>7} {'commit ms':>9} {'ms/msg':>8} "
                  f"{'CPU':>7} {'PG CPU':>7} {'broker':>7} {'RSS MiB':>11} "
                  f"{'starts/s':>8}")  # fmt: skip
            for row in rows:
                print(row)
    finally:
        broker.terminate()
        broker.wait(timeout=10)
        shutil.rmtree(data_dir, ignore_errors=True)


async def drains_on_nats(
    contenders: list[Contender], data_dir: Path, group: str, args: argparse.Namespace
) -> None:
    """The same drains on a three-node NATS cluster (deploy/nats/nats.conf, streams replicated
    three ways): the contenders that speak MQTT 3.1.1 (NATS speaks nothing newer), each with a
    session and a database of its own, reading from node 1."""
    from daemon.devbroker import NatsCluster

    on_nats = [
        dataclasses.replace(
            c,
            name=f"{c.name} (NATS)",
            client_id=f"{c.client_id}-nats",
            database_url=None if c.database_url is None else f"{c.database_url}_nats",
            daemon=None,
            env={**c.env, "CHARGEFLOW_SUBSCRIPTION": "one"},  # as deploy/nats/nats.conf says
        )
        for c in contenders
        if c.workers == 1
        and (c.kind in ("paho311", "conn311")
             or (c.kind == "chargeflow" and c.env.get("CHARGEFLOW_MQTT_PROTOCOL") == "3.1.1"))
    ]  # fmt: skip
    cluster = NatsCluster(data_dir / "nats")
    cluster.start_all()
    try:
        await asyncio.sleep(3)  # JetStream's leaders elected before the first session
        first = cluster.nodes[0]
        pids = [n.proc.pid for n in cluster.nodes if n.proc is not None]
        await drains(on_nats, first.mqtt_port, pids, group, args,
                     f"a three-node NATS cluster (deploy/nats/nats.conf), read from node 1 on "
                     f"127.0.0.1:{first.mqtt_port}", protocol="3.1.1")  # fmt: skip
    finally:
        cluster.stop_all()


async def drains(
    contenders: list[Contender],
    port: int,
    broker_pids: Sequence[int],
    group: str,
    args: argparse.Namespace,
    broker: str,
    protocol: str = "5",
) -> None:
    """One backlog, queued for every contender; each drains its copy in turn."""
    db = await asyncpg.connect(args.database_url)
    await db.execute(
        "CREATE TABLE IF NOT EXISTS naive_telemetry (topic text, telemetry_id uuid PRIMARY KEY,"
        " session_id uuid, seq integer, energy_wh numeric);"
        "CREATE TABLE IF NOT EXISTS naive_lifecycle (topic text, payload jsonb)"
    )
    await db.close()
    print(f"broker: {broker}; priming sessions")
    for c in contenders:
        await prime(c, port, args, group)
    per = max(1, args.messages // args.bikes)
    plan = FleetPlan(args.bikes, 1, per, PREFIX, seed=args.seed)
    total = plan.total
    start = datetime.now(UTC) - timedelta(minutes=30)
    backlog = ((t, json_payload(p)) for t, p in messages(plan, start))
    print(
        f"backlog: {args.bikes} sessions x {per} samples + start and end = {total:,} "
        f"messages, queued once for each of {len(contenders)} contenders"
    )
    await publish(fleet_url(port), backlog, total, "backlog", protocol)
    results = []
    for c in contenders:
        r = await run_contender(c, port, total, args.bikes, broker_pids, args)
        print(f"  {c.name}: {r.rate:,.0f} msg/s")
        results.append(r)
    report(results)


def report(results: list[Result]) -> None:
    ceiling = next((r.rate for r in results if r.name.startswith("paho 3.1.1")), None)
    width = max(26, *(len(r.name) for r in results))
    print()
    print(f"{'contender':<{width}} {'msg/s':>8} {'x paho 3.1.1':>12} {'CPU us/msg':>11} "
          f"{'broker us/msg':>13} {'batch':>6}")  # fmt: skip
    for r in results:
        ratio = f"{r.rate / ceiling:.2f}" if ceiling else "-"
        batch = f"{r.batch_mean:.0f}" if r.batch_mean else "-"
        print(f"{r.name:<{width}} {r.rate:>8,.0f} {ratio:>12} {1e6 * r.cpu_s / r.messages:>11.0f} "
              f"{1e6 * r.broker_cpu_s / r.messages:>13.0f} {batch:>6}")  # fmt: skip
    for r in results:
        for note in r.notes:
            print(f"  {r.name}: {note}")
    print(f"(CPU: for ChargeFlow, every process of the daemon; {os.cpu_count()} cores, "
          f"{statistics.mean(os.getloadavg()):.1f} load)")  # fmt: skip


def _rates(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    drain = sub.add_parser("drain", help="(internal) one raw contender")
    drain.add_argument(
        "contender", choices=["paho311", "paho5", "aiomqtt", "conn5", "conn311", "naive"]
    )
    drain.add_argument("--host", default="127.0.0.1")
    drain.add_argument("--port", type=int, required=True)
    drain.add_argument("--client-id", required=True)
    drain.add_argument("--expect", type=int, required=True)
    drain.add_argument("--database-url", required=True)
    steady = sub.add_parser("steady", help="(internal) the steady publisher of the lag phase")
    steady.add_argument("--port", type=int, required=True)
    steady.add_argument("--rate", type=float, required=True)
    steady.add_argument("--seconds", type=float, required=True)
    steady.add_argument("--bikes", type=int, required=True)
    steady.add_argument("--seed", type=int, required=True)
    steady.add_argument("--out", required=True)
    steady.add_argument("--part", type=int, default=0)
    steady.add_argument("--parts", type=int, default=1)
    steady.add_argument("--start-at", type=float, required=True)
    steady.add_argument("--first-seq", type=int, default=1)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--bikes", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rates", type=_rates, default=[2000.0, 4000.0, 5000.0])
    parser.add_argument(
        "--live-bikes",
        type=lambda t: [int(x) for x in t.split(",") if x],
        default=[10_000],
        help="Active sessions of the lag phase, one run each, side by side (e.g. 10000,100000)",
    )
    parser.add_argument("--lag-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--baseline", help="also run the daemon of another checkout")
    parser.add_argument("--only", type=lambda t: t.split(","), default=None,
                        help="comma-separated contender kinds: paho311,paho5,aiomqtt,conn5,conn311,"
                        "naive,"
                        "chargeflow")  # fmt: skip
    parser.add_argument("--skip-lag", action="store_true")
    parser.add_argument(
        "--pipelined",
        type=lambda t: t.split(","),
        default=["true"],
        help="CHARGEFLOW_PIPELINED_COMMITS values to run the lag phase with, side by side "
        "(e.g. true,false)",
    )
    parser.add_argument(
        "--warm-up",
        type=lambda t: t.split(","),
        default=["no"],
        help="yes: every Active session takes one sample before the timed window (a fleet's "
        "steady state at any size); no,yes runs both side by side",
    )
    parser.add_argument(
        "--share-lag",
        action="store_true",
        help="run the lag phase's workers in one share group instead of bike-affine partitions",
    )
    parser.add_argument("--skip-drain", action="store_true")
    parser.add_argument(
        "--lag-series",
        action="store_true",
        help="also print each lag run's p50/p99 for every second of the window (to stderr)",
    )
    parser.add_argument(
        "--brokers",
        type=lambda t: t.split(","),
        default=["mosquitto"],
        help="where the drains run: mosquitto (the repo's config), nats (a three-node NATS "
        "cluster from deploy/nats/nats.conf, the 3.1.1 contenders only), or both in one run "
        "(mosquitto,nats)",
    )
    parser.add_argument(
        "--protocols",
        type=lambda t: t.split(","),
        default=["3.1.1", "5"],
        help="the daemon's MQTT protocol levels to run (CHARGEFLOW_MQTT_PROTOCOL); the workers "
        "and the lag phase run the last",
    )
    parser.add_argument(
        "--profile-lag",
        metavar="PREFIX",
        help="record the one-process lag runs with py-spy, idle frames included, to "
        "PREFIX-RATE-PIPELINED.txt (collapsed stacks)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="record the one-process ChargeFlow drain with py-spy (collapsed stacks) to FILE",
    )
    parser.add_argument(
        "--database-url", default="postgresql://postgres@127.0.0.1:5432/chargeflow_throughput"
    )
    ns = parser.parse_args()
    if ns.mode == "drain":
        drain_main(ns)
    elif ns.mode == "steady":
        _steady(ns)
    else:
        asyncio.run(main(ns))
