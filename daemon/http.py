"""One HTTP port: /metrics, /healthz, /readyz and the read-only JSON of the read model.

FastAPI, served by uvicorn inside the daemon's TaskGroup: operators get an OpenAPI description
(/openapi.json, /docs), query parameters validated with messages that name them, errors as
RFC 9457 problem details, keep-alive, and prometheus-client's own exposition app on /metrics.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Callable, Generator, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol
from urllib.parse import urlencode
from uuid import UUID

import asyncpg
import structlog
import uvicorn
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import make_asgi_app
from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, Field
from starlette.exceptions import HTTPException
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from daemon import MAX_PAGE, installed_version
from daemon.config import ConfigError
from daemon.db.views import ReadModel, RejectionFilter
from daemon.http_auth import Denied, Tokens
from daemon.http_models import (
    Analytics,
    Health,
    PricingList,
    Readiness,
    RejectionsPage,
    SessionBody,
)
from daemon.metrics import Metrics
from domain.commands import BIKE_ID_RULE
from domain.errors import Reason

__all__ = ["HttpServer", "build_app"]

log = structlog.get_logger(__name__)
PROBLEM = "application/problem+json"

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")
_EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
_LATEST = datetime(9999, 12, 31, tzinfo=UTC)


def _instant_text(value: object) -> object:
    """Only RFC 3339 text with an offset: no numbers taken as Unix times, no naive times."""
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 date-time with an offset, e.g. 2026-12-01T00:00:00Z")
    return value


def _storable_instant(value: datetime) -> datetime:
    """An instant PostgreSQL can compare with: its UTC time within years 1 to 9999."""
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or not _EARLIEST <= utc <= _LATEST:
        raise ValueError("must fall (in UTC) between 0001-01-02 and 9999-12-31")
    return utc


Instant = Annotated[
    AwareDatetime, BeforeValidator(_instant_text), AfterValidator(_storable_instant)
]
Since = Annotated[
    Instant | None,
    Query(alias="from", description="RFC 3339 with an offset; at or after"),
]
Until = Annotated[Instant | None, Query(alias="to", description="RFC 3339 with an offset; before")]
BikeId = Annotated[str | None, Query(pattern=f"^{BIKE_ID_RULE}$")]


def _storable_text(value: str | None) -> str | None:
    """Text PostgreSQL can compare with: no NUL (its text type cannot hold one)."""
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


# Every free-text query parameter: what the database cannot hold is a 400 naming the
# parameter, never a failed query (schemathesis found /analytics?pricing_version=%00).
PricingVersion = Annotated[str | None, Query(max_length=128), AfterValidator(_storable_text)]


def problem(
    status: int,
    title: str,
    detail: str,
    instance: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """An RFC 9457 problem details response."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    body |= {"instance": instance, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


class ParameterProblem(BaseModel):
    """One query or path parameter that is wrong, and what is wrong with it."""

    parameter: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str
    errors: list[ParameterProblem] | None = Field(
        default=None, description="for 400: each parameter that is wrong"
    )


def _problem_response(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


# What every operation may answer besides 200, as documented in /openapi.json.
Responses = dict[int | str, dict[str, Any]]
_BAD_INPUT: Responses = {400: _problem_response("A parameter is wrong; `errors` names each one")}
_NO_DATABASE: Responses = {503: _problem_response("The database cannot be reached; try again")}
_CREDENTIALS: Responses = {
    401: _problem_response("No bearer token, or one that is not configured"),
    403: _problem_response(
        "No tokens are configured (CHARGEFLOW_HTTP_TOKENS_FILE) and the client is not on "
        "loopback: data is never served to another host without credentials"
    ),
}
_DATA: Responses = {**_BAD_INPUT, **_NO_DATABASE, **_CREDENTIALS}


class _Refused(Exception):
    """A data request without acceptable credentials."""

    def __init__(self, denied: Denied) -> None:
        self.denied = denied


_REFUSALS = {
    Denied.MISSING: (401, "Unauthorized", "a bearer token is required (Authorization: Bearer …)"),
    Denied.INVALID: (401, "Unauthorized", "the bearer token is not one of the configured tokens"),
    Denied.NOT_CONFIGURED: (
        403,
        "Forbidden",
        "no HTTP tokens are configured (CHARGEFLOW_HTTP_TOKENS_FILE): data is served to "
        "loopback clients only",
    ),
}


class _Unavailable(Exception):
    """The read model is not there (yet): no database."""


class _Metrics:
    """prometheus-client's ASGI app, with the ready gauge brought up to date first; behind the
    tokens when CHARGEFLOW_METRICS_AUTH=token."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.metrics, self.ready = server.metrics, server.instance.ready
        self.app = make_asgi_app(server.metrics.registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.server.metrics_auth == "token":
            request = Request(scope)
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            denied = self.server.refusal(
                request, token.strip() if scheme.lower() == "bearer" else None
            )
            if denied is not None:
                status, title, detail = _REFUSALS[denied]
                await problem(status, title, detail, "/metrics", headers=_challenge(status))(
                    scope, receive, send
                )
                return
        self.metrics.ready.set(1 if all(self.ready().values()) else 0)
        await self.app(scope, receive, send)


_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="bearerToken",
    description="A token from the daemon's CHARGEFLOW_HTTP_TOKENS_FILE",
)


async def _authorized(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
) -> None:
    """The dependency of every data endpoint (and so its security scheme in OpenAPI)."""
    server: HttpServer = request.app.state.server
    denied = server.refusal(request, credentials.credentials if credentials else None)
    if denied is not None:
        raise _Refused(denied)


_DATA_DEPENDENCIES = [Depends(_authorized)]


def _challenge(status: int) -> dict[str, str] | None:
    return {"WWW-Authenticate": 'Bearer realm="chargeflow"'} if status == 401 else None


def build_app(server: HttpServer) -> FastAPI:
    app = FastAPI(
        title="ChargeFlow",
        summary="Read-only views of finalized sessions, bills, pricing and kept rejections",
        version=installed_version(),
    )
    app.router.routes.append(Route("/metrics", _Metrics(server)))
    app.state.server = server
    _error_answers(app)
    _health_routes(app, server)
    _data_routes(app, _reads_of(server))
    _rejection_routes(app, _reads_of(server))
    if server.asyncapi is not None:
        document = server.asyncapi

        @app.get("/asyncapi.json", summary="The MQTT contract as an AsyncAPI 3.0 document")
        async def asyncapi() -> dict[str, Any]:
            return document

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _reads_of(server: HttpServer) -> Callable[[], ReadModel]:
    def reads() -> ReadModel:
        model = server.instance.read_model()
        if model is None:
            raise _Unavailable
        return model

    return reads


def _error_answers(app: FastAPI) -> None:
    """Every error as problem details; 503 only when the database cannot be reached."""

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        title = {404: "Not Found", 405: "Method Not Allowed"}.get(exc.status_code, "Error")
        detail = exc.detail if exc.status_code != 404 else f"no such path {request.url.path}"
        # Starlette's headers (Allow on a 405) are part of the answer.
        return problem(exc.status_code, title, str(detail), request.url.path, headers=exc.headers)

    @app.exception_handler(_Refused)
    async def _refused(request: Request, exc: _Refused) -> JSONResponse:
        status, title, detail = _REFUSALS[exc.denied]
        return problem(status, title, detail, request.url.path, headers=_challenge(status))

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
    @app.exception_handler(asyncpg.PostgresConnectionError)
    @app.exception_handler(asyncpg.CannotConnectNowError)
    @app.exception_handler(asyncpg.InterfaceError)
    @app.exception_handler(OSError)
    async def _no_database(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, _Unavailable):
            log.warning("http request failed", path=request.url.path, error=repr(exc))
        return problem(
            503, "Service Unavailable", "the database is unavailable; try again", request.url.path
        )

    @app.exception_handler(asyncpg.PostgresError)
    async def _database_refused(request: Request, exc: Exception) -> JSONResponse:
        # Reachable, but it refused the query: input the edge should have refused, or a bug of
        # ours. Never reported as an outage.
        log.error("http query refused by the database", path=request.url.path, error=repr(exc))
        return problem(500, "Internal Server Error", "the query failed", request.url.path)


def _health_routes(app: FastAPI, server: HttpServer) -> None:
    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> Health:
        return Health(status="alive")

    @app.get(
        "/readyz",
        summary="Ready to ingest: database, broker and intake",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Not ready; `checks` says what"}},
    )
    async def readyz() -> JSONResponse:
        checks = server.instance.ready()
        ok = all(checks.values())
        server.metrics.ready.set(1 if ok else 0)
        return JSONResponse(
            {
                "ready": ok,
                "checks": checks,
                "broker": server.instance.broker_node(),
                "partition": server.instance.partition_view(),
            },
            status_code=200 if ok else 503,
        )


def _data_routes(app: FastAPI, reads: Callable[[], ReadModel]) -> None:
    """Finalized sessions' analytics, the pricing history and one session (token needed)."""
    data = _DATA_DEPENDENCIES

    @app.get(
        "/analytics",
        summary="Totals, counts, averages and revenue of finalized sessions",
        dependencies=data,
        responses=_DATA,
    )
    async def analytics(
        since: Since = None,
        until: Until = None,
        bike_id: BikeId = None,
        pricing_version: PricingVersion = None,
    ) -> Analytics:
        return Analytics.model_validate(
            await reads().analytics(since, until, bike_id, pricing_version)
        )

    @app.get(
        "/pricing",
        summary="Every pricing version recorded, its prices and first use",
        dependencies=data,
        responses=_DATA,
    )
    async def pricing() -> PricingList:
        return PricingList.model_validate({"pricing_versions": await reads().pricing()})

    @app.get(
        "/sessions/{session_id}",
        summary="A session, its stored telemetry count and, once finalized, its bill",
        dependencies=data,
        response_model=SessionBody,
        response_model_exclude_none=True,
        responses={**_DATA, 404: _problem_response("No such session")},
    )
    async def session(session_id: Annotated[UUID, Path()], request: Request) -> Any:
        model = reads()
        view = await model.session_view(session_id)
        if view is None:
            return problem(404, "Not Found", f"no session {session_id}", request.url.path)
        return SessionBody.model_validate(view.to_document())


def _rejection_routes(app: FastAPI, reads: Callable[[], ReadModel]) -> None:
    """Kept rejections, a page at a time (token needed)."""
    data = _DATA_DEPENDENCIES

    @app.get(
        "/rejections",
        summary="Kept rejections, newest first, a page at a time",
        dependencies=data,
        responses=_DATA,
    )
    async def rejections(  # noqa: PLR0913 - a FastAPI route: each query parameter is a parameter
        request: Request,
        bike_id: BikeId = None,
        reason: Reason | None = None,
        since: Since = None,
        until: Until = None,
        before: Annotated[
            int | None, Query(ge=1, le=2**63 - 1, description="id from `next`")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    ) -> RejectionsPage:
        f = RejectionFilter(bike_id, reason, since, until, before, limit)
        page = await reads().rejections(f)
        following = None
        if len(page) == limit:
            query = {k: v for k, v in request.query_params.items() if k != "before"}
            following = f"{request.url.path}?{urlencode({**query, 'before': page[-1].id})}"
        return RejectionsPage.model_validate(
            {"rejections": [r.to_document() for r in page], "next": following}
        )


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, told the truth: bad input is 400 problem details (never the 422 it
    documents by default), and every problem is ``application/problem+json``."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            responses.pop("422", None)
            for code, response in responses.items():
                content = response.get("content", {})
                if code != "200" and "application/json" in content:
                    content[PROBLEM] = content.pop("application/json")
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    app.openapi_schema = document
    return document


def _loopback_only(host: str) -> bool:
    return host in {"localhost", "::1"} or host.startswith("127.")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The daemon owns SIGTERM and SIGINT (they drain the pipeline); uvicorn must not take them.
        yield


class Instance(Protocol):
    """What the HTTP port reads of the daemon it serves (``app.Daemon``)."""

    def read_model(self) -> ReadModel | None:
        """The read model, once the database is there."""
        ...

    def ready(self) -> dict[str, bool]:
        """Each readiness check, by name."""
        ...

    def broker_node(self) -> str | None:
        """Which broker of the list the daemon is on, for /readyz."""
        ...

    def partition_view(self) -> dict[str, list[str]] | None:
        """The partition claims it takes and sees, for /readyz."""
        ...


class HttpServer:
    """The HTTP port, served inside the daemon's TaskGroup until cancelled."""

    def __init__(  # noqa: PLR0913 - the port, its settings by keyword (app.py)
        self,
        metrics: Metrics,
        instance: Instance,
        host: str,
        port: int,
        *,
        asyncapi: dict[str, Any] | None = None,
        tokens: Tokens | None = None,
        metrics_auth: str = "open",
    ) -> None:
        self.tokens = tokens or Tokens()
        self.metrics_auth = metrics_auth
        self.metrics = metrics
        self.instance = instance
        self.host = host
        self.port = port
        self.asyncapi = asyncapi
        self.bound_port: int | None = None
        self.app = build_app(self)

    def refusal(self, request: Request, token: str | None) -> Denied | None:
        """Why this request may not read data (counted and logged, never the token), or None."""
        client = request.client.host if request.client else None
        denied = self.tokens.check(token, client)
        if denied is not None:
            self.metrics.http_auth_failures.labels(denied).inc()
            log.warning(
                "http request refused", path=request.url.path, client=client, reason=str(denied)
            )
        return denied

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
        if not self.tokens.configured and not _loopback_only(self.host):
            log.warning(
                "no HTTP tokens configured (CHARGEFLOW_HTTP_TOKENS_FILE): data endpoints answer "
                "loopback clients only; /healthz, /readyz and /metrics stay open",
                host=self.host,
            )
        finished = False
        try:
            await server.serve(sockets=[sock])
            finished = True
        finally:
            if not finished and server.started:  # cancelled: the daemon is stopping
                server.should_exit = True
                await server.shutdown(sockets=[sock])
            sock.close()
