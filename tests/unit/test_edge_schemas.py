"""The MQTT edge: inbound payloads become domain commands, or rejections that say why not."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError

from daemon.mqtt.schemas import (
    QUANTITY_MAX,
    QUANTITY_PLACES,
    Inbound,
    Percent,
    Quantity,
    TopicKind,
    decode,
)
from daemon.simulate import json_payload
from domain.commands import EndSession, RecordTelemetry, StartSession
from domain.session_values import SessionKind
from tests.builders import bike_id

PREFIX = "chargeflow/v1"
MAX_BYTES = 16_384
AT = "2026-11-24T08:00:00Z"
AT_UTC = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)


def lifecycle_topic(bike: str) -> str:
    return f"{PREFIX}/bikes/{bike}/lifecycle"


def telemetry_topic(bike: str) -> str:
    return f"{PREFIX}/bikes/{bike}/telemetry"


def telemetry_document(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "telemetry_id": str(uuid.uuid4()),
        "session_id": str(uuid.uuid4()),
        "seq": 1,
        "emitted_at": AT,
        "energy_wh": Decimal("12.5"),
    }
    document.update(overrides)
    return document


def lifecycle_document(event: str, **overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "event": event,
        "session_id": str(uuid.uuid4()),
        "occurred_at": AT,
    }
    if event == "ride_started":
        document["rider_id"] = "rider-7"
    elif event == "charging_started":
        document["station_id"] = "station-3"
    else:
        document["last_seq"] = 4
    document.update(overrides)
    return document


def decode_bytes(topic: str, payload: bytes, max_bytes: int = MAX_BYTES) -> Inbound:
    return decode(topic, payload, PREFIX, max_bytes)


def decode_json(topic: str, document: Any) -> Inbound:
    return decode_bytes(topic, json_payload(document))


def rejected(inbound: Inbound) -> tuple[str, str]:
    assert inbound.command is None
    assert inbound.rejection is not None
    return inbound.rejection.reason, inbound.rejection.detail


def telemetry_command(inbound: Inbound) -> RecordTelemetry:
    assert inbound.rejection is None
    assert isinstance(inbound.command, RecordTelemetry)
    return inbound.command


# -- lifecycle events ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "party_field", "kind"),
    [
        ("ride_started", "rider_id", SessionKind.RIDE),
        ("charging_started", "station_id", SessionKind.CHARGING),
    ],
)
def test_a_started_event_becomes_a_start_session_command(event, party_field, kind):
    bike = bike_id()
    document = lifecycle_document(event)

    inbound = decode_json(lifecycle_topic(bike), document)

    assert inbound.kind is TopicKind.LIFECYCLE
    assert inbound.rejection is None
    assert inbound.command == StartSession(
        bike, uuid.UUID(document["session_id"]), kind, document[party_field], AT_UTC
    )


@pytest.mark.parametrize(
    ("event", "kind"),
    [("ride_ended", SessionKind.RIDE), ("charging_ended", SessionKind.CHARGING)],
)
def test_an_ended_event_becomes_an_end_session_command_with_its_last_seq(event, kind):
    bike = bike_id()
    document = lifecycle_document(event, last_seq=17)

    inbound = decode_json(lifecycle_topic(bike), document)

    assert inbound.rejection is None
    assert inbound.command == EndSession(bike, uuid.UUID(document["session_id"]), kind, AT_UTC, 17)


def test_an_ended_event_with_last_seq_zero_is_accepted():
    command = decode_json(
        lifecycle_topic(bike_id()), lifecycle_document("ride_ended", last_seq=0)
    ).command

    assert isinstance(command, EndSession)
    assert command.last_seq == 0


def test_a_timestamp_with_an_offset_keeps_its_instant():
    command = decode_json(
        lifecycle_topic(bike_id()),
        lifecycle_document("ride_started", occurred_at="2026-11-24T10:00:00+02:00"),
    ).command

    assert isinstance(command, StartSession)
    assert command.occurred_at == AT_UTC
    assert command.occurred_at.utcoffset() is not None


# -- telemetry -------------------------------------------------------------------------


def test_a_telemetry_payload_becomes_a_record_telemetry_command():
    bike = bike_id()
    document = telemetry_document(seq=3, energy_wh=Decimal("12.5"))

    command = telemetry_command(decode_json(telemetry_topic(bike), document))

    assert command.bike_id == bike
    assert command.sample.telemetry_id == uuid.UUID(document["telemetry_id"])
    assert command.sample.session_id == uuid.UUID(document["session_id"])
    assert command.sample.seq == 3
    assert command.sample.emitted_at.at == AT_UTC
    assert command.sample.energy.wh == Decimal("12.5")
    assert command.sample.distance is None
    assert command.sample.soc is None


def test_a_json_number_energy_is_read_as_an_exact_decimal():
    raw = json.dumps(telemetry_document(energy_wh="__ENERGY__")).replace('"__ENERGY__"', "0.1")

    command = telemetry_command(decode_bytes(telemetry_topic(bike_id()), raw.encode()))

    assert isinstance(command.sample.energy.wh, Decimal)
    # Decimal(0.1) would be 0.1000000000000000055511151231257827...: a float went through.
    assert command.sample.energy.wh == Decimal("0.1")
    assert str(command.sample.energy.wh) == "0.1"


def test_a_string_energy_is_a_schema_violation_numbers_are_json_numbers():
    reason, detail = rejected(
        decode_json(telemetry_topic(bike_id()), telemetry_document(energy_wh="12.5"))
    )

    assert reason == "schema_violation"
    assert detail == "energy_wh: Value error, must be a JSON number"


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("seq", 2**31, "less than or equal to 2147483647"),
        ("seq", 2**70, "less than or equal to 2147483647"),
        ("energy_wh", Decimal("1.0000001"), "no more than 6 decimal places"),
        ("energy_wh", Decimal("1000000000.5"), "less than or equal to 1000000000"),
        ("distance_m", Decimal("1E+12"), "less than or equal to 1000000000"),
    ],
)
def test_values_postgresql_or_an_exact_sum_cannot_hold_are_schema_violations(field, value, says):
    reason, detail = rejected(
        decode_json(telemetry_topic(bike_id()), telemetry_document(**{field: value}))
    )

    assert reason == "schema_violation"
    assert detail.startswith(f"{field}:")
    assert says in detail


@pytest.mark.parametrize("rider", ["a\x00b", "a\ud800b"])
def test_text_postgresql_cannot_store_is_a_schema_violation(rider):
    document = lifecycle_document("ride_started", rider_id=rider)

    reason, detail = rejected(decode_json(f"{PREFIX}/bikes/{bike_id()}/lifecycle", document))

    assert reason == "schema_violation"
    assert detail.startswith("rider_id:")


def test_a_last_seq_beyond_a_postgresql_integer_is_a_schema_violation():
    document = lifecycle_document("ride_ended", last_seq=2**70)

    reason, detail = rejected(decode_json(f"{PREFIX}/bikes/{bike_id()}/lifecycle", document))

    assert (reason, detail.split(":")[0]) == ("schema_violation", "last_seq")


def test_a_number_no_decimal_can_hold_is_answered_not_raised():
    raw = json_payload(telemetry_document()).replace(b"12.5", b"1e9999999999999999999")

    reason, detail = rejected(decode_bytes(telemetry_topic(bike_id()), raw))

    assert reason == "schema_violation"
    assert "number" in detail


def test_optional_distance_and_state_of_charge_are_carried_when_present():
    raw = json_payload(telemetry_document(distance_m="__D__", soc_pct="__S__")).decode()
    raw = raw.replace('"__D__"', "250.75").replace('"__S__"', "81.5")

    command = telemetry_command(decode_bytes(telemetry_topic(bike_id()), raw.encode()))

    assert command.sample.distance is not None
    assert command.sample.distance.m == Decimal("250.75")
    assert command.sample.soc is not None
    assert command.sample.soc.pct == Decimal("81.5")


# -- schema violations -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_of", "document", "field"),
    [
        (telemetry_topic, telemetry_document(emitted_at="2026-11-24T08:00:00"), "emitted_at"),
        (
            lifecycle_topic,
            lifecycle_document("ride_started", occurred_at="2026-11-24T08:00:00"),
            "occurred_at",
        ),
    ],
)
def test_a_naive_timestamp_is_a_schema_violation_naming_the_field(topic_of, document, field):
    reason, detail = rejected(decode_json(topic_of(bike_id()), document))

    assert reason == "schema_violation"
    assert field in detail
    assert "timezone" in detail


def test_a_unix_timestamp_is_refused():
    reason, detail = rejected(
        decode_json(telemetry_topic(bike_id()), telemetry_document(emitted_at=1_795_939_200))
    )

    assert reason == "schema_violation"
    assert "emitted_at" in detail
    assert "RFC 3339" in detail


def test_a_negative_energy_is_a_schema_violation():
    reason, detail = rejected(
        decode_json(telemetry_topic(bike_id()), telemetry_document(energy_wh=Decimal("-0.5")))
    )

    assert reason == "schema_violation"
    assert detail.startswith("energy_wh:")
    assert "greater than or equal to 0" in detail


def test_a_state_of_charge_over_100_is_a_schema_violation():
    reason, detail = rejected(
        decode_json(telemetry_topic(bike_id()), telemetry_document(soc_pct=Decimal("100.5")))
    )

    assert reason == "schema_violation"
    assert detail.startswith("soc_pct:")
    assert "less than or equal to 100" in detail


def test_a_seq_of_zero_is_a_schema_violation():
    reason, detail = rejected(decode_json(telemetry_topic(bike_id()), telemetry_document(seq=0)))

    assert reason == "schema_violation"
    assert detail.startswith("seq:")
    assert "greater than or equal to 1" in detail


def test_a_seq_given_as_a_string_is_refused():
    reason, detail = rejected(decode_json(telemetry_topic(bike_id()), telemetry_document(seq="1")))

    assert reason == "schema_violation"
    assert detail.startswith("seq:")
    assert "valid integer" in detail


def test_a_boolean_last_seq_is_refused():
    reason, detail = rejected(
        decode_json(lifecycle_topic(bike_id()), lifecycle_document("ride_ended", last_seq=True))
    )

    assert reason == "schema_violation"
    assert detail.startswith("last_seq:")
    assert "valid integer" in detail


def test_an_unknown_event_name_is_a_schema_violation_naming_the_event():
    reason, detail = rejected(
        decode_json(lifecycle_topic(bike_id()), lifecycle_document("ride_paused"))
    )

    assert reason == "schema_violation"
    assert "ride_paused" in detail
    assert "ride_started" in detail


def test_a_json_array_is_a_schema_violation_not_an_object():
    reason, detail = rejected(decode_bytes(telemetry_topic(bike_id()), b"[1, 2]"))

    assert reason == "schema_violation"
    assert detail == "payload must be a JSON object, got list"


# -- malformed JSON --------------------------------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_literals_are_malformed_json(literal):
    raw = json.dumps(telemetry_document(energy_wh="__E__")).replace('"__E__"', literal)

    reason, detail = rejected(decode_bytes(telemetry_topic(bike_id()), raw.encode()))

    assert reason == "malformed_json"
    assert "is not a JSON number" in detail


def test_a_byte_order_mark_is_malformed_json_that_says_so():
    raw = "\ufeff".encode() + json_payload(telemetry_document())

    reason, detail = rejected(decode_bytes(telemetry_topic(bike_id()), raw))

    assert reason == "malformed_json"
    assert "BOM" in detail


def test_invalid_utf8_is_malformed_json():
    reason, detail = rejected(decode_bytes(telemetry_topic(bike_id()), b'{"seq": "\xff"}'))

    assert reason == "malformed_json"
    assert "not UTF-8" in detail
    assert "byte 9" in detail


def test_text_that_is_not_json_is_malformed_json():
    reason, detail = rejected(decode_bytes(telemetry_topic(bike_id()), b"seq=1"))

    assert reason == "malformed_json"
    assert detail.startswith("payload is not JSON")


def test_deeply_nested_json_within_the_size_limit_is_rejected_not_raised():
    payload = b"[" * 2_000 + b"]" * 2_000

    reason, _ = rejected(decode_bytes(telemetry_topic(bike_id()), payload))

    assert reason in {"malformed_json", "schema_violation"}


# -- size ------------------------------------------------------------------------------


def _padded_telemetry(size: int) -> bytes:
    raw = json_payload(telemetry_document())
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))  # trailing whitespace is valid JSON


def test_a_payload_one_byte_over_the_limit_is_too_large():
    payload = _padded_telemetry(301)

    reason, detail = rejected(decode_bytes(telemetry_topic(bike_id()), payload, max_bytes=300))

    assert reason == "payload_too_large"
    assert detail == "payload is 301 bytes; the limit is 300"


def test_a_payload_of_exactly_the_limit_is_decoded():
    payload = _padded_telemetry(300)

    inbound = decode_bytes(telemetry_topic(bike_id()), payload, max_bytes=300)

    telemetry_command(inbound)


# -- topics ----------------------------------------------------------------------------


def test_a_topic_outside_the_prefix_is_unknown_and_names_no_bike():
    inbound = decode_json(f"other/v1/bikes/{bike_id()}/telemetry", telemetry_document())

    reason, detail = rejected(inbound)
    assert reason == "unknown_topic"
    assert f"{PREFIX}/bikes/" in detail
    assert inbound.bike_id is None
    assert inbound.rejection is not None
    assert inbound.rejection.bike_id is None


@pytest.mark.parametrize(
    "suffix", ["telemetry/extra", "lifecycle/", "status", "Telemetry"], ids=repr
)
def test_a_topic_with_another_shape_is_unknown_but_keeps_the_bike_id(suffix):
    bike = bike_id()

    inbound = decode_json(f"{PREFIX}/bikes/{bike}/{suffix}", telemetry_document())

    reason, detail = rejected(inbound)
    assert reason == "unknown_topic"
    assert "/lifecycle or " in detail
    assert inbound.kind is TopicKind.UNKNOWN
    assert inbound.bike_id == bike
    assert inbound.rejection is not None
    assert inbound.rejection.bike_id == bike


@pytest.mark.parametrize("bad_bike", ["bike.1", "a" * 65, "bike 1", "bïke"], ids=repr)
def test_a_bike_id_outside_the_pattern_is_an_unknown_topic(bad_bike):
    inbound = decode_json(telemetry_topic(bad_bike), telemetry_document())

    reason, detail = rejected(inbound)
    assert reason == "unknown_topic"
    assert "[A-Za-z0-9_-]{1,64}" in detail
    assert inbound.rejection is not None
    assert inbound.rejection.bike_id == bad_bike


def test_a_bike_id_of_64_characters_is_accepted():
    bike = "b" * 64

    command = telemetry_command(decode_json(telemetry_topic(bike), telemetry_document()))

    assert command.bike_id == bike


def test_an_empty_bike_id_is_an_unknown_topic():
    inbound = decode_json(f"{PREFIX}/bikes//telemetry", telemetry_document())

    reason, _ = rejected(inbound)
    assert reason == "unknown_topic"


def test_the_rejection_names_the_topic_it_came_from():
    topic = telemetry_topic(bike_id())

    inbound = decode_json(topic, telemetry_document(seq=0))

    assert inbound.rejection is not None
    assert inbound.rejection.topic == topic


# -- ids on rejections -----------------------------------------------------------------


def test_a_rejected_sample_carries_its_readable_ids():
    document = telemetry_document(seq=0)

    inbound = decode_json(telemetry_topic(bike_id()), document)

    assert inbound.rejection is not None
    assert inbound.rejection.session_id == uuid.UUID(document["session_id"])
    assert inbound.rejection.telemetry_id == uuid.UUID(document["telemetry_id"])


def test_a_rejection_leaves_out_an_id_that_is_not_a_uuid():
    document = telemetry_document(session_id="session-42", seq=0)

    inbound = decode_json(telemetry_topic(bike_id()), document)

    assert inbound.rejection is not None
    assert inbound.rejection.session_id is None
    assert inbound.rejection.telemetry_id == uuid.UUID(document["telemetry_id"])


def test_a_rejected_lifecycle_event_carries_its_session_id():
    document = lifecycle_document("ride_started", rider_id="")

    inbound = decode_json(lifecycle_topic(bike_id()), document)

    assert inbound.rejection is not None
    assert inbound.rejection.reason == "schema_violation"
    assert inbound.rejection.session_id == uuid.UUID(document["session_id"])
    assert inbound.rejection.telemetry_id is None


# -- nothing a publisher sends can crash decode ----------------------------------------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)
_telemetry_like = st.fixed_dictionaries(
    {},
    optional={
        key: _json_values | st.just(value)
        for key, value in telemetry_document(distance_m=Decimal(1), soc_pct=Decimal(50)).items()
    },
)
_payloads = st.one_of(
    st.binary(max_size=1_024),
    _json_values.map(lambda v: json.dumps(v).encode()),
    _telemetry_like.map(json_payload),
)


@given(payload=_payloads)
def test_decode_never_raises_for_any_payload_on_a_telemetry_topic(payload):
    inbound = decode(telemetry_topic("bike-1"), payload, PREFIX, MAX_BYTES)

    assert isinstance(inbound, Inbound)
    assert inbound.kind is TopicKind.TELEMETRY
    assert (inbound.command is None) != (inbound.rejection is None)


@pytest.mark.parametrize("at", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_a_timestamp_whose_utc_time_no_datetime_holds_is_a_schema_violation(at):
    document = lifecycle_document("ride_started", occurred_at=at)

    reason, detail = rejected(decode_json(f"{PREFIX}/bikes/{bike_id()}/lifecycle", document))

    assert (reason, detail) == (
        "schema_violation",
        "occurred_at: Value error, must fall between years 0001 and 9999 in UTC",
    )


def test_an_accepted_timestamp_is_held_in_utc_from_the_edge_on():
    document = lifecycle_document("ride_started", occurred_at="2026-03-01T17:30:00+05:30")

    inbound = decode_json(f"{PREFIX}/bikes/{bike_id()}/lifecycle", document)

    assert isinstance(inbound.command, StartSession)
    assert inbound.command.occurred_at.utcoffset() == timedelta(0)
    assert inbound.command.occurred_at == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# -- quantities: one validator, pydantic's answers ---------------------------------------


def _json_number_only(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ValueError("must be a JSON number")
    return value


def _pydantic_quantity(maximum: int) -> TypeAdapter[Decimal]:
    """What the quantities were before they got one validator: pydantic's own constraints."""
    return TypeAdapter(
        Annotated[
            Decimal,
            BeforeValidator(_json_number_only),
            Field(ge=0, le=maximum, decimal_places=QUANTITY_PLACES, allow_inf_nan=False),
        ]
    )


def _answer(adapter: TypeAdapter[Decimal], value: Any) -> tuple[str, str] | Decimal:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        [error] = exc.errors(include_url=False)
        return error["type"], error["msg"]


_decimals = st.builds(
    lambda sign, digits, exponent: Decimal((sign, tuple(digits), exponent)),
    st.integers(0, 1),
    st.lists(st.integers(0, 9), min_size=1, max_size=20),
    st.integers(-30, 12),
)
_inputs = st.one_of(
    _decimals,
    st.decimals(allow_nan=True, allow_infinity=True),
    st.integers(-(10**12), 10**12),
    st.integers(),
    st.booleans(),
    st.floats(),
    st.text(max_size=8),
    st.none(),
)


_PAIRS = {
    "Quantity": (TypeAdapter(Quantity), _pydantic_quantity(QUANTITY_MAX)),
    "Percent": (TypeAdapter(Percent), _pydantic_quantity(100)),
}


@pytest.mark.parametrize("name", list(_PAIRS))
@given(value=_inputs)
def test_quantities_are_accepted_and_refused_exactly_as_pydantics_constraints_would(name, value):
    subject, reference = _PAIRS[name]
    ours = _answer(subject, value)
    theirs = _answer(reference, value)

    assert ours == theirs, name
    if isinstance(ours, Decimal):
        assert str(ours) == str(theirs)  # the same digits, not only the same number


# -- the usual sample's hand-checked path agrees with pydantic's ------------------------------

_UUID_LIKE = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),  # no hyphens: pydantic's to judge
    st.uuids().map(lambda u: "{" + str(u) + "}"),
    st.uuids().map(lambda u: str(u)[:-1] + "_"),
    st.uuids().map(lambda u: " " + str(u)[1:]),
    st.text(max_size=40),
    st.integers(),
    st.none(),
)
_TIME_LIKE = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from(
            [
                UTC,
                timezone(timedelta(hours=14)),
                timezone(timedelta(hours=-14)),
                timezone(-timedelta(minutes=30)),
            ]
        ),
    ).map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat()),  # naive
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat().replace("+00:00", "Z")),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat(" ")),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat(timespec="milliseconds")),
    st.from_regex(
        r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,7})?"
        r"(Z|[+-][0-9]{2}:[0-9]{2})\Z"
    ),
    st.text(max_size=30),
    st.integers(),
)
_NUMBER_LIKE = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True),
    st.decimals(min_value=-1, max_value=10**9 + 1),
    st.decimals(min_value=0, max_value=101, places=7),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from(
        [
            Decimal("1E+3"),
            Decimal("1.0000000"),
            Decimal("-0"),
            Decimal("1e-7"),
            Decimal(10**9),
            Decimal(100),
            Decimal("100.0000001"),
            True,
            False,
        ]
    ),
    st.text(max_size=8),
    st.none(),
)


@settings(max_examples=1000)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "telemetry_id": _UUID_LIKE,
            "session_id": _UUID_LIKE,
            "seq": st.one_of(st.integers(-2, 2**31 + 1), st.booleans(), st.floats(), st.text()),
            "emitted_at": _TIME_LIKE,
            "energy_wh": _NUMBER_LIKE,
            "distance_m": _NUMBER_LIKE,
            "soc_pct": _NUMBER_LIKE,
            "other": st.integers(),
        },
    )
)
def test_the_usual_samples_own_path_takes_only_what_pydantic_takes_and_builds_the_same(doc):
    from daemon.mqtt.schemas import Telemetry, _telemetry, _usual_sample

    fast = _usual_sample("bike-1", doc)
    try:
        slow = _telemetry("bike-1", Telemetry.model_validate(doc))
    except (ValidationError, ValueError):
        slow = None
    if fast is not None:
        assert slow is not None, "the hand path took what pydantic refuses"
        assert fast == slow
        assert fast.sample.emitted_at.at.tzinfo is UTC


def test_the_usual_sample_takes_the_hand_path():
    """What bikes send every second never needs pydantic (the point of the path)."""
    from daemon.mqtt.schemas import _usual_sample

    document = json.loads(json_payload(telemetry_document()), parse_float=Decimal)
    assert _usual_sample("bike-1", document) is not None
    assert _usual_sample("bike-1", {**document, "emitted_at": "2026-01-01T00:00:00Z"})


_PARTY_LIKE = st.one_of(
    st.text(min_size=1, max_size=12),
    st.text(min_size=120, max_size=140),
    st.text(max_size=6).map(lambda t: f" {t} "),
    st.sampled_from(["rider-42", "station-7", "", " ", "a\x00b", "\ud800", "r\t", "é"]),
    st.integers(),
    st.none(),
)


@settings(max_examples=1000)
@given(
    st.one_of(
        # the four fields of a start, each near its edges: the hand path's own cases
        st.fixed_dictionaries(
            {
                "event": st.just("ride_started"),
                "session_id": _UUID_LIKE,
                "rider_id": _PARTY_LIKE,
                "occurred_at": _TIME_LIKE,
            }
        ),
        st.fixed_dictionaries(
            {
                "event": st.just("charging_started"),
                "session_id": _UUID_LIKE,
                "station_id": _PARTY_LIKE,
                "occurred_at": _TIME_LIKE,
            }
        ),
    )
    | st.fixed_dictionaries(
        {},
        optional={
            "event": st.sampled_from(
                ["ride_started", "charging_started", "ride_ended", "started", 7, None]
            ),
            "session_id": _UUID_LIKE,
            "rider_id": _PARTY_LIKE,
            "station_id": _PARTY_LIKE,
            "occurred_at": _TIME_LIKE,
            "other": st.integers(),
        },
    )
)
def test_the_usual_starts_own_path_takes_only_what_pydantic_takes_and_builds_the_same(doc):
    from daemon.mqtt.schemas import _LIFECYCLE, _lifecycle, _usual_start

    fast = _usual_start("bike-1", doc)
    try:
        slow = _lifecycle("bike-1", _LIFECYCLE.validate_python(doc))
    except (ValidationError, ValueError):
        slow = None
    if fast is not None:
        assert slow is not None, "the hand path took what pydantic refuses"
        assert fast == slow
        assert fast.occurred_at.tzinfo is UTC


def test_the_usual_start_takes_the_hand_path():
    """A ride's and a charge's usual start never need pydantic."""
    from daemon.mqtt.schemas import _usual_start

    ride = {"event": "ride_started", "session_id": str(uuid.uuid4()), "rider_id": "rider-42",
            "occurred_at": "2026-12-07T08:00:00.123+01:00"}  # fmt: skip
    charge = {**ride, "event": "charging_started", "station_id": "st-1"}
    del charge["rider_id"]
    assert _usual_start("bike-1", ride) is not None
    assert _usual_start("bike-1", charge) is not None


@given(st.uuids())
def test_a_uuid_read_by_the_usual_path_is_the_uuid_the_standard_library_reads(value):
    """The usual path fills UUID's slots itself (its constructor was a third of decoding)."""
    from uuid import UUID

    from daemon.mqtt.schemas import _uuid

    for text in (str(value), str(value).upper()):
        read = _uuid(text)
        assert read == UUID(text) and hash(read) == hash(UUID(text))
        assert (str(read), read.version, read.is_safe) == (str(value), value.version, value.is_safe)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text()
    | st.decimals(allow_nan=False).map(str).map(Decimal),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def _json_text(value: Any) -> bytes:
    return json.dumps(value, default=str).encode()


@settings(max_examples=500)
@given(
    st.one_of(
        _JSON_VALUES.map(_json_text),
        _JSON_VALUES.map(_json_text).flatmap(
            lambda b: st.tuples(st.just(b), st.integers(0, max(0, len(b) - 1)), st.binary(max_size=3))
        ).map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + 1 :]),  # one byte or few replaced
        st.binary(max_size=40),
        st.sampled_from([b'{"a": NaN}', b'{"a": -Infinity}', b'\xef\xbb\xbf{}', b'{"a": "\\ud800"}',
                         b'{"a": 1e999999}', b'{"a": 1, "a": 2}', b'[' * 3000 + b']' * 3000,
                         b'{"a": ' + b'9' * 5000 + b'}', b'{"a": 01}', b'{"a": 1.}']),
    )
)  # fmt: skip
def test_the_fast_json_reader_reads_what_the_standard_library_reads_and_refuses_the_rest(raw):
    """msgspec is only the fast way in: the document, or the error, is the standard library's."""
    from daemon.mqtt.schemas import _document, _loads

    def outcome(read: Any) -> tuple[str, Any]:
        try:
            return "read", read()
        except Exception as exc:
            return type(exc).__name__, str(exc)

    expected = outcome(lambda: _loads(raw.decode("utf-8")))
    got = outcome(lambda: _document(raw))
    if expected[0] == "read" and got[0] == "read":
        assert json.dumps(got[1], default=repr) == json.dumps(expected[1], default=repr)
    else:
        assert got == expected
