"""Inbound payloads, decoded by pydantic at the edge and translated into domain commands.

This is the anti-corruption layer: nothing past ``decode`` sees JSON, and every way a message can
be wrong becomes a ``Rejection`` with a reason code and a detail that says what to fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID, SafeUUID

import msgspec
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictInt,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import PydanticKnownError

from daemon.mqtt.topics import ParsedTopic, TopicKind, Topics, topics_for
from domain.commands import Command, EndSession, RecordTelemetry, StartSession
from domain.errors import DomainError, InvalidValue, Reason
from domain.session_values import SessionKind
from domain.telemetry import Distance, EmissionTime, EnergyDelta, StateOfCharge, TelemetrySample

__all__ = ["Inbound", "Rejection", "TopicKind", "decode"]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message cannot be accepted, with whatever ids could be read from it."""

    topic: str
    bike_id: str | None
    reason: Reason
    detail: str
    session_id: UUID | None = None
    telemetry_id: UUID | None = None


@dataclass(slots=True)  # not frozen: built per message (see Delivery)
class Inbound:
    """A decoded message: the command it asks for, or why it was rejected."""

    kind: TopicKind
    bike_id: str | None
    command: Command | None = None
    rejection: Rejection | None = None


def _rfc3339(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 timestamp string with an offset")
    return value


def _in_utc(value: datetime) -> datetime:
    # Every instant is held in UTC from the edge on; one whose UTC time falls outside years
    # 1-9999 (0001-01-01T00:00:00+14:00) has no datetime, and no PostgreSQL row either.
    if value.tzinfo is UTC:  # "Z" and "+00:00" as datetime.fromisoformat reads them
        return value
    offset = value.utcoffset()
    if not offset:  # already UTC (the usual case): no conversion, only the canonical tzinfo
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("must fall between years 0001 and 9999 in UTC") from None


def _storable_text(value: Any) -> Any:
    # PostgreSQL text holds neither NUL nor lone surrogates (which are not UTF-8).
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339), AfterValidator(_in_utc)]
# What a real meter reports, and what every sum keeps exactly (README, "Precision"): up to
# 1,000,000,000 with at most 6 decimal places.
QUANTITY_MAX = 1_000_000_000
QUANTITY_PLACES = 6


def _number_schema(maximum: int) -> WithJsonSchema:
    # What the contract says (and the AsyncAPI document shows): a JSON number, never a string.
    return WithJsonSchema(
        {"type": "number", "minimum": 0, "maximum": maximum,
         "description": f"a JSON number, at most {QUANTITY_PLACES} decimal places"}
    )  # fmt: skip


def _quantity(value: Any, maximum: int, limit: Decimal) -> Decimal:
    """A JSON number from 0 to ``maximum`` with at most QUANTITY_PLACES decimal places, as an
    exact Decimal, checked in one call. pydantic's own decimal constraints run as several
    Python validators per field (a fifth of decoding a sample); this answers with the same
    error types and words (tests/unit/test_edge_schemas.py holds them to pydantic's)."""
    # JSON numbers only: "12.5" (a string) is not energy, whatever pydantic would coerce.
    if isinstance(value, Decimal):
        number = value
        if not number.is_finite():
            raise PydanticKnownError("finite_number")
    elif isinstance(value, int) and not isinstance(value, bool):
        number = Decimal(value)
    else:
        raise ValueError("must be a JSON number")
    if number < _ZERO:
        raise PydanticKnownError("greater_than_equal", {"ge": 0})
    if number > limit:
        raise PydanticKnownError("less_than_equal", {"le": maximum})
    # At most 6 places once trailing zeros go, as pydantic counts them (1.5000000 has 1): the
    # number is unchanged by rounding to millionths (exact here: at most 16 digits).
    if number != number.quantize(_MILLIONTH):
        raise PydanticKnownError("decimal_max_places", {"decimal_places": QUANTITY_PLACES})
    return number


_ZERO, _MILLIONTH = Decimal(0), Decimal(1).scaleb(-QUANTITY_PLACES)


def _number(maximum: int) -> PlainValidator:
    limit = Decimal(maximum)
    return PlainValidator(lambda value: _quantity(value, maximum, limit))


Quantity = Annotated[Decimal, _number(QUANTITY_MAX), _number_schema(QUANTITY_MAX)]
Percent = Annotated[Decimal, _number(100), _number_schema(100)]
# Seqs are PostgreSQL integers.
SEQ_MAX = 2**31 - 1
Id = Annotated[str, BeforeValidator(_storable_text), Field(min_length=1, max_length=128)]


class _Payload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", str_strip_whitespace=True)


class RideStarted(_Payload):
    event: Literal["ride_started"]
    session_id: UUID
    rider_id: Id
    occurred_at: Timestamp


class ChargingStarted(_Payload):
    event: Literal["charging_started"]
    session_id: UUID
    station_id: Id
    occurred_at: Timestamp


class RideEnded(_Payload):
    event: Literal["ride_ended"]
    session_id: UUID
    occurred_at: Timestamp
    last_seq: Annotated[StrictInt, Field(ge=0, le=SEQ_MAX)]


class ChargingEnded(_Payload):
    event: Literal["charging_ended"]
    session_id: UUID
    occurred_at: Timestamp
    last_seq: Annotated[StrictInt, Field(ge=0, le=SEQ_MAX)]


Lifecycle = Annotated[
    RideStarted | ChargingStarted | RideEnded | ChargingEnded, Field(discriminator="event")
]
_LIFECYCLE: TypeAdapter[RideStarted | ChargingStarted | RideEnded | ChargingEnded] = TypeAdapter(
    Lifecycle
)


class Telemetry(_Payload):
    telemetry_id: UUID
    session_id: UUID
    seq: Annotated[StrictInt, Field(ge=1, le=SEQ_MAX)]
    emitted_at: Timestamp
    energy_wh: Quantity
    distance_m: Quantity | None = None
    soc_pct: Percent | None = None


_UUID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_RFC3339_TEXT = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:[0-9]{2})"
)
_TELEMETRY_FIELDS = frozenset(Telemetry.model_fields)
_QUANTITY_LIMIT, _PERCENT_LIMIT = Decimal(QUANTITY_MAX), Decimal(100)
_V = TypeVar("_V")


def _uuid(
    text: str,
    new: Any = object.__new__,
    put: Any = object.__setattr__,
    unknown: SafeUUID = SafeUUID.unknown,
) -> UUID:
    """``UUID(text)`` for text already matched by _UUID_TEXT, without re-checking it (UUID's
    own constructor is a third of a sample's decoding). Fills the same two slots UUID's
    constructor fills; a unit test holds the result to ``UUID(text)``."""
    value: UUID = new(UUID)
    put(value, "int", int(text.replace("-", ""), 16))
    put(value, "is_safe", unknown)  # bound once: an enum member's lookup is a descriptor call
    return value


class _Sessions(dict[str, UUID]):
    """Session ids as read lately: a session's samples all carry the same one. Bounded: in a
    fleet larger than the bound the ids come round less often than it refills, and an entry
    holds about 210 bytes (16,384 of them, 3.4 MiB, hit nothing at 100,000 bikes). A hit saves
    0.5 us against UUID parsing; a miss costs 0.3 us more than none (measured)."""

    LIMIT = 4096

    def __missing__(self, text: str) -> UUID:
        if len(self) >= self.LIMIT:
            self.clear()
        value = self[text] = _uuid(text)
        return value


_SESSION_IDS = _Sessions()


def _usual_sample(bike_id: str, document: dict[str, Any]) -> RecordTelemetry | None:
    """The usual sample, checked by hand in a few microseconds instead of pydantic's dozen:
    canonical UUIDs, an RFC 3339 time with at most microseconds, an int seq and numbers in range,
    no other keys. Anything else returns None and goes through pydantic, which then gives the
    answer: an acceptance, or the rejection that says what to fix. Both paths build the command
    the same way; tests/unit/test_edge_schemas.py holds them to the same result on generated
    input, every field near its edges."""
    if len(document) > len(_TELEMETRY_FIELDS) or not _TELEMETRY_FIELDS.issuperset(document):
        return None
    get = document.get
    fields = _usual_fields(get("telemetry_id"), get("session_id"), get("seq"), get("emitted_at"))
    if fields is None:
        return None
    tid, sid, seq, at = fields
    try:
        return RecordTelemetry(
            bike_id,
            TelemetrySample(
                telemetry_id=_uuid(tid),
                session_id=_SESSION_IDS[sid],
                seq=seq,
                emitted_at=EmissionTime(_in_utc(datetime.fromisoformat(at))),
                energy=EnergyDelta(_quantity(get("energy_wh"), QUANTITY_MAX, _QUANTITY_LIMIT)),
                distance=_optional(Distance, get("distance_m"), QUANTITY_MAX, _QUANTITY_LIMIT),
                soc=_optional(StateOfCharge, get("soc_pct"), 100, _PERCENT_LIMIT),
            ),
        )
    except (ValueError, ArithmeticError, DomainError):  # pydantic's path says which and why
        return None


def _usual_fields(tid: Any, sid: Any, seq: Any, at: Any) -> tuple[str, str, int, str] | None:
    """Canonical UUID texts, an int seq in range and an RFC 3339 time text, or None."""
    if (
        type(seq) is int
        and 1 <= seq <= SEQ_MAX
        and type(tid) is str
        and type(sid) is str
        and type(at) is str
        and _UUID_TEXT.fullmatch(tid) is not None
        and _UUID_TEXT.fullmatch(sid) is not None
        and _RFC3339_TEXT.fullmatch(at) is not None
    ):
        return tid, sid, seq, at
    return None


def _optional(kind: Callable[[Decimal], _V], value: Any, most: int, limit: Decimal) -> _V | None:
    """An optional quantity of the usual sample as its value object; None when absent."""
    return None if value is None else kind(_quantity(value, most, limit))


# The usual start: its event, and the field naming who the session is with.
_STARTS = {"ride_started": (SessionKind.RIDE, "rider_id"),
           "charging_started": (SessionKind.CHARGING, "station_id")}  # fmt: skip


def _usual_start(bike_id: str, document: dict[str, Any]) -> StartSession | None:
    """The usual start (a morning's backlog is thousands of them), checked by hand as
    ``_usual_sample`` is: exactly its four fields, a canonical UUID, an RFC 3339 time and a
    party id that stripping, the NUL check and the length bounds leave as it is. Anything else
    returns None and goes through pydantic, whose answer stands;
    tests/unit/test_edge_schemas.py holds both paths to the same result."""
    if len(document) != 4:
        return None
    get = document.get
    event = get("event")
    usual = _STARTS.get(event) if type(event) is str else None
    if usual is None:
        return None
    kind, field = usual
    sid, party, at = get("session_id"), get(field), get("occurred_at")
    if not (
        type(sid) is str
        and type(party) is str
        and type(at) is str
        and 0 < len(party) <= 128
        and party.isprintable()
        and not party[0].isspace()
        and not party[-1].isspace()
        and _UUID_TEXT.fullmatch(sid) is not None
        and _RFC3339_TEXT.fullmatch(at) is not None
    ):
        return None
    try:  # printable text holds neither NUL nor lone surrogates: storable as it is
        occurred_at = _in_utc(datetime.fromisoformat(at))
    except ValueError:
        return None
    return StartSession(bike_id, _uuid(sid), kind, party, occurred_at)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# One decoder for every message: json.loads with parse_float builds a new one per call.
_JSON = json.JSONDecoder(parse_float=Decimal, parse_constant=_reject_constant)


# msgspec reads JSON in a third of the standard library's time, numbers with a fraction or an
# exponent as exact Decimals from their text (float_hook). It is only the fast way in: whatever
# it refuses (or might read differently) goes to the standard library, whose answer stands, so
# rejections and their details are the same either way (tests/unit/test_edge_schemas.py).
_FAST_JSON = msgspec.json.Decoder(float_hook=Decimal)
# Integers of more digits than Python converts (sys.get_int_max_str_digits, 4300) are refused
# by the standard library and read by msgspec: payloads that could hold one take the slow way.
_FAST_JSON_MAX = 4096


def _document(payload: bytes) -> Any:
    """The payload's JSON document (raises as ``_loads`` does)."""
    if len(payload) <= _FAST_JSON_MAX:
        try:
            return _FAST_JSON.decode(payload)
        except Exception:  # noqa: S110 - the standard library's answer below stands
            pass
    return _loads(payload.decode("utf-8"))


def _loads(text: str) -> Any:
    if text.startswith("\ufeff"):  # what json.loads says of it, rather than "Expecting value"
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _JSON.decode(text)


def _explain(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        where = (
            ".".join(
                str(p)
                for p in error["loc"]
                if not str(p).endswith("_started") and not str(p).endswith("_ended")
            )
            or "payload"
        )
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def _ids(document: Any) -> tuple[UUID | None, UUID | None]:
    """Best-effort ids of a rejected payload, so the rejection can name them."""
    found: list[UUID | None] = []
    for key in ("session_id", "telemetry_id"):
        raw = document.get(key) if isinstance(document, dict) else None
        try:
            found.append(UUID(raw) if isinstance(raw, str) else None)
        except ValueError:
            found.append(None)
    return found[0], found[1]


class _Refused(Exception):
    """A message refused while it is decoded: the reason, what to fix, the ids it names."""

    def __init__(
        self, reason: Reason, detail: str, ids: tuple[UUID | None, UUID | None] = (None, None)
    ) -> None:
        self.reason, self.detail, self.ids = reason, detail, ids


def decode(
    topic: str,
    payload: bytes,
    topics: Topics | str,
    max_bytes: int,
    parsed: ParsedTopic | None = None,
) -> Inbound:
    """Turn one MQTT message into a domain command, or a rejection that says why not.

    ``parsed``: the topic as the intake read it, so that it is read once per message."""
    if parsed is None:
        parsed = (topics if isinstance(topics, Topics) else topics_for(topics)).parse(topic)
    kind, bike_id = parsed.kind, parsed.bike_id
    try:
        if parsed.problem is not None or bike_id is None:
            raise _Refused(Reason.UNKNOWN_TOPIC, parsed.problem or "topic names no bike")
        command = _command(kind, bike_id, _object(payload, max_bytes))
    except _Refused as refused:
        rejection = Rejection(topic, bike_id, refused.reason, refused.detail, *refused.ids)
        return Inbound(kind, bike_id, rejection=rejection)
    return Inbound(kind, bike_id, command=command)


def _object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """The payload's JSON object, or ``_Refused`` saying why there is none."""
    if len(payload) > max_bytes:
        raise _Refused(
            Reason.PAYLOAD_TOO_LARGE, f"payload is {len(payload)} bytes; the limit is {max_bytes}"
        )
    try:
        document = _document(payload)
    except UnicodeDecodeError as exc:
        why = f"payload is not UTF-8: {exc.reason} at byte {exc.start}"
        raise _Refused(Reason.MALFORMED_JSON, why) from None
    except ValueError as exc:
        raise _Refused(Reason.MALFORMED_JSON, f"payload is not JSON: {exc}") from None
    except ArithmeticError:  # decimal.InvalidOperation: a number no decimal can hold
        why = "payload holds a number beyond any decimal"
        raise _Refused(Reason.SCHEMA_VIOLATION, why) from None
    except RecursionError:
        raise _Refused(Reason.MALFORMED_JSON, "payload is nested too deeply to be read") from None
    if not isinstance(document, dict):
        why = f"payload must be a JSON object, got {type(document).__name__}"
        raise _Refused(Reason.SCHEMA_VIOLATION, why)
    return document


def _command(kind: TopicKind, bike_id: str, document: dict[str, Any]) -> Command:
    """The command a JSON object on a bike's topic of this kind says, or ``_Refused``."""
    try:
        if kind is TopicKind.TELEMETRY:
            return _usual_sample(bike_id, document) or _telemetry(
                bike_id, Telemetry.model_validate(document)
            )
        return _usual_start(bike_id, document) or _lifecycle(
            bike_id, _LIFECYCLE.validate_python(document)
        )
    except ValidationError as exc:
        raise _Refused(Reason.SCHEMA_VIOLATION, _explain(exc), _ids(document)) from None
    except InvalidValue as exc:
        raise _Refused(exc.reason, exc.detail, _ids(document)) from None


def _lifecycle(
    bike_id: str, event: RideStarted | ChargingStarted | RideEnded | ChargingEnded
) -> Command:
    if isinstance(event, RideStarted):
        return StartSession(
            bike_id, event.session_id, SessionKind.RIDE, event.rider_id, event.occurred_at
        )
    if isinstance(event, ChargingStarted):
        return StartSession(
            bike_id, event.session_id, SessionKind.CHARGING, event.station_id, event.occurred_at
        )
    kind = SessionKind.RIDE if isinstance(event, RideEnded) else SessionKind.CHARGING
    return EndSession(bike_id, event.session_id, kind, event.occurred_at, event.last_seq)


def _telemetry(bike_id: str, payload: Telemetry) -> RecordTelemetry:
    return RecordTelemetry(
        bike_id,
        TelemetrySample(
            telemetry_id=payload.telemetry_id,
            session_id=payload.session_id,
            seq=payload.seq,
            emitted_at=EmissionTime(payload.emitted_at),
            energy=EnergyDelta(payload.energy_wh),
            distance=Distance(payload.distance_m) if payload.distance_m is not None else None,
            soc=StateOfCharge(payload.soc_pct) if payload.soc_pct is not None else None,
        ),
    )
