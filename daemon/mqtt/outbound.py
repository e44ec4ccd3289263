"""Outbound MQTT messages: each published document (``daemon.outbound``) on its topic."""

from __future__ import annotations

from datetime import datetime

from daemon.mqtt.topics import OutboundKind, topics_for
from daemon.outbound import encode, finalized_document, rejection_document
from domain.billing import BillingRecord
from domain.errors import Reason
from domain.session_values import FinalizedSession

__all__ = ["billing_message", "finalized_message", "rejection_message"]


def finalized_message(prefix: str, session: FinalizedSession) -> tuple[str, bytes]:
    topic = topics_for(prefix).bike(session.bike_id, OutboundKind.FINALIZED)
    return topic, encode(finalized_document(session))


def billing_message(prefix: str, record: BillingRecord) -> tuple[str, bytes]:
    return topics_for(prefix).bike(record.bike_id, OutboundKind.BILLING), record.to_json()


def rejection_message(  # noqa: PLR0913 - a rejection's fields, each named where it is built
    prefix: str,
    bike_id: str,
    topic: str,
    reason: Reason,
    detail: str,
    received_at: datetime,
    session_id: object | None = None,
    telemetry_id: object | None = None,
) -> tuple[str, bytes]:
    document = rejection_document(topic, reason, detail, received_at, session_id, telemetry_id)
    return topics_for(prefix).bike(bike_id, OutboundKind.REJECTIONS), encode(document)
