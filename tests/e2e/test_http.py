"""The HTTP port over a running daemon: OpenAPI, problem details, rejections, metrics."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from openapi_spec_validator import validate

from tests.e2e.helpers import wait_until

pytestmark = pytest.mark.e2e


async def fetch(daemon, path: str) -> tuple[int, str, Any]:
    """(status, content type, body: JSON when it is JSON) of a GET."""
    url = f"http://127.0.0.1:{daemon.http.bound_port}{path}"

    def get() -> tuple[int, str, Any]:
        try:
            response = urllib.request.urlopen(url, timeout=10)
        except urllib.error.HTTPError as error:
            response = error
        with response:
            ctype = response.headers.get("Content-Type", "")
            body = response.read()
            return response.status, ctype, json.loads(body) if "json" in ctype else body.decode()

    return await asyncio.to_thread(get)


async def test_the_openapi_description_is_served_and_valid(daemon):
    status, _, document = await fetch(daemon, "/openapi.json")

    assert status == 200
    validate(document)
    assert {"/analytics", "/pricing", "/sessions/{session_id}", "/rejections", "/readyz"} <= set(
        document["paths"]
    )


async def test_errors_are_problem_details_that_say_what_is_wrong(daemon):
    status, ctype, body = await fetch(daemon, "/rejections?reason=bad_mood&limit=5000")

    assert (status, ctype) == (400, "application/problem+json")
    assert body["title"] == "Invalid request"
    assert {e["parameter"] for e in body["errors"]} == {"reason", "limit"}
    assert "malformed_json" in body["detail"]  # the reasons that exist are named

    status, ctype, body = await fetch(daemon, "/sessions/00000000-0000-4000-8000-000000000000")
    assert (status, ctype, body["status"]) == (404, "application/problem+json", 404)
    assert body["detail"] == "no session 00000000-0000-4000-8000-000000000000"

    status, ctype, body = await fetch(daemon, "/nowhere")
    assert (status, ctype, body["detail"]) == (
        404,
        "application/problem+json",
        "no such path /nowhere",
    )


async def test_kept_rejections_are_listed_by_bike_and_reason_a_page_at_a_time(
    daemon, bike, outbound
):
    sent = [b'{"seq": ', b"[1]", b'{"telemetry_id": 7}']
    for payload in sent:
        await bike.send("telemetry", payload)
    await outbound.wait_for(bike.bike_id, "rejections", count=3)

    status, _, page = await fetch(daemon, f"/rejections?bike_id={bike.bike_id}&limit=2")
    assert status == 200
    assert [r["payload_text"].encode() for r in page["rejections"]] == sent[::-1][:2]
    assert page["next"] is not None
    status, _, rest = await fetch(daemon, page["next"])
    assert [r["payload_text"].encode() for r in rest["rejections"]] == sent[:1]
    assert rest["next"] is None

    status, _, malformed = await fetch(
        daemon, f"/rejections?bike_id={bike.bike_id}&reason=malformed_json"
    )
    assert [(r["reason"], r["topic"]) for r in malformed["rejections"]] == [
        ("malformed_json", f"chargeflow/v1/bikes/{bike.bike_id}/telemetry")
    ]
    status, _, later = await fetch(
        daemon, f"/rejections?bike_id={bike.bike_id}&from=2999-01-01T00:00:00Z"
    )
    assert later["rejections"] == []


@pytest.mark.parametrize(
    "query",
    ["/analytics?pricing_version=%00", "/analytics?bike_id=%00", "/rejections?bike_id=a%00b"],
)
async def test_text_the_database_cannot_hold_is_a_400_naming_the_parameter(daemon, query):
    """schemathesis found the first (seed 777): NUL reached the query and failed it (500)."""
    status, ctype, body = await fetch(daemon, query)

    assert (status, ctype) == (400, "application/problem+json")
    parameter = query.split("?")[1].split("=")[0]
    assert [e["parameter"] for e in body["errors"]] == [parameter]


async def test_readiness_names_the_broker_the_daemon_is_on(daemon):
    await wait_until(lambda: all(daemon.ready().values()), what="ready")

    status, _, body = await fetch(daemon, "/readyz")

    assert status == 200
    node = daemon.link.node
    assert body["broker"] == node.display and "***" in body["broker"]
    assert body["partition"] is None  # no CHARGEFLOW_PARTITION: every bike, no claims


async def test_metrics_are_prometheus_text_and_ready_is_current(daemon):
    await wait_until(lambda: all(daemon.ready().values()), what="ready")

    status, ctype, text = await fetch(daemon, "/metrics")

    assert status == 200
    assert ctype.startswith("text/plain")
    assert "chargeflow_ready 1.0" in text
    assert "# TYPE chargeflow_messages_received_total counter" in text


async def test_the_asyncapi_document_is_served_for_the_daemons_prefix(daemon):
    from daemon.mqtt.contract import asyncapi_document

    status, ctype, document = await fetch(daemon, "/asyncapi.json")

    assert (status, ctype) == (200, "application/json")
    assert document == asyncapi_document(daemon.settings.topic_prefix)
    assert document["channels"]["telemetry"]["address"] == "chargeflow/v1/bikes/{bike_id}/telemetry"
