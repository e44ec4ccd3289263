"""One inbound message as the service layer takes it, and what it came to."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from daemon.metrics import DropReason
from daemon.mqtt.schemas import Inbound, Rejection
from domain.events import Outcome

__all__ = ["Arrival", "Settled", "message_ref"]


def message_ref(topic: str, payload: bytes) -> bytes:
    """A message's identity while it waits: the same bytes on the same topic are one message."""
    return hashlib.sha256(topic.encode() + b"\0" + payload).digest()


@dataclass(slots=True)  # not frozen: built per message (see Delivery)
class Arrival:
    """One inbound message: raw, decoded (once, as it was taken from the inbox), and when it
    came."""

    topic: str
    payload: bytes
    received_at: datetime
    inbound: Inbound


@dataclass(slots=True)  # not frozen: built per message (see Delivery)
class Settled:
    """What one message came to once its batch is committed."""

    outcome: Outcome | None = None
    rejection: Rejection | None = None
    dropped: DropReason | None = None
