"""One HTTP port: /metrics, /healthz, /readyz and the read-only JSON of the read model.

FastAPI, served by uvicorn inside the daemon's TaskGroup: operators get an OpenAPI description
(/openapi.json, /docs), query parameters validated with messages that name them, errors as
RFC 9457 problem details, keep-alive, and prometheus-client's own exposition app on /metrics.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Generator
from typing import Annotated, Any
from urllib.parse import urlencode
from uuid import UUID

import asyncpg
import structlog
import uvicorn
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import make_asgi_app
from pydantic import AwareDatetime
from starlette.exceptions import HTTPException
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from daemon import installed_version
from daemon.config import ConfigError
from daemon.db.views import ReadModel, RejectionFilter
from daemon.metrics import Metrics
from domain.commands import BIKE_ID_RULE
from domain.errors import Reason

__all__ = ["HttpServer", "build_app"]

log = structlog.get_logger(__name__)
PROBLEM = "application/problem+json"

Since = Annotated[
    AwareDatetime | None,
    Query(alias="from", description="RFC 3339 with an offset; at or after"),
]
Until = Annotated[AwareDatetime | None, Query(alias="to", description="RFC 3339; before")]
BikeId = Annotated[str | None, Query(pattern=f"^{BIKE_ID_RULE}$")]


def problem(status: int, title: str, detail: str, instance: str, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem details response."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    body |= {"instance": instance, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


class _Unavailable(Exception):
    """The read model is not there (yet): no database."""


class _Metrics:
    """prometheus-client's ASGI app, with the ready gauge brought up to date first."""

    def __init__(self, metrics: Metrics, ready: Callable[[], dict[str, bool]]) -> None:
        self.metrics, self.ready = metrics, ready
        self.app = make_asgi_app(metrics.registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.ready.set(1 if all(self.ready().values()) else 0)
        await self.app(scope, receive, send)


def build_app(server: HttpServer) -> FastAPI:
    app = FastAPI(
        title="ChargeFlow",
        summary="Read-only views of finalized sessions, bills, pricing and kept rejections",
        version=installed_version(),
    )
    app.router.routes.append(Route("/metrics", _Metrics(server.metrics, server.ready)))

    def reads() -> ReadModel:
        if server.reads is None:
            raise _Unavailable
        return server.reads

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        title = {404: "Not Found", 405: "Method Not Allowed"}.get(exc.status_code, "Error")
        detail = exc.detail if exc.status_code != 404 else f"no such path {request.url.path}"
        return problem(exc.status_code, title, str(detail), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"parameter": str(e["loc"][-1]), "message": e["msg"].removeprefix("Value error, ")}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{e['parameter']}: {e['message']}" for e in errors)
        return problem(400, "Invalid request", detail, request.url.path, errors=errors)

    @app.exception_handler(ValueError)
    async def _bad_value(request: Request, exc: ValueError) -> JSONResponse:
        return problem(400, "Invalid request", str(exc), request.url.path)

    @app.exception_handler(_Unavailable)
    @app.exception_handler(asyncpg.PostgresError)
    @app.exception_handler(asyncpg.InterfaceError)
    @app.exception_handler(OSError)
    async def _no_database(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, _Unavailable):
            log.warning("http request failed", path=request.url.path, error=repr(exc))
        return problem(
            503, "Service Unavailable", "the database is unavailable; try again", request.url.path
        )

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get(
        "/readyz",
        summary="Ready to ingest: database, broker and intake",
        responses={503: {"description": "Not ready; `checks` says what is missing"}},
    )
    async def readyz() -> JSONResponse:
        checks = server.ready()
        ok = all(checks.values())
        server.metrics.ready.set(1 if ok else 0)
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/analytics", summary="Totals, counts, averages and revenue of finalized sessions")
    async def analytics(
        since: Since = None,
        until: Until = None,
        bike_id: BikeId = None,
        pricing_version: str | None = None,
    ) -> dict[str, Any]:
        return await reads().analytics(since, until, bike_id, pricing_version)

    @app.get("/pricing", summary="Every pricing version recorded, its prices and first use")
    async def pricing() -> dict[str, Any]:
        return {"pricing_versions": await reads().pricing()}

    @app.get(
        "/sessions/{session_id}",
        summary="A session, its stored telemetry count and, once finalized, its bill",
        responses={404: {"description": "No such session"}},
    )
    async def session(session_id: Annotated[UUID, Path()], request: Request) -> Any:
        model = reads()
        view = await model.session_view(session_id)
        if view is None:
            return problem(404, "Not Found", f"no session {session_id}", request.url.path)
        return view.to_document(model.prefix)

    @app.get("/rejections", summary="Kept rejections, newest first, a page at a time")
    async def rejections(
        request: Request,
        bike_id: BikeId = None,
        reason: Reason | None = None,
        since: Since = None,
        until: Until = None,
        before: Annotated[int | None, Query(ge=1, description="id from `next`")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        f = RejectionFilter(bike_id, reason, since, until, before, limit)
        page = await reads().rejections(f)
        following = None
        if len(page) == limit:
            query = {k: v for k, v in request.query_params.items() if k != "before"}
            following = f"{request.url.path}?{urlencode({**query, 'before': page[-1].id})}"
        return {"rejections": [r.to_document() for r in page], "next": following}

    if server.asyncapi is not None:
        document = server.asyncapi

        @app.get("/asyncapi.json", summary="The MQTT contract as an AsyncAPI 3.0 document")
        async def asyncapi() -> dict[str, Any]:
            return document

    return app


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The daemon owns SIGTERM and SIGINT (they drain the pipeline); uvicorn must not take them.
        yield


class HttpServer:
    """The HTTP port, served inside the daemon's TaskGroup until cancelled."""

    def __init__(
        self,
        metrics: Metrics,
        reads: ReadModel | None,
        ready: Callable[[], dict[str, bool]],
        host: str,
        port: int,
        asyncapi: dict[str, Any] | None = None,
    ) -> None:
        self.metrics = metrics
        self.reads = reads
        self.ready = ready
        self.host = host
        self.port = port
        self.asyncapi = asyncapi
        self.bound_port: int | None = None
        self.app = build_app(self)

    async def serve(self) -> None:
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        server = _Server(config)
        try:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError as exc:
            raise ConfigError(
                f"CHARGEFLOW_HTTP_HOST/CHARGEFLOW_HTTP_PORT: cannot listen on "
                f"{self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        self.bound_port = sock.getsockname()[1]
        log.info("http listening", host=self.host, port=self.bound_port)
        finished = False
        try:
            await server.serve(sockets=[sock])
            finished = True
        finally:
            if not finished and server.started:  # cancelled: the daemon is stopping
                server.should_exit = True
                await server.shutdown(sockets=[sock])
            sock.close()
