"""Outbound messages of SPEC §2: topics and canonical JSON payloads."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

from daemon.mqtt.topics import OutboundKind, topics_for
from domain.billing import BillingRecord
from domain.errors import Reason
from domain.session_values import FinalizedSession, quantity_text, utc_text

__all__ = [
    "billing_message",
    "finalized_message",
    "iso",
    "plain",
    "rejection_message",
]


# The one published form of quantities and instants, on MQTT, over HTTP and in the CLI.
plain = quantity_text
iso = utc_text


def _seconds(value: Decimal) -> int | float:
    # duration_s is a JSON number; whole seconds stay integers.
    return int(value) if value == value.to_integral_value() else float(value)


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def finalized_message(prefix: str, session: FinalizedSession) -> tuple[str, bytes]:
    duration = Decimal(str(session.duration.total_seconds()))
    return topics_for(prefix).bike(session.bike_id, OutboundKind.FINALIZED), encode(
        {
            "session_id": str(session.session_id),
            "bike_id": session.bike_id,
            "kind": str(session.kind),
            session.kind.party_field: session.party_id,
            "started_at": iso(session.started_at),
            "ended_at": iso(session.ended_at),
            "duration_s": _seconds(duration),
            "energy_wh": plain(session.energy_wh),
            "distance_m": plain(session.distance_m),
            "telemetry_count": session.telemetry_count,
            "missing_samples": session.missing_samples,
            "end_reason": str(session.end_reason),
            "finalized_at": iso(session.finalized_at),
        }
    )


def billing_message(prefix: str, record: BillingRecord) -> tuple[str, bytes]:
    return topics_for(prefix).bike(record.bike_id, OutboundKind.BILLING), record.to_json()


def rejection_message(
    prefix: str,
    bike_id: str,
    topic: str,
    reason: Reason,
    detail: str,
    received_at: datetime,
    session_id: object | None = None,
    telemetry_id: object | None = None,
) -> tuple[str, bytes]:
    document: dict[str, Any] = {"topic": topic, "reason": reason, "detail": detail}
    if session_id is not None:
        document["session_id"] = str(session_id)
    if telemetry_id is not None:
        document["telemetry_id"] = str(telemetry_id)
    document["received_at"] = iso(received_at)
    return topics_for(prefix).bike(bike_id, OutboundKind.REJECTIONS), encode(document)
