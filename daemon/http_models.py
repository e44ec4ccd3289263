"""What the HTTP port answers, as typed models: FastAPI checks every body against them and
generates /openapi.json from them, so the document promises exactly what is sent. A finalized
record and a bill are the published documents' own models (``daemon.documents``), and every
value is written by the same types as there: one home for each wire format."""

from __future__ import annotations

from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from daemon.documents import (
    BillingPayload,
    DecimalText,
    FinalizedPayload,
    Instant,
    MoneyText,
    Seconds,
)
from domain.errors import Reason

__all__ = [
    "Analytics",
    "Health",
    "KeptRejectionBody",
    "PartitionView",
    "PricingList",
    "Readiness",
    "RejectionsPage",
    "SessionBody",
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Health(_Body):
    status: Literal["alive"]


class PartitionView(_Body):
    """Which bikes an instance with CHARGEFLOW_PARTITION takes, as it sees the claims now."""

    takes: list[str] = Field(
        description="this instance's claims, e.g. 0/2 (and the claim it held before a "
        "change of CHARGEFLOW_PARTITION, until what the broker queued under it is taken)"
    )
    others: list[str] = Field(
        description="the other instances' live claims, as this instance last read them (every "
        "second); a bike no claim here covers is taken by this instance too"
    )


class Readiness(_Body):
    ready: bool
    checks: dict[str, bool] = Field(description="database, mqtt, accepting")
    broker: str | None = Field(
        description="the broker of CHARGEFLOW_MQTT_URL the daemon is connected to (no "
        "credentials), or null while it is connected to none"
    )
    partition: PartitionView | None = Field(
        default=None,
        description="the claims with CHARGEFLOW_PARTITION; null when the instance takes every "
        "bike without one (or has not registered its claim yet)",
    )


class KindFiguresBody(_Body):
    """Rides or charging sessions: every figure derivable from the sessions it names."""

    count: int = Field(ge=0)
    energy_wh: DecimalText
    distance_m: DecimalText
    duration_s: Seconds
    average_energy_wh: DecimalText | None
    average_duration_s: DecimalText | None
    revenue: dict[str, MoneyText] = Field(description="by currency")
    average_amount: dict[str, MoneyText] = Field(description="by currency")
    timed_out: int = Field(ge=0)
    missing_samples: int = Field(ge=0)
    session_ids: list[UUID]


class VersionFigures(_Body):
    sessions: int = Field(ge=0)
    revenue: dict[str, MoneyText] = Field(description="by currency")


class AnalyticsFilters(_Body):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    since: Instant | None = Field(alias="from")
    until: Instant | None = Field(alias="to")
    bike_id: str | None
    pricing_version: str | None


class Analytics(_Body):
    filters: AnalyticsFilters
    by_pricing_version: dict[str, VersionFigures]
    rides: KindFiguresBody
    charging: KindFiguresBody
    revenue: dict[str, MoneyText] = Field(description="by currency")


class RulePrices(_Body):
    unit_price: MoneyText = Field(description="per kWh")
    session_fee: MoneyText


class PricingVersion(_Body):
    version: str
    currency: str
    rounding: str
    minor_unit: int = Field(ge=0)
    ride: RulePrices
    charging: RulePrices
    first_used_at: Instant


class PricingList(_Body):
    pricing_versions: list[PricingVersion]


class SessionEndBody(_Body):
    occurred_at: Instant
    last_seq: int = Field(ge=0)


class SessionBody(_Body):
    """Active: running totals and the end if it came; Finalized: the published record and
    its bill. Fields that do not apply to the session's state are left out."""

    session_id: UUID
    bike_id: str
    kind: Literal["ride", "charging"]
    rider_id: str | None = Field(None, description="rides only, while the rider is known")
    rider_erased: Literal[True] | None = Field(
        None, description="a ride whose rider was erased (rider_id is then left out)"
    )
    station_id: str | None = Field(None, description="charging sessions only")
    state: Literal["active", "finalized"]
    started_at: Instant
    stored_telemetry_count: int = Field(ge=0)
    finalized: FinalizedPayload | None = Field(None, description="finalized sessions only")
    billing: BillingPayload | None = Field(None, description="finalized sessions only")
    last_heard_at: Instant | None = Field(None, description="active sessions only")
    energy_wh_so_far: DecimalText | None = Field(None, description="active sessions only")
    telemetry_count_so_far: int | None = Field(None, description="active sessions only")
    end: SessionEndBody | None = Field(None, description="an active session whose end has come")


class KeptRejectionBody(_Body):
    id: int
    received_at: Instant
    topic: str
    bike_id: str | None
    reason: Reason
    detail: str
    session_id: UUID | None
    telemetry_id: UUID | None
    payload_size: int = Field(ge=0)
    payload_redacted: Literal["erasure", "retention"] | None = Field(
        description="erasure: a rider id in it was replaced; retention: emptied after "
        "CHARGEFLOW_REJECTION_PAYLOAD_RETENTION_DAYS; null: as received"
    )
    payload_text: str | None = Field(description="the payload, when it is UTF-8")
    payload_base64: str = Field(description="the payload as kept (the first 4 KiB)")


class RejectionsPage(_Body):
    rejections: list[KeptRejectionBody]
    next: str | None = Field(description="the path of the following page, if there is one")
