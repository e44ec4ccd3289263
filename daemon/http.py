"""One HTTP port: /metrics, /healthz, /readyz and read-only JSON (/analytics, /sessions/{id}).

A deliberately small HTTP/1.1 server on asyncio streams: GET only, one request per connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from uuid import UUID

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daemon.db.views import ReadModel
from daemon.metrics import Metrics
from daemon.outbound import iso, plain
from domain.analytics import AnalyticsReport, KindFigures, project
from domain.billing import BillingRecord
from domain.commands import BIKE_ID_PATTERN, BIKE_ID_RULE

__all__ = ["HttpServer", "analytics_document"]

log = structlog.get_logger(__name__)
Response = tuple[int, str, bytes]


def _json(status: int, document: Any) -> Response:
    body = json.dumps(document, indent=2, default=str).encode() + b"\n"
    return status, "application/json", body


def _figures(f: KindFigures) -> dict[str, Any]:
    def dec(value: Decimal | None) -> str | None:
        return None if value is None else plain(value)

    return {
        "count": f.count,
        "energy_wh": plain(f.energy_wh),
        "distance_m": plain(f.distance_m),
        "duration_s": f.duration.total_seconds(),
        "average_energy_wh": dec(f.average_energy_wh),
        "average_duration_s": dec(f.average_duration_s),
        "revenue": {cur: str(v) for cur, v in f.revenue.items()},
        "average_amount": {cur: str(v) for cur, v in f.average_amount.items()},
        "timed_out": f.timed_out,
        "missing_samples": f.missing_samples,
        "session_ids": [str(i) for i in f.session_ids],
    }


def analytics_document(
    report: AnalyticsReport,
    bills: Sequence[BillingRecord],
    filters: dict[str, str | None],
) -> dict[str, Any]:
    by_version: dict[str, dict[str, Any]] = {}
    for record in bills:
        figures = by_version.setdefault(record.pricing_version, {"sessions": 0, "revenue": {}})
        figures["sessions"] += 1
        revenue = figures["revenue"]
        currency = record.amount.currency
        revenue[currency] = revenue.get(currency, Decimal(0)) + record.amount.amount
    return {
        "filters": filters,
        # Each session is billed by the pricing version it was finalized under.
        "by_pricing_version": {
            version: {
                "sessions": f["sessions"],
                "revenue": {cur: str(v) for cur, v in f["revenue"].items()},
            }
            for version, f in sorted(by_version.items())
        },
        "rides": _figures(report.rides),
        "charging": _figures(report.charging),
        "revenue": {cur: str(v) for cur, v in report.revenue.items()},
    }


def _timestamp(raw: str | None, name: str) -> datetime | None:
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise ValueError(f"{name} must be an RFC 3339 timestamp with an offset, got {raw!r}")
    return value


async def _analytics_query(
    reads: ReadModel,
    since: str | None,
    until: str | None,
    bike_id: str | None,
    pricing_version: str | None = None,
) -> dict[str, Any]:
    """Analytics over Finalized sessions, each billed by its own pricing version."""
    if bike_id is not None and not BIKE_ID_PATTERN.fullmatch(bike_id):
        raise ValueError(f"bike_id must match {BIKE_ID_RULE}")
    start, end = _timestamp(since, "from"), _timestamp(until, "to")
    sessions = await reads.finalized_sessions(start, end, bike_id, pricing_version)
    history = await reads.history()
    bills = [history.bill(s) for s in sessions]
    report = project(sessions, bills)
    filters = {
        "from": None if start is None else iso(start),
        "to": None if end is None else iso(end),
        "bike_id": bike_id,
        "pricing_version": pricing_version,
    }
    return analytics_document(report, bills, filters)


class HttpServer:
    def __init__(
        self,
        metrics: Metrics,
        reads: ReadModel | None,
        ready: Callable[[], dict[str, bool]],
        host: str,
        port: int,
    ) -> None:
        self.metrics = metrics
        self.reads = reads
        self.ready = ready
        self.host = host
        self.port = port
        self.bound_port: int | None = None
        self._routes: dict[str, Callable[[dict[str, list[str]]], Awaitable[Response]]] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/analytics": self._analytics,
            "/pricing": self._pricing,
        }

    async def serve(self) -> None:
        server = await asyncio.start_server(self._handle, self.host, self.port)
        self.bound_port = server.sockets[0].getsockname()[1]
        log.info("http listening", host=self.host, port=self.bound_port)
        async with server:
            await server.serve_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            method, target, _ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status, ctype, body = await self._respond(method, target)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ValueError,
            ConnectionError,
        ):
            status, ctype, body = 400, "text/plain", b"bad request\n"
        try:
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(self, method: str, target: str) -> Response:
        if method not in {"GET", "HEAD"}:
            return 405, "text/plain", b"only GET\n"
        url = urlsplit(target)
        query = parse_qs(url.query)
        route = self._routes.get(url.path)
        try:
            if route is not None:
                return await route(query)
            if url.path.startswith("/sessions/"):
                return await self._session(unquote(url.path.removeprefix("/sessions/")))
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        except Exception as exc:
            log.warning("http request failed", path=url.path, error=repr(exc))
            return _json(503, {"error": "the database is unavailable; try again"})
        return _json(
            404,
            {
                "error": f"no such path {url.path}",
                "paths": [
                    "/metrics",
                    "/healthz",
                    "/readyz",
                    "/analytics",
                    "/pricing",
                    "/sessions/{session_id}",
                ],
            },
        )

    async def _metrics(self, _: dict[str, list[str]]) -> Response:
        self.metrics.ready.set(1 if all(self.ready().values()) else 0)
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)

    async def _healthz(self, _: dict[str, list[str]]) -> Response:
        return _json(200, {"status": "alive"})

    async def _readyz(self, _: dict[str, list[str]]) -> Response:
        checks = self.ready()
        ok = all(checks.values())
        self.metrics.ready.set(1 if ok else 0)
        return _json(200 if ok else 503, {"ready": ok, "checks": checks})

    async def _analytics(self, query: dict[str, list[str]]) -> Response:
        if self.reads is None:
            return _json(503, {"error": "no database"})
        args = {k: v[-1] for k, v in query.items()}
        known = ("from", "to", "bike_id", "pricing_version")
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown parameters {', '.join(unknown)}; use {', '.join(known)}")
        return _json(
            200,
            await _analytics_query(
                self.reads,
                args.get("from"),
                args.get("to"),
                args.get("bike_id"),
                args.get("pricing_version"),
            ),
        )

    async def _pricing(self, _: dict[str, list[str]]) -> Response:
        if self.reads is None:
            return _json(503, {"error": "no database"})
        return _json(200, {"pricing_versions": await self.reads.pricing()})

    async def _session(self, raw: str) -> Response:
        if self.reads is None:
            return _json(503, {"error": "no database"})
        try:
            session_id = UUID(raw)
        except ValueError:
            raise ValueError(f"session id must be a UUID, got {raw!r}") from None
        view = await self.reads.session_view(session_id)
        if view is None:
            return _json(404, {"error": f"no session {session_id}"})
        return _json(200, view)


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
