"""Acknowledge inbound QoS 1 messages only after what they caused is committed.

aiomqtt 2.5 has no public manual acknowledgement (its issue #345); paho, underneath, does
(``manual_ack_set(True)`` and ``ack(mid, qos)``). This is the one place that reaches through.
"""

from __future__ import annotations

import aiomqtt
import paho.mqtt.client as paho

__all__ = ["ManualAcks"]


class ManualAcks:
    """The acknowledgements of one connection: once it is gone, its acks are not sent.

    The broker redelivers what a lost connection left unacknowledged, and redelivery is a
    duplicate the pipeline settles as a no-op, so skipping a stale ack is always safe.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._paho: paho.Client = client._client
        self._paho.manual_ack_set(True)
        self._open = True
        self.sent = 0
        self.skipped = 0

    @property
    def open(self) -> bool:
        return self._open

    def close(self) -> None:
        """The connection is gone: later acks would name packet ids of a dead session."""
        self._open = False

    def ack(self, message: aiomqtt.Message) -> bool:
        """Send the PUBACK of a settled message; False when its connection is gone."""
        if message.qos == 0:
            return True
        if not self._open:
            self.skipped += 1
            return False
        rc = self._paho.ack(message.mid, message.qos)
        if rc != paho.MQTT_ERR_SUCCESS:
            self.skipped += 1
            return False
        self.sent += 1
        return True
