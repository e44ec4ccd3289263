"""Outbound MQTT messages: each published document (``daemon.documents``) on its topic."""

from __future__ import annotations

from datetime import datetime

from daemon.documents import BillingPayload, FinalizedPayload, RejectionPayload
from daemon.mqtt.schemas import Rejection
from daemon.mqtt.topics import OutboundKind, topics_for
from domain.billing import BillingRecord
from domain.session_values import FinalizedSession

__all__ = ["billing_message", "finalized_message", "rejection_message"]


def finalized_message(prefix: str, session: FinalizedSession) -> tuple[str, bytes]:
    topic = topics_for(prefix).bike(session.bike_id, OutboundKind.FINALIZED)
    return topic, FinalizedPayload.of(session).encode()


def billing_message(prefix: str, record: BillingRecord) -> tuple[str, bytes]:
    topic = topics_for(prefix).bike(record.bike_id, OutboundKind.BILLING)
    return topic, BillingPayload.of(record).encode()


def rejection_message(
    prefix: str, bike_id: str, rejection: Rejection, received_at: datetime
) -> tuple[str, bytes]:
    """The answer on ``bike_id``'s rejections topic to a message it sent on ``rejection.topic``."""
    payload = RejectionPayload(
        topic=rejection.topic,
        reason=rejection.reason,
        detail=rejection.detail,
        session_id=rejection.session_id,
        telemetry_id=rejection.telemetry_id,
        received_at=received_at,
    )
    return topics_for(prefix).bike(bike_id, OutboundKind.REJECTIONS), payload.encode()
