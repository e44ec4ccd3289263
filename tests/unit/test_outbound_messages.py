"""Outbound messages of SPEC §2: the exact topics and payloads downstream services rely on."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from daemon.config import DEFAULT_PRICING_FILE
from daemon.mqtt.messages import billing_message, finalized_message, rejection_message
from daemon.mqtt.schemas import Rejection
from daemon.pricing_text import parse_pricing
from domain.billing import bill
from domain.errors import Reason
from domain.session_values import EndReason, FinalizedSession, SessionKind
from tests.builders import T0, bike_id

PREFIX = "chargeflow/v1"
PRICING = parse_pricing(DEFAULT_PRICING_FILE.read_text(encoding="utf-8"))

FINALIZED_FIELDS = {
    "session_id",
    "bike_id",
    "kind",
    "started_at",
    "ended_at",
    "duration_s",
    "energy_wh",
    "distance_m",
    "telemetry_count",
    "missing_samples",
    "end_reason",
    "finalized_at",
}


def finalized(
    kind: SessionKind = SessionKind.RIDE,
    bike: str | None = None,
    session_id: uuid.UUID | None = None,
    party_id: str = "rider-7",
    duration: timedelta = timedelta(minutes=30),
    energy_wh: str = "1234.5",
    distance_m: str = "8200.25",
    end_reason: EndReason = EndReason.ENDED,
    started_at: datetime = T0,
) -> FinalizedSession:
    return FinalizedSession(
        session_id=session_id or uuid.uuid4(),
        bike_id=bike or bike_id(),
        kind=kind,
        party_id=party_id,
        started_at=started_at,
        ended_at=started_at + duration,
        energy_wh=Decimal(energy_wh),
        distance_m=Decimal(distance_m),
        telemetry_count=12,
        missing_samples=1,
        end_reason=end_reason,
        finalized_at=started_at + duration + timedelta(seconds=5),
    )


def payload_of(message: tuple[str, bytes]) -> dict[str, Any]:
    return json.loads(message[1])


# -- sessions/finalized ----------------------------------------------------------------


def test_a_finalized_session_is_published_on_the_bikes_finalized_topic():
    session = finalized()

    topic, _ = finalized_message(PREFIX, session)

    assert topic == f"chargeflow/v1/bikes/{session.bike_id}/sessions/finalized"


def test_a_finalized_ride_has_exactly_the_spec_fields_with_its_rider():
    session = finalized(SessionKind.RIDE, party_id="rider-7")

    payload = payload_of(finalized_message(PREFIX, session))

    assert payload == {
        "session_id": str(session.session_id),
        "bike_id": session.bike_id,
        "kind": "ride",
        "rider_id": "rider-7",
        "started_at": "2026-11-24T08:00:00Z",
        "ended_at": "2026-11-24T08:30:00Z",
        "duration_s": 1800,
        "energy_wh": "1234.5",
        "distance_m": "8200.25",
        "telemetry_count": 12,
        "missing_samples": 1,
        "end_reason": "ended",
        "finalized_at": "2026-11-24T08:30:05Z",
    }


def test_a_finalized_charging_session_names_its_station_and_no_rider():
    session = finalized(SessionKind.CHARGING, party_id="station-3")

    payload = payload_of(finalized_message(PREFIX, session))

    assert set(payload) == FINALIZED_FIELDS | {"station_id"}
    assert payload["kind"] == "charging"
    assert payload["station_id"] == "station-3"


def test_duration_is_a_json_number_of_seconds():
    _, raw = finalized_message(PREFIX, finalized(duration=timedelta(minutes=30)))

    assert b'"duration_s":1800,' in raw


def test_a_fractional_duration_keeps_its_fraction():
    payload = payload_of(finalized_message(PREFIX, finalized(duration=timedelta(seconds=90.5))))

    assert payload["duration_s"] == 90.5


def test_energy_and_distance_are_published_as_decimal_strings():
    session = finalized(energy_wh="0.1", distance_m="0.30")

    payload = payload_of(finalized_message(PREFIX, session))

    assert payload["energy_wh"] == "0.1"
    assert payload["distance_m"] == "0.3"


@pytest.mark.parametrize(
    ("total", "published"),
    [("2.500", "2.5"), ("2.5", "2.5"), ("1E+3", "1000"), ("1000", "1000"), ("0.000", "0"),
     ("0E-6", "0"), ("120.000001", "120.000001")],
)  # fmt: skip
def test_equal_quantities_have_one_published_form_whatever_their_scale(total, published):
    payload = payload_of(finalized_message(PREFIX, finalized(energy_wh=total, distance_m=total)))

    assert (payload["energy_wh"], payload["distance_m"]) == (published, published)


def test_an_energy_total_is_published_in_plain_decimal_notation():
    payload = payload_of(finalized_message(PREFIX, finalized(energy_wh="1E+3")))

    assert payload["energy_wh"] == "1000"


def test_a_timed_out_session_says_so():
    payload = payload_of(finalized_message(PREFIX, finalized(end_reason=EndReason.TIMED_OUT)))

    assert payload["end_reason"] == "timed_out"


def test_timestamps_with_another_offset_are_published_as_the_same_instant():
    paris = timezone(timedelta(hours=1))
    session = finalized(started_at=T0.astimezone(paris))

    payload = payload_of(finalized_message(PREFIX, session))

    assert datetime.fromisoformat(payload["started_at"]) == T0
    assert datetime.fromisoformat(payload["ended_at"]) == T0 + timedelta(minutes=30)


@pytest.mark.parametrize(
    "offset", [timedelta(hours=5, minutes=30), timedelta(hours=-7), timedelta(0)]
)
def test_every_published_timestamp_is_utc_with_z_whatever_offset_it_came_in(offset):
    session = finalized(started_at=T0.astimezone(timezone(offset)))

    payload = payload_of(finalized_message(PREFIX, session))

    for field in ("started_at", "ended_at", "finalized_at"):
        assert payload[field].endswith("Z"), payload[field]
        assert "+" not in payload[field]
    assert payload["started_at"] == T0.astimezone(UTC).isoformat().replace("+00:00", "Z")


# -- rejections ------------------------------------------------------------------------


def test_a_rejection_is_published_on_the_bikes_rejections_topic():
    bike = bike_id()

    rejection = Rejection(
        f"{PREFIX}/bikes/{bike}/telemetry", bike, Reason.SCHEMA_VIOLATION, "seq: …"
    )

    topic, _ = rejection_message(PREFIX, bike, rejection, T0)

    assert topic == f"chargeflow/v1/bikes/{bike}/rejections"


def test_a_rejection_names_both_ids_when_they_are_known():
    bike = bike_id()
    session_id, telemetry_id = uuid.uuid4(), uuid.uuid4()
    inbound_topic = f"{PREFIX}/bikes/{bike}/telemetry"

    payload = payload_of(
        rejection_message(
            PREFIX,
            bike,
            Rejection(
                inbound_topic,
                bike,
                Reason.UNKNOWN_SESSION,
                "no such session",
                session_id=session_id,
                telemetry_id=telemetry_id,
            ),
            T0,
        )
    )

    assert payload == {
        "topic": inbound_topic,
        "reason": "unknown_session",
        "detail": "no such session",
        "session_id": str(session_id),
        "telemetry_id": str(telemetry_id),
        "received_at": "2026-11-24T08:00:00Z",
    }


def test_a_rejection_leaves_out_ids_that_are_not_known():
    bike = bike_id()

    payload = payload_of(
        rejection_message(
            PREFIX,
            bike,
            Rejection(f"{PREFIX}/bikes/{bike}/telemetry", bike, Reason.MALFORMED_JSON, "not JSON"),
            T0,
        )
    )

    assert set(payload) == {"topic", "reason", "detail", "received_at"}


def test_a_rejection_with_only_a_session_id_names_only_that():
    bike = bike_id()
    session_id = uuid.uuid4()

    payload = payload_of(
        rejection_message(
            PREFIX,
            bike,
            Rejection(
                f"{PREFIX}/bikes/{bike}/lifecycle",
                bike,
                Reason.ACTIVE_SESSION_EXISTS,
                "bike is busy",
                session_id=session_id,
            ),
            T0,
        )
    )

    assert payload["session_id"] == str(session_id)
    assert "telemetry_id" not in payload


# -- billing ---------------------------------------------------------------------------


def test_a_billing_record_is_published_on_the_bikes_billing_topic():
    record = bill(finalized(), PRICING)

    topic, _ = billing_message(PREFIX, record)

    assert topic == f"chargeflow/v1/bikes/{record.bike_id}/billing"


def test_a_billing_payload_has_the_spec_fields_with_money_as_decimal_strings():
    session = finalized(SessionKind.RIDE, energy_wh="1234.5")

    payload = payload_of(billing_message(PREFIX, bill(session, PRICING)))

    assert payload == {
        "session_id": str(session.session_id),
        "bike_id": session.bike_id,
        "kind": "ride",
        "billable_energy_wh": "1234.5",
        "unit_price": "0.30",
        "currency": "EUR",
        "amount": "0.37",
        "pricing_version": "2026-01",
    }


def test_equal_billing_records_give_byte_identical_payloads():
    bike, session_id = bike_id(), uuid.uuid4()
    first = bill(finalized(SessionKind.CHARGING, bike, session_id, "station-3"), PRICING)
    second = bill(finalized(SessionKind.CHARGING, bike, session_id, "station-3"), PRICING)

    assert first is not second
    assert billing_message(PREFIX, first) == billing_message(PREFIX, second)


def test_different_billing_records_give_different_payloads():
    bike, session_id = bike_id(), uuid.uuid4()
    small = bill(finalized(bike=bike, session_id=session_id, energy_wh="500"), PRICING)
    large = bill(finalized(bike=bike, session_id=session_id, energy_wh="1500"), PRICING)

    assert billing_message(PREFIX, small)[1] != billing_message(PREFIX, large)[1]


def test_a_billing_record_is_published_as_these_exact_bytes():
    """The bytes of a bill are its fields sorted by key, as in every release since the first:
    the same record is the same bytes, whichever version published it."""
    session = finalized(SessionKind.RIDE, energy_wh="1234.5")

    _, raw = billing_message(PREFIX, bill(session, PRICING))

    assert raw == (
        b'{"amount":"0.37","bike_id":"' + session.bike_id.encode() + b'",'
        b'"billable_energy_wh":"1234.5","currency":"EUR","kind":"ride",'
        b'"pricing_version":"2026-01","session_id":"' + str(session.session_id).encode() + b'",'
        b'"unit_price":"0.30"}'
    )
