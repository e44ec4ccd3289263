"""The HTTP port lets no one in who does not belong, and answers bad input with a 400."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import urllib.error
import urllib.request
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import missing_service
from tests.e2e.helpers import running_daemon, settings_for

pytestmark = pytest.mark.e2e

TOKEN = secrets.token_hex(24)
DATA = ["/analytics", "/pricing", "/rejections", "/sessions/00000000-0000-4000-8000-000000000000"]


async def call(
    port: int,
    path: str,
    token: str | None = None,
    method: str = "GET",
    host: str = "127.0.0.1",
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, body: JSON when it is JSON) of one request."""
    request = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")

    def send() -> tuple[int, dict[str, str], Any]:
        try:
            response = urllib.request.urlopen(request, timeout=10)
        except urllib.error.HTTPError as error:
            response = error
        with response:
            body = response.read()
            ctype = response.headers.get("Content-Type", "")
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                json.loads(body) if "json" in ctype else body.decode(),
            )

    return await asyncio.to_thread(send)


@pytest.fixture
async def guarded(database_url, broker, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# operators\nops:{TOKEN}\n{secrets.token_hex(20)}\n")
    settings = settings_for(database_url, broker.daemon_url, http_tokens_file=tokens)
    async with running_daemon(settings) as daemon:
        yield daemon


@pytest.mark.parametrize("path", DATA)
async def test_data_without_a_token_is_refused_with_401_and_a_bearer_challenge(guarded, path):
    status, headers, body = await call(guarded.http.bound_port, path)
    assert (status, body["status"]) == (401, 401)
    assert headers["content-type"] == "application/problem+json"
    assert headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("path", DATA)
async def test_data_with_a_wrong_token_is_refused_and_the_token_is_never_logged(guarded, path):
    wrong = secrets.token_hex(24)
    with capture_logs() as logs:
        status, _, body = await call(guarded.http.bound_port, path, token=wrong)
    assert status == 401
    assert "not one of the configured tokens" in body["detail"]
    assert any(e["event"] == "http request refused" and e["reason"] == "invalid" for e in logs)
    assert wrong not in repr(logs)
    assert guarded.metrics.http_auth_failures.labels("invalid")._value.get() >= 1


@pytest.mark.parametrize("path", DATA)
async def test_data_with_a_configured_token_is_served(guarded, path):
    status, _, _ = await call(guarded.http.bound_port, path, token=TOKEN)
    assert status == (404 if path.startswith("/sessions/") else 200)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"])
async def test_health_metrics_and_the_api_description_need_no_token(guarded, path):
    status, _, _ = await call(guarded.http.bound_port, path)
    assert status == 200


async def test_metrics_can_be_put_behind_the_tokens(database_url, broker, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"prometheus:{TOKEN}\n")
    settings = settings_for(
        database_url, broker.daemon_url, http_tokens_file=tokens, metrics_auth="token"
    )
    async with running_daemon(settings) as daemon:
        port = daemon.http.bound_port
        assert (await call(port, "/metrics"))[0] == 401
        status, _, text = await call(port, "/metrics", token=TOKEN)
        assert status == 200 and "chargeflow_ready" in text
        assert (await call(port, "/healthz"))[0] == 200


async def test_the_openapi_description_declares_the_bearer_scheme_and_every_answer(guarded):
    _, _, document = await call(guarded.http.bound_port, "/openapi.json")
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A token from the daemon's CHARGEFLOW_HTTP_TOKENS_FILE",
    }
    for path in ("/analytics", "/pricing", "/rejections", "/sessions/{session_id}"):
        operation = document["paths"][path]["get"]
        assert operation["security"] == [{"bearerToken": []}]
        assert {"200", "400", "401", "403", "503"} <= set(operation["responses"])
        assert "422" not in operation["responses"]
        assert "application/problem+json" in operation["responses"]["400"]["content"]
    assert "HTTPValidationError" not in document["components"]["schemas"]


def _non_loopback_address() -> str:
    """An address of this machine that is not loopback (a dummy interface when it has none)."""
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    for line in out.splitlines():
        return line.split()[3].split("/")[0]
    added = subprocess.run(
        "ip link add cf-http-test type dummy && ip addr add 198.51.100.7/32 dev cf-http-test"
        " && ip link set cf-http-test up",
        shell=True,
        capture_output=True,
        check=False,
    )
    if added.returncode != 0:
        missing_service("a non-loopback address on this machine (no global address, no root)")
    return "198.51.100.7"


async def test_without_tokens_no_data_is_served_to_another_host(database_url, broker):
    address = _non_loopback_address()
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))  # the daemon listens on every interface
        port = probe.getsockname()[1]
    settings = settings_for(database_url, broker.daemon_url, http_host="0.0.0.0", http_port=port)
    with capture_logs() as logs:
        async with running_daemon(settings) as daemon:
            for path in DATA:
                status, _, body = await call(port, path, host=address)
                assert status == 403, path
                assert "CHARGEFLOW_HTTP_TOKENS_FILE" in body["detail"]
            assert (await call(port, "/healthz", host=address))[0] == 200
            assert (await call(port, "/readyz", host=address))[0] == 200
            assert (await call(port, "/pricing"))[0] == 200  # loopback: the local operator
            refused = daemon.metrics.http_auth_failures.labels("not_configured")._value.get()
    assert refused == len(DATA)
    assert any("no HTTP tokens configured" in e["event"] for e in logs)


@pytest.mark.parametrize(
    ("path", "parameter"),
    [
        ("/rejections?before=27265374981999814508544", "before"),
        ("/rejections?before=9223372036854775808", "before"),
        ("/analytics?from=0001-01-01T00:00:00%2B14:00", "from"),
        ("/analytics?to=9999-12-31T23:59:59-14:00", "to"),
        ("/rejections?from=0001-01-01T00:00:00%2B14:00", "from"),
        ("/analytics?to=0.5", "to"),
        ("/analytics?from=2026-12-01T00:00:00", "from"),  # naive
        ("/rejections?limit=0", "limit"),
    ],
)
async def test_a_parameter_out_of_range_is_a_400_naming_it_never_a_5xx(guarded, path, parameter):
    status, headers, body = await call(guarded.http.bound_port, path, token=TOKEN)
    assert (status, headers["content-type"]) == (400, "application/problem+json")
    assert [e["parameter"] for e in body["errors"]] == [parameter]


async def test_a_method_the_port_does_not_answer_names_the_ones_it_does(guarded):
    status, headers, body = await call(guarded.http.bound_port, "/analytics", method="TRACE")
    assert (status, body["status"]) == (405, 405)
    assert headers["allow"] == "GET"
