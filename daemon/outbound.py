"""The documents ChargeFlow publishes (SPEC §2), one form each, and the formatters of their
values: the MQTT payloads (``daemon.mqtt.outbound`` pairs them with their topics) and the
records that HTTP and the CLI show as they were published."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

from domain.errors import Reason
from domain.session_values import FinalizedSession, quantity_text, utc_text

__all__ = ["encode", "finalized_document", "iso", "plain", "rejection_document"]


# The one published form of quantities and instants, on MQTT, over HTTP and in the CLI.
plain = quantity_text
iso = utc_text


def _seconds(value: Decimal) -> int | float:
    # duration_s is a JSON number; whole seconds stay integers.
    return int(value) if value == value.to_integral_value() else float(value)


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def finalized_document(session: FinalizedSession) -> dict[str, Any]:
    duration = Decimal(str(session.duration.total_seconds()))
    return {
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


def rejection_document(  # noqa: PLR0913 - a rejection's fields, each named where it is built
    topic: str,
    reason: Reason,
    detail: str,
    received_at: datetime,
    session_id: object | None = None,
    telemetry_id: object | None = None,
) -> dict[str, Any]:
    document: dict[str, Any] = {"topic": topic, "reason": reason, "detail": detail}
    if session_id is not None:
        document["session_id"] = str(session_id)
    if telemetry_id is not None:
        document["telemetry_id"] = str(telemetry_id)
    document["received_at"] = iso(received_at)
    return document
