"""`chargeflow run --workers N`: N daemon processes on this machine, each bike with one home.

One Python process uses one core. Worker ``i`` takes the bikes of partition ``i/N``
(``CHARGEFLOW_PARTITION``, see ``daemon.partition``): it subscribes to every bike with a plain
persistent subscription, which Mosquitto keeps across its own restarts, and acknowledges the
other workers' messages from the topic alone, so no two workers reload each other's bikes.
With ``CHARGEFLOW_SHARE_GROUP`` set the workers join that MQTT v5 share group instead (for a
broker that keeps one topic on one member, such as EMQX's ``hash_topic``). PostgreSQL
serializes each bike's decisions either way: together they do exactly what one process would.
Worker ``i`` gets the client id ``{CHARGEFLOW_CLIENT_ID}-{i}`` (each its own persistent
session) and the HTTP port ``CHARGEFLOW_HTTP_PORT + i`` (each its own /metrics and /readyz);
given several brokers, it starts on the ``i``-th of them.
The supervisor forwards SIGTERM and SIGINT, and when one worker dies, it stops the others and
exits with its code, so that whatever restarts the service (systemd, Docker) restarts them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

import structlog

from daemon.config import Settings

__all__ = ["run_workers", "worker_environment"]

log = structlog.get_logger(__name__)


def worker_environment(settings: Settings, index: int, count: int) -> dict[str, str]:
    """The CHARGEFLOW_* overrides of worker ``index`` (counting from 0) of ``count``."""
    share = (
        {"CHARGEFLOW_SHARE_GROUP": settings.share_group}
        if settings.share_group
        else {"CHARGEFLOW_PARTITION": f"{index}/{count}"}
    )
    # With a list of brokers (a cluster), worker i starts on broker i (mod the list's length),
    # so that the workers spread over the nodes; each still fails over to the others.
    brokers = settings.brokers
    first = index % len(brokers)
    rotated = ",".join(b.url for b in (*brokers[first:], *brokers[:first]))
    return {
        **share,
        "CHARGEFLOW_MQTT_URL": rotated,
        "CHARGEFLOW_CLIENT_ID": f"{settings.client_id}-{index}",
        "CHARGEFLOW_HTTP_PORT": str(settings.http_port + index if settings.http_port else 0),
    }


async def run_workers(settings: Settings, count: int) -> int:
    """Run ``count`` workers until a signal or the first one to exit; their exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    workers = [await _spawn(settings, i, count) for i in range(count)]
    log.info(
        "workers started",
        workers=count,
        share_group=settings.share_group,
        partitions=None if settings.share_group else count,
        pids=[w.pid for w in workers],
    )
    exits = {asyncio.ensure_future(w.wait()): w for w in workers}
    stopping = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
    first = next((exits[f] for f in done if f in exits), None)
    if first is not None:
        log.error("a worker exited; stopping the others", pid=first.pid, code=first.returncode)
    codes = await _stop_all(workers)
    stopping.cancel()
    return _exit_code(first, codes)


def _exit_code(first: asyncio.subprocess.Process | None, codes: list[int]) -> int:
    """The code of the worker that exited first (1 if it exited cleanly: the others did not),
    or after a signal the most telling of theirs."""
    if first is not None:
        return first.returncode or 1
    return max(codes, key=abs, default=0)


async def _spawn(settings: Settings, index: int, count: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon",
        "run",
        env={**os.environ, **worker_environment(settings, index, count)},
    )


async def _stop_all(workers: list[asyncio.subprocess.Process]) -> list[int]:
    """SIGTERM to every worker still running (each drains and disconnects); their exit codes."""
    for worker in workers:
        if worker.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.send_signal(signal.SIGTERM)
    return list(await asyncio.gather(*(w.wait() for w in workers)))
