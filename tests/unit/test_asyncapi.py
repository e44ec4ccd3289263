"""The AsyncAPI document: generated from the code, committed fresh, valid, and true to the wire."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import jsonschema
import pytest

from daemon.documents import BillingPayload, FinalizedPayload, RejectionPayload
from daemon.mqtt.contract import asyncapi_document
from daemon.mqtt.messages import billing_message, finalized_message, rejection_message
from daemon.mqtt.schemas import Rejection
from daemon.simulate import FleetPlan, json_payload, messages
from domain.billing import bill
from domain.errors import Reason
from domain.session_values import EndReason, FinalizedSession, SessionKind
from tests.conftest import IN_CI, shipped_pricing

PREFIX = "chargeflow/v1"
COMMITTED = Path(__file__).resolve().parents[2] / "daemon" / "asyncapi.json"


def test_the_committed_document_is_what_the_code_generates():
    committed = json.loads(COMMITTED.read_text())

    assert committed == asyncapi_document(PREFIX), (
        "daemon/asyncapi.json is stale: regenerate it with "
        "`chargeflow asyncapi --prefix chargeflow/v1 > daemon/asyncapi.json`"
    )


def _asyncapi_3_schema() -> dict:
    """The official AsyncAPI 3.0.0 JSON schema (npm @asyncapi/specs, installed by .ci/run)."""
    path = os.environ.get("ASYNCAPI_SCHEMA")
    if not path or not Path(path).is_file():
        message = "ASYNCAPI_SCHEMA names no AsyncAPI 3.0.0 JSON schema (see .ci/run)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return json.loads(Path(path).read_text())


def test_the_document_is_valid_asyncapi_3():
    validator = jsonschema.Draft7Validator(_asyncapi_3_schema())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(
        asyncapi_document(PREFIX))]  # fmt: skip
    assert errors == []


def test_the_validation_would_notice_a_broken_document():
    validator = jsonschema.Draft7Validator(_asyncapi_3_schema())
    broken = asyncapi_document(PREFIX)
    broken["operations"]["receiveTelemetry"]["action"] = "get"
    assert not validator.is_valid(broken)


def _payload_validator(message: str) -> jsonschema.Draft202012Validator:
    document = asyncapi_document(PREFIX)
    schema = {**document["components"]["messages"][message]["payload"],
              "components": document["components"]}  # fmt: skip
    return jsonschema.Draft202012Validator(schema)


def test_what_publishers_send_matches_the_inbound_messages():
    lifecycle, telemetry = _payload_validator("Lifecycle"), _payload_validator("Telemetry")
    plan = FleetPlan(bikes=2, sessions_per_bike=2, samples_per_session=3, prefix=PREFIX, seed=5)
    for topic, document in messages(plan, datetime.now(UTC)):
        sent = json.loads(json_payload(document))
        validator = telemetry if topic.endswith("/telemetry") else lifecycle
        assert list(validator.iter_errors(sent)) == [], (topic, sent)


def test_a_string_energy_is_outside_the_documented_contract_as_it_is_outside_the_decoder():
    telemetry = _payload_validator("Telemetry")
    sample = {"telemetry_id": str(uuid.uuid4()), "session_id": str(uuid.uuid4()), "seq": 1,
              "emitted_at": "2026-01-01T00:00:00Z", "energy_wh": "12.5"}  # fmt: skip
    assert not telemetry.is_valid(sample)
    assert telemetry.is_valid({**sample, "energy_wh": 12.5})


def _finalized(kind: SessionKind) -> FinalizedSession:
    at = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    return FinalizedSession(
        session_id=uuid.uuid4(), bike_id="bike-7", kind=kind, party_id="p-1", started_at=at,
        ended_at=at + timedelta(minutes=9, seconds=30), energy_wh=Decimal("1234.50"),
        distance_m=Decimal("0"), telemetry_count=3, missing_samples=1,
        end_reason=EndReason.TIMED_OUT, finalized_at=at + timedelta(minutes=10),
        pricing_version="2026-01",
    )  # fmt: skip


@pytest.mark.parametrize("kind", list(SessionKind))
def test_what_the_builders_publish_matches_the_outbound_messages(kind):
    session = _finalized(kind)
    finalized = json.loads(finalized_message(PREFIX, session)[1])
    billing = json.loads(billing_message(PREFIX, bill(session, shipped_pricing()))[1])
    refused = Rejection(
        f"{PREFIX}/bikes/bike-7/telemetry", "bike-7", Reason.SEQ_BEYOND_END, "seq 9",
        uuid.uuid4(), uuid.uuid4(),
    )  # fmt: skip
    rejection = json.loads(rejection_message(PREFIX, "bike-7", refused, datetime.now(UTC))[1])

    for name, payload, model in [("SessionFinalized", finalized, FinalizedPayload),
                                 ("Billing", billing, BillingPayload),
                                 ("Rejection", rejection, RejectionPayload)]:  # fmt: skip
        assert list(_payload_validator(name).iter_errors(payload)) == [], (name, payload)
        model.model_validate(payload)
