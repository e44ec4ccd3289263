"""The documents ChargeFlow publishes (SPEC §2), one model each, and one form for each kind of
value in them.

The AsyncAPI document is generated from these models (``daemon.mqtt.contract``), the bytes
sent on MQTT are dumped from them (``daemon.mqtt.messages`` puts them on their topics), and
HTTP and the CLI show a finalized record and its bill through them: the contract and what is
sent cannot drift apart. Each model is built from the domain's own values; the types below
write them, each kind one way: an instant as RFC 3339 in UTC with Z, a quantity as plain
digits, money with its scale, a duration as a JSON number of seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, PlainSerializer, WithJsonSchema

from domain.billing import BillingRecord
from domain.errors import Reason
from domain.session_values import FinalizedSession, SessionKind, require_aware

__all__ = [
    "BillingPayload",
    "DecimalText",
    "FinalizedPayload",
    "Instant",
    "MoneyText",
    "Published",
    "RejectionPayload",
    "Seconds",
    "money_text",
    "quantity_text",
    "seconds_number",
    "utc_text",
]

# -- the written form of each kind of value -----------------------------------------------


def quantity_text(value: Decimal) -> str:
    """The one published form of a quantity: plain digits, no exponent, no trailing zeros
    (2.50 and 2.5 are the same energy and are both written 2.5; 1E+3 is written 1000)."""
    return format(value.normalize(), "f") if value else "0"


def utc_text(value: datetime) -> str:
    """The one published form of an instant: RFC 3339 in UTC with Z, whatever offset it came in."""
    require_aware(value, "a published timestamp")
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def money_text(value: Decimal) -> str:
    """The one written form of money and prices: plain digits with the scale they were given
    or rounded to (0.30 stays 0.30, an amount keeps its minor unit), never an exponent."""
    return format(value, "f")


_DECIMAL = r"^-?\d+(\.\d+)?$"


def seconds_number(value: timedelta) -> int | float:
    """The one published form of a duration: a JSON number of seconds, whole ones integers."""
    seconds = value.total_seconds()
    return int(seconds) if seconds.is_integer() else seconds


def _text(kind: str, **schema: Any) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", **schema, "description": kind})


Instant = Annotated[
    AwareDatetime,
    PlainSerializer(utc_text, return_type=str),
    _text("RFC 3339 in UTC, ending in Z", format="date-time", pattern=r"Z$"),
]
DecimalText = Annotated[
    Decimal,
    PlainSerializer(quantity_text, return_type=str),
    _text("a decimal, as a string", pattern=_DECIMAL),
]
MoneyText = Annotated[
    Decimal,
    PlainSerializer(money_text, return_type=str),
    _text("an amount, as a string, with its scale (0.30 stays 0.30)", pattern=_DECIMAL),
]
Seconds = Annotated[
    timedelta,
    PlainSerializer(seconds_number, return_type=int | float),
    WithJsonSchema({"type": "number", "minimum": 0, "description": "a JSON number of seconds"}),
]


def party_fields(kind: SessionKind, party_id: str | None) -> dict[str, Any]:
    """Who a session is with, as its documents say it: ``rider_id`` or ``station_id``, or
    ``rider_erased`` for a ride whose rider was erased (deploy/README.md "Personal data")."""
    if party_id is None:
        return {"rider_erased": True}
    return {kind.party_field: party_id}


class Published(BaseModel):
    """A published document: its bytes on MQTT, its JSON over HTTP and in the CLI."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def encode(self) -> bytes:
        """The MQTT payload: compact JSON in UTF-8, fields that do not apply left out."""
        return self.__pydantic_serializer__.to_json(self, exclude_none=True)

    def document(self) -> dict[str, Any]:
        """The same, as a JSON object for HTTP and the CLI."""
        return self.model_dump(mode="json", exclude_none=True)


class FinalizedPayload(Published):
    """A finalized session with its fixed totals."""

    session_id: UUID
    bike_id: str
    kind: Literal["ride", "charging"]
    rider_id: str | None = Field(None, description="rides only, while the rider is known")
    rider_erased: Literal[True] | None = Field(
        None, description="a ride whose rider was erased (rider_id is then left out)"
    )
    station_id: str | None = Field(None, description="charging sessions only")
    started_at: Instant
    ended_at: Instant
    duration_s: Seconds
    energy_wh: DecimalText
    distance_m: DecimalText
    telemetry_count: int = Field(ge=0)
    missing_samples: int = Field(ge=0)
    end_reason: Literal["ended", "timed_out"]
    finalized_at: Instant

    @classmethod
    def of(cls, session: FinalizedSession) -> FinalizedPayload:
        return cls.model_validate(
            {
                "session_id": session.session_id,
                "bike_id": session.bike_id,
                "kind": str(session.kind),
                **party_fields(session.kind, session.party_id),
                "started_at": session.started_at,
                "ended_at": session.ended_at,
                "duration_s": session.duration,
                "energy_wh": session.energy_wh,
                "distance_m": session.distance_m,
                "telemetry_count": session.telemetry_count,
                "missing_samples": session.missing_samples,
                "end_reason": str(session.end_reason),
                "finalized_at": session.finalized_at,
            }
        )


class BillingPayload(Published):
    """The bill of a finalized session; money as decimal strings, never floats."""

    # Declared in the order of their names: a bill's bytes have been its fields sorted by key
    # since the first version, so the same record is the same bytes in every release.
    amount: MoneyText
    bike_id: str
    billable_energy_wh: DecimalText
    currency: str
    kind: Literal["ride", "charging"]
    pricing_version: str
    session_id: UUID
    unit_price: MoneyText = Field(description="per kWh")

    @classmethod
    def of(cls, record: BillingRecord) -> BillingPayload:
        return cls.model_validate(
            {
                "amount": record.amount.amount,
                "bike_id": record.bike_id,
                "billable_energy_wh": record.billable_energy.wh,
                "currency": record.amount.currency,
                "kind": str(record.kind),
                "pricing_version": record.pricing_version,
                "session_id": record.session_id,
                "unit_price": record.unit_price.per_kwh,
            }
        )


class RejectionPayload(Published):
    """Why a message was rejected; it is kept, with its raw payload."""

    topic: str
    reason: Reason
    detail: str
    session_id: UUID | None = Field(None, description="when it could be read")
    telemetry_id: UUID | None = Field(None, description="when it could be read")
    received_at: Instant
