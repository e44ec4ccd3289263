"""Versioned migrations: numbered SQL files, plus the TimescaleDB step when the extension exists."""

from __future__ import annotations

import re
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

from daemon.db.store import Conn

__all__ = [
    "TimescaleUnavailable",
    "ensure_database",
    "migrate",
    "pending_migrations",
    "timescale_problem",
]

log = structlog.get_logger(__name__)
_LOCK = 0x43_46_4C_57  # "CFLW": one migrator at a time across daemon instances
_DB_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")
TIMESCALE_STEP = "timescale"


class TimescaleUnavailable(Exception):
    """CHARGEFLOW_TIMESCALEDB=on, and the extension cannot be used; the message says why."""


async def timescale_problem(conn: Conn) -> str | None:
    """Why TimescaleDB cannot be used on this server, or None when it can.

    ``pg_available_extensions`` only says the extension's files are installed; it is usable
    only when the server also preloads its library (right after installing the package it
    does not, and ``CREATE EXTENSION`` then fails with "must be preloaded").
    """
    installed = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')"
    )
    if not installed:
        return "the timescaledb extension is not installed on the database server"
    preload = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
    if "timescaledb" not in [name.strip().strip('"') for name in preload.split(",")]:
        return (
            "the timescaledb extension is installed but not preloaded: add timescaledb to "
            "shared_preload_libraries in postgresql.conf and restart PostgreSQL"
        )
    return None


def _timescale_sql(redelivery_window_days: int, retention_days: int) -> list[str]:
    """The whole TimescaleDB part: telemetry becomes a hypertable, compressed and retained.

    Compression only touches chunks older than the redelivery window, because inserts into
    compressed chunks are slow and upserts there unreliable; a redelivered sample must land in
    an uncompressed chunk.
    """
    return [
        "CREATE EXTENSION IF NOT EXISTS timescaledb",
        # Moving stored rows into chunks deletes and re-inserts them: the append-only guard
        # (and its "only an Active session takes samples") must let this one move through.
        # (A hypertable cannot disable or enable a trigger: they are dropped and made again,
        # as the extension's version allows: migration 007.)
        "DROP TRIGGER IF EXISTS telemetry_guard ON telemetry",
        "DROP TRIGGER IF EXISTS telemetry_guard_added ON telemetry",
        "SELECT create_hypertable('telemetry', 'emitted_at',"
        " chunk_time_interval => INTERVAL '1 day', migrate_data => true, if_not_exists => true)",
        "SELECT chargeflow_install_telemetry_guards()",
        "ALTER TABLE telemetry SET (timescaledb.compress,"
        " timescaledb.compress_segmentby = 'session_id', timescaledb.compress_orderby = 'seq')",
        f"SELECT add_compression_policy('telemetry', INTERVAL '{int(redelivery_window_days)} days',"
        " if_not_exists => true)",
        f"SELECT add_retention_policy('telemetry', INTERVAL '{int(retention_days)} days',"
        " if_not_exists => true)",
    ]


async def ensure_database(url: str) -> bool:
    """Create the database named in the URL if it does not exist; True if it was created."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    if not _DB_NAME.fullmatch(name):
        raise ValueError(f"database name {name!r} must match [A-Za-z0-9_-]{{1,63}}")
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        # An identifier cannot be a parameter; the name is checked above and quoted here.
        await admin.execute(f'CREATE DATABASE "{name}"')
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        # Another instance created it first (workers starting together race to CREATE
        # DATABASE; the loser of a close race sees pg_database's unique index, not 42P04).
        return False
    finally:
        await admin.close()
    log.info("database created", database=name)
    return True


def _sql_files() -> list[tuple[str, str]]:
    folder = resources.files("daemon.db").joinpath("migrations")
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8")) for f in files]


async def migrate(
    conn: Conn,
    redelivery_window_days: int = 7,
    retention_days: int = 400,
    timescaledb: str = "auto",
) -> list[str]:
    """Apply what is not applied yet, under an advisory lock; returns the steps applied.

    ``timescaledb`` (CHARGEFLOW_TIMESCALEDB): ``auto`` makes telemetry a hypertable once the
    extension can be loaded (at this start or a later one: a database of plain tables moves
    over when the operator preloads the extension), ``on`` refuses to migrate without it,
    ``off`` never touches it.
    """
    use_timescale = await _timescale_usable(conn, timescaledb)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
        done = await _applied(conn)
        steps = [(name, [sql]) for name, sql in _sql_files() if name not in done]
        if use_timescale and TIMESCALE_STEP not in done:
            steps.append((TIMESCALE_STEP, _timescale_sql(redelivery_window_days, retention_days)))
        await _apply(conn, steps)
    applied_now = [name for name, _ in steps]
    log.info(
        "migrations applied" if applied_now else "schema up to date",
        applied=applied_now,
        timescaledb=use_timescale or TIMESCALE_STEP in done,
    )
    return applied_now


async def pending_migrations(conn: Conn) -> list[str]:
    """The numbered migrations this database has not had (all of them on an empty one),
    read without changing anything: what a read command checks instead of migrating."""
    ledger = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done = (
        {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        if ledger
        else set()
    )
    return [name for name, _ in _sql_files() if name not in done]


async def _timescale_usable(conn: Conn, setting: str) -> bool:
    """Whether telemetry is to be a hypertable: never with ``off``; with ``on``, refuse to
    start without the extension; with ``auto``, when it can be loaded (and say why not when
    it is installed but not preloaded)."""
    if setting == "off":
        return False
    problem = await timescale_problem(conn)
    if problem is None:
        return True
    if setting == "on":
        raise TimescaleUnavailable(f"CHARGEFLOW_TIMESCALEDB=on, but {problem}")
    if "preloaded" in problem:
        log.warning("telemetry stays a plain table", reason=problem)
    return False


async def _applied(conn: Conn) -> set[str]:
    """The steps this database has had (the ledger is made on the first start)."""
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    return {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}


async def _apply(conn: Conn, steps: list[tuple[str, list[str]]]) -> None:
    """Run each step's statements and record it, in the caller's transaction."""
    for name, statements in steps:
        for statement in statements:
            await conn.execute(statement)
        await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
