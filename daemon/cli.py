"""`chargeflow`: the daemon and the operator's commands, on Typer with Rich.

Tables on a terminal, JSON for machines (``--json``, or whenever stdout is not a terminal),
progress bars on a terminal, shell completion (``--install-completion``), and exit codes that
scripts can rely on:

- 0: done;
- 1: an unexpected failure (one line; ``--debug`` shows the traceback);
- 2: a usage or configuration error (one line saying what to fix);
- 3: nothing found (``session`` of an unknown id).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, TypeVar
from uuid import UUID

import structlog
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from daemon import MAX_PAGE, installed_version
from daemon.config import READ_SETTINGS, ConfigError, Settings, load_settings
from daemon.documents import utc_text
from daemon.logs import configure_logging
from daemon.simulate import PublishRefused
from domain.errors import Reason

__all__ = ["app", "main"]

EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_FOUND = 1, 2, 3
T = TypeVar("T")

app = typer.Typer(
    name="chargeflow",
    help="Ingestion daemon for e-bike fleets. Configuration: CHARGEFLOW_* variables or a .env "
    "file (see README).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
rejections_app = typer.Typer(help="Kept rejections: list them, replay them.", no_args_is_help=True)
app.add_typer(rejections_app, name="rejections")
riders_app = typer.Typer(help="Riders' personal data: erase a rider.", no_args_is_help=True)
app.add_typer(riders_app, name="riders")

out = Console()
err = Console(stderr=True)


def _say(line: str) -> None:
    """One line on stderr, never wrapped (scripts and log collectors read it whole)."""
    print(line, file=sys.stderr)


class UsageError(Exception):
    """The command line itself is wrong (an option's value); the message says what to fix."""


class _Stop(Exception):
    """Leave with this exit code, having said why."""

    def __init__(self, code: int) -> None:
        self.code = code


@dataclass
class _State:
    debug: bool = False


_state = _State()

Json = Annotated[bool, typer.Option("--json", help="JSON output even on a terminal")]
Since = Annotated[str | None, typer.Option("--from", help="RFC 3339 with an offset; at or after")]
Until = Annotated[str | None, typer.Option("--to", help="RFC 3339 with an offset; before")]


def _version(value: bool) -> None:
    if value:
        print(f"chargeflow {installed_version()}")
        raise typer.Exit


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="show the traceback of an unexpected failure")
    ] = False,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = None,
) -> None:
    _state.debug = debug


# -- plumbing ------------------------------------------------------------------------------


def _settings() -> Settings:
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    return settings


def _read_settings() -> Settings:
    """What a read command needs (the database, the logs), whatever else is set."""
    settings = load_settings(only=READ_SETTINGS)
    configure_logging(settings.log_format, settings.log_level)
    return settings


def _run(
    work: Callable[[], Awaitable[T]],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> T:
    """Run a command's coroutine; every failure becomes one line and an exit code."""
    with _one_line_failures(), asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(work())  # type: ignore[arg-type]


@contextmanager
def _one_line_failures() -> Iterator[None]:
    try:
        yield
    except _Stop as stop:
        raise typer.Exit(stop.code) from None
    except UsageError as exc:
        _say(f"chargeflow: usage error: {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    except PublishRefused as exc:
        _say(f"chargeflow: {exc}")
        raise typer.Exit(EXIT_FAILURE) from None
    except (ConfigError, ValueError) as exc:
        _say(f"chargeflow: configuration error: {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:
        if _state.debug:
            structlog.get_logger("chargeflow").exception("chargeflow failed", error=repr(exc))
        else:
            _say(f"chargeflow: {type(exc).__name__}: {exc} (--debug shows where)")
        raise typer.Exit(EXIT_FAILURE) from None


def _event_loop(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop `run` asks for: uvloop's (the default), or None for the standard library's."""
    if settings.event_loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise ConfigError(
            "CHARGEFLOW_EVENT_LOOP: uvloop is not installed here (it does not build on "
            "Windows); install it, or set CHARGEFLOW_EVENT_LOOP=asyncio"
        ) from None
    return uvloop.new_event_loop


def _as_json(json_flag: bool) -> bool:
    return json_flag or not out.is_terminal


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2))


def _timestamp(raw: str | None, option: str) -> datetime | None:
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise UsageError(
            f"{option} must be an RFC 3339 timestamp with an offset "
            f"(e.g. 2026-12-06T08:00:00Z), got {raw!r}"
        )
    return value


@contextmanager
def _progress(what: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal (stderr); elsewhere, nothing until the summary line."""
    if not err.is_terminal:
        yield lambda done: None
        return
    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda done: bar.update(task, completed=done)


async def _store(settings: Settings, create: bool = False) -> Any:
    from daemon.app import open_store

    return await open_store(settings, create=create)


async def _reader(settings: Settings) -> Any:
    """The store for a read command: nothing created, migrated or logged on the way."""
    from daemon.app import open_reader

    return await open_reader(settings)


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    out.print(table)


# -- the daemon ----------------------------------------------------------------------------


@app.command()
def run(
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="processes on this machine, each bike with one home (worker i takes "
            "partition i/N, client id CHARGEFLOW_CLIENT_ID-i, HTTP port CHARGEFLOW_HTTP_PORT+i;"
            " with CHARGEFLOW_SHARE_GROUP set, that share group instead)",
        ),
    ] = 1,
) -> None:
    """Run the daemon until SIGTERM/SIGINT (which commit the batch in hand and disconnect)."""
    from daemon.app import run_daemon
    from daemon.workers import run_workers

    with _one_line_failures():
        settings = _settings()
        settings.load_pricing()  # fail fast on a bad pricing file, tokens file or TLS file
        settings.load_tokens()
        settings.tls_context()
        loop_factory = _event_loop(settings)

    async def work() -> int:
        if workers > 1:
            return await run_workers(settings, workers)
        await run_daemon(settings)
        return 0

    code = _run(work, loop_factory)
    if code:
        raise typer.Exit(code)


@app.command()
def migrate() -> None:
    """Create the database if needed and apply the migrations (`run` does it too)."""

    async def work() -> None:
        store = await _store(_settings(), create=True)
        await store.pool.close()

    _run(work)


@app.command()
def simulate(  # noqa: PLR0913 - a Typer command: each option is a parameter
    bikes: Annotated[int, typer.Option(min=1)] = 10,
    sessions: Annotated[int, typer.Option(min=1, help="sessions per bike")] = 2,
    samples: Annotated[int, typer.Option(min=0, help="telemetry samples per session")] = 20,
    rate: Annotated[
        float, typer.Option(min=0, help="messages per second (0: as fast as possible)")
    ] = 0,
    seed: int | None = None,
    mqtt_url: Annotated[
        str | None,
        typer.Option(
            help="broker URL of a publisher allowed to write bike topics "
            "(default: CHARGEFLOW_SIMULATOR_MQTT_URL or CHARGEFLOW_MQTT_URL)"
        ),
    ] = None,
) -> None:
    """A fleet of bikes riding and charging over MQTT (through a broker's restart, and across
    the brokers of a list, as devices do)."""
    from daemon.simulate import FleetPlan, publish

    async def work() -> None:
        settings = _publisher_settings(_settings(), mqtt_url)
        plan = FleetPlan(bikes, sessions, samples, settings.topic_prefix, seed)
        with _progress("publishing", plan.total) as step:
            await publish(settings, plan, rate, progress=step)

    _run(work)


def _publisher_settings(settings: Settings, mqtt_url: str | None) -> Settings:
    """The settings a publisher connects with: ``--mqtt-url``, else
    CHARGEFLOW_SIMULATOR_MQTT_URL, else CHARGEFLOW_MQTT_URL (each may list several brokers)."""
    url = mqtt_url or settings.simulator_mqtt_url or settings.mqtt_url
    try:
        return Settings.model_validate({**settings.model_dump(), "mqtt_url": url})
    except ValueError:
        raise ConfigError(
            f"--mqtt-url / CHARGEFLOW_SIMULATOR_MQTT_URL: {Settings._mqtt_url_problem(url)}"
        ) from None


@app.command()
def bench(
    messages: Annotated[int, typer.Option(help="telemetry messages")] = 50_000,
    bikes: int = 50,
    mqtt_url: Annotated[str | None, typer.Option(help="publisher URL (as for simulate)")] = None,
) -> None:
    """Ingest a backlog end to end and print msg/s, batch sizes and CPU per message."""
    from daemon.bench import run_bench

    async def work() -> None:
        settings = _settings()
        await run_bench(settings, _publisher_settings(settings, mqtt_url), messages, bikes)

    _run(work)


@app.command()
def asyncapi(
    prefix: Annotated[
        str | None, typer.Option(help="topic prefix (default: CHARGEFLOW_TOPIC_PREFIX)")
    ] = None,
) -> None:
    """Print the MQTT contract as an AsyncAPI 3.0 document (JSON)."""
    from daemon.mqtt.contract import asyncapi_document
    from daemon.mqtt.topics import Topics

    try:
        chosen = Topics(prefix).prefix if prefix is not None else load_settings().topic_prefix
    except (ConfigError, ValueError) as exc:
        _say(f"chargeflow: configuration error: {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    _print_json(asyncapi_document(chosen))


# -- the read side -------------------------------------------------------------------------


@app.command()
def analytics(
    since: Since = None,
    until: Until = None,
    bike_id: str | None = None,
    pricing_version: Annotated[
        str | None, typer.Option(help="only sessions finalized under this version")
    ] = None,
    as_json: Json = False,
) -> None:
    """Totals, counts, averages and revenue of finalized sessions."""
    from daemon.db.views import ReadModel

    async def work() -> dict[str, Any]:
        settings = _read_settings()
        start, end = _timestamp(since, "--from"), _timestamp(until, "--to")
        store = await _reader(settings)
        try:
            return await ReadModel(store.pool).analytics(start, end, bike_id, pricing_version)
        finally:
            await store.pool.close()

    document = _run(work)
    if _as_json(as_json):
        _print_json(document)
        return
    fields = (
        "count",
        "energy_wh",
        "distance_m",
        "duration_s",
        "average_energy_wh",
        "timed_out",
        "missing_samples",
    )
    rows = [(k, *(document[kind][k] for kind in ("rides", "charging"))) for k in fields]
    rows += [
        (
            f"revenue {c}",
            document["rides"]["revenue"].get(c, "0"),
            document["charging"]["revenue"].get(c, "0"),
        )
        for c in document["revenue"]
    ]
    _table("Finalized sessions", ("", "rides", "charging"), rows)
    by_version = document["by_pricing_version"]
    _table(
        "By pricing version",
        ("version", "sessions", "revenue"),
        [
            (v, f["sessions"], ", ".join(f"{a} {c}" for c, a in f["revenue"].items()))
            for v, f in by_version.items()
        ],
    )


@app.command()
def pricing(as_json: Json = False) -> None:
    """Every pricing version recorded, its prices and when it was first used."""
    from daemon.db.views import ReadModel

    async def work() -> list[dict[str, Any]]:
        settings = _read_settings()
        store = await _reader(settings)
        try:
            return await ReadModel(store.pool).pricing()
        finally:
            await store.pool.close()

    versions = _run(work)
    if _as_json(as_json):
        _print_json({"pricing_versions": versions})
        return
    _table(
        "Pricing versions",
        ("version", "currency", "rounding", "prices", "first used"),
        [
            (
                v["version"],
                v["currency"],
                v["rounding"],
                "; ".join(
                    f"{kind}: {v[kind]['unit_price']}/kWh + {v[kind]['session_fee']}"
                    for kind in ("ride", "charging")
                ),
                v["first_used_at"],
            )
            for v in versions
        ],
    )


@app.command()
def session(
    session_id: Annotated[str, typer.Argument(metavar="SESSION_ID")], as_json: Json = False
) -> None:
    """A session, its billing record and its stored telemetry count."""
    from daemon.db.views import ReadModel

    try:
        wanted = UUID(session_id)
    except ValueError:
        _say(f"chargeflow: SESSION_ID must be a UUID, got {session_id!r}")
        raise typer.Exit(EXIT_USAGE) from None

    async def work() -> dict[str, Any]:
        settings = _read_settings()
        store = await _reader(settings)
        try:
            view = await ReadModel(store.pool).session_view(wanted)
        finally:
            await store.pool.close()
        if view is None:
            _say(f"no session {wanted}")
            raise _Stop(EXIT_NOT_FOUND)
        return view.to_document()

    view = _run(work)
    if _as_json(as_json):
        _print_json(view)
        return
    flat = {k: v for k, v in view.items() if not isinstance(v, dict)}
    for part in ("finalized", "billing", "end"):
        flat |= {f"{part}.{k}": v for k, v in view.get(part, {}).items()}
    _table(f"Session {wanted}", ("field", "value"), sorted(flat.items()))


# -- riders --------------------------------------------------------------------------------


@riders_app.command("erase")
def riders_erase(
    rider_id: Annotated[str, typer.Argument(metavar="RIDER_ID")], as_json: Json = False
) -> None:
    """Erase a rider (GDPR Art. 17): the pseudonym's mapping, and the rider id in kept
    rejections and outbox rows. Bills, analytics and totals do not change. Idempotent."""
    from daemon.db.privacy import RiderStillActive, erase_rider

    if not rider_id or "\x00" in rider_id:
        _say("chargeflow: usage error: RIDER_ID must be a non-empty id without NUL characters")
        raise typer.Exit(EXIT_USAGE)

    async def work() -> dict[str, Any]:
        store = await _reader(_read_settings())
        try:
            async with store.pool.acquire() as conn:
                erasure = await erase_rider(conn, rider_id)
        except RiderStillActive as exc:
            _say(f"chargeflow: not erased: {exc}")
            raise _Stop(EXIT_FAILURE) from None
        finally:
            await store.pool.close()
        return {
            "erased": not erasure.nothing_left,
            "pseudonym": erasure.pseudonym,
            "sessions": erasure.sessions,
            "rejections_redacted": erasure.rejections_redacted,
            "outbox_redacted": erasure.outbox_redacted,
        }

    report = _run(work)
    if _as_json(as_json):
        _print_json(report)
    elif not report["erased"]:
        print("nothing left to erase: no mapping, kept rejection or outbox row names this rider")
    else:
        print(
            f"rider erased: pseudonym {report['pseudonym'] or '(none)'}, "
            f"{report['sessions']} ride(s) now show the rider as erased, "
            f"{report['rejections_redacted']} kept rejection(s) and "
            f"{report['outbox_redacted']} outbox row(s) redacted"
        )


# -- rejections ----------------------------------------------------------------------------


def _selection(
    bike_id: str | None, reason: str | None, since: str | None, until: str | None, limit: int
) -> Any:
    from daemon.db.views import RejectionFilter

    try:
        code = None if reason is None else Reason(reason)
    except ValueError:
        raise UsageError(
            f"--reason must be one of {', '.join(r.value for r in Reason)}, got {reason!r}"
        ) from None
    return RejectionFilter(
        bike_id, code, _timestamp(since, "--from"), _timestamp(until, "--to"), limit=limit
    )


@rejections_app.command("list")
def rejections_list(  # noqa: PLR0913 - a Typer command: each option is a parameter
    bike_id: str | None = None,
    reason: Annotated[str | None, typer.Option(help=", ".join(r.value for r in Reason))] = None,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_PAGE)] = 50,
    as_json: Json = False,
) -> None:
    """Kept rejections, newest first."""
    from daemon.db.views import ReadModel

    async def work() -> list[Any]:
        settings = _read_settings()
        selection = _selection(bike_id, reason, since, until, limit)
        store = await _reader(settings)
        try:
            return await ReadModel(store.pool).rejections(selection)
        finally:
            await store.pool.close()

    kept = _run(work)
    if _as_json(as_json):
        _print_json({"rejections": [r.to_document() for r in kept]})
        return
    _table(
        "Kept rejections (newest first)",
        ("id", "received", "bike", "reason", "detail", "bytes"),
        [
            (
                r.id,
                utc_text(r.received_at),
                r.bike_id,
                r.reason,
                r.detail,
                r.payload_size,
            )
            for r in kept
        ],
    )


@rejections_app.command("replay")
def rejections_replay(  # noqa: PLR0913 - a Typer command: each option is a parameter
    bike_id: str | None = None,
    reason: Annotated[str | None, typer.Option(help=", ".join(r.value for r in Reason))] = None,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 1000,
    as_json: Json = False,
) -> None:
    """Decide selected kept rejections again (oldest first), as if they had just arrived."""
    from daemon.service.replay import replay

    async def work() -> list[Any]:
        settings = _settings()
        selection = _selection(bike_id, reason, since, until, min(limit, MAX_PAGE))
        store = await _store(settings)
        try:
            with _progress("replaying", None) as step:
                return await replay(settings, store, selection, limit, step)
        finally:
            await store.pool.close()

    results = _run(work)
    if _as_json(as_json):
        _print_json({"replayed": [r.to_document() for r in results]})
    else:
        _table(
            "Replayed",
            ("id", "topic", "was", "now", "reason", "detail"),
            [
                (
                    r.rejection.id,
                    r.rejection.topic,
                    r.rejection.reason,
                    r.outcome,
                    r.reason,
                    r.detail,
                )
                for r in results
            ],
        )
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "nothing"
    _say(f"replayed {len(results)}: {summary}")


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: run the app, return its exit code."""
    try:
        app(args=list(argv) if argv is not None else None, prog_name="chargeflow")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
