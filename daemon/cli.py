"""`chargeflow`: run, migrate, simulate, analytics, session, bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

import structlog

from daemon.config import ConfigError, Settings, load_settings
from daemon.logs import configure_logging

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chargeflow",
        description="Ingestion daemon for e-bike fleets. Configuration: CHARGEFLOW_* variables "
        "or a .env file (see README).",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an unexpected failure"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    sub.add_parser("migrate", help="create the database if needed and apply migrations")
    sim = sub.add_parser("simulate", help="a fleet of bikes riding and charging over MQTT")
    sim.add_argument("--bikes", type=int, default=10)
    sim.add_argument("--sessions", type=int, default=2, help="sessions per bike")
    sim.add_argument("--samples", type=int, default=20, help="telemetry samples per session")
    sim.add_argument("--rate", type=float, default=0.0, help="messages per second (0: max)")
    sim.add_argument("--seed", type=int, default=None)
    sim.add_argument(
        "--mqtt-url",
        default=None,
        help="broker URL of a publisher allowed to write bike topics "
        "(default: CHARGEFLOW_SIMULATOR_MQTT_URL or CHARGEFLOW_MQTT_URL)",
    )
    ana = sub.add_parser("analytics", help="totals, counts, averages and revenue (JSON)")
    ana.add_argument("--from", dest="since", help="RFC 3339; sessions started at or after")
    ana.add_argument("--to", dest="until", help="RFC 3339; sessions started before")
    ana.add_argument("--bike-id")
    ana.add_argument("--pricing-version", help="only sessions finalized under this version")
    sub.add_parser("pricing", help="every pricing version recorded, its prices, first use")
    ses = sub.add_parser("session", help="a session, its billing and its telemetry count")
    ses.add_argument("session_id")
    bench = sub.add_parser("bench", help="ingest a backlog end to end and print msg/s")
    bench.add_argument("--messages", type=int, default=50_000, help="telemetry messages")
    bench.add_argument("--bikes", type=int, default=50)
    bench.add_argument("--mqtt-url", default=None, help="publisher URL (as for simulate)")
    return parser


async def _migrate(settings: Settings) -> None:
    from daemon.app import open_store

    store = await open_store(settings)
    await store.pool.close()


async def _analytics(settings: Settings, args: argparse.Namespace) -> None:
    from daemon.app import open_store, read_model

    since, until = _timestamp(args.since, "--from"), _timestamp(args.until, "--to")
    store = await open_store(settings, create=False)
    try:
        document = await read_model(settings, store).analytics(
            since, until, args.bike_id, args.pricing_version
        )
    finally:
        await store.pool.close()
    print(json.dumps(document, indent=2))


def _timestamp(raw: str | None, option: str) -> datetime | None:
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise ConfigError(f"{option} must be an RFC 3339 timestamp with an offset, got {raw!r}")
    return value


async def _pricing(settings: Settings) -> None:
    from daemon.app import open_store, read_model

    store = await open_store(settings, create=False)
    try:
        versions = await read_model(settings, store).pricing()
    finally:
        await store.pool.close()
    print(json.dumps({"pricing_versions": versions}, indent=2))


async def _session(settings: Settings, raw: str) -> int:
    from daemon.app import open_store, read_model

    try:
        session_id = UUID(raw)
    except ValueError:
        raise ConfigError(f"SESSION_ID must be a UUID, got {raw!r}") from None
    store = await open_store(settings, create=False)
    try:
        view = await read_model(settings, store).session_view(session_id)
    finally:
        await store.pool.close()
    if view is None:
        print(f"no session {session_id}", file=sys.stderr)
        return 1
    print(json.dumps(view, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log = structlog.get_logger("chargeflow")
    try:
        settings = load_settings()
        configure_logging(settings.log_format, settings.log_level)
        if args.command == "run":
            from daemon.app import run_daemon

            settings.load_pricing()  # fail fast on a bad pricing file
            asyncio.run(run_daemon(settings))
        elif args.command == "migrate":
            asyncio.run(_migrate(settings))
        elif args.command == "simulate":
            from daemon.simulate import FleetPlan, publish

            url = args.mqtt_url or settings.simulator_mqtt_url or settings.mqtt_url
            plan = FleetPlan(
                args.bikes, args.sessions, args.samples, settings.topic_prefix, args.seed
            )
            asyncio.run(publish(url, plan, args.rate))
        elif args.command == "analytics":
            asyncio.run(_analytics(settings, args))
        elif args.command == "pricing":
            asyncio.run(_pricing(settings))
        elif args.command == "session":
            return asyncio.run(_session(settings, args.session_id))
        elif args.command == "bench":
            from daemon.bench import run_bench

            url = args.mqtt_url or settings.simulator_mqtt_url or settings.mqtt_url
            asyncio.run(run_bench(settings, url, args.messages, args.bikes))
    except ConfigError as exc:
        print(f"chargeflow: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            log.exception("chargeflow failed", error=repr(exc))
        else:
            print(f"chargeflow: {type(exc).__name__}: {exc} (--debug shows where)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
