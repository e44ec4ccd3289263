"""Other MQTT clients, as peers of the daemon's own connection: aiomqtt (on paho) publishes
and watches in the tests, so that what the daemon writes and reads is checked by an
implementation that is not ours."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["mqtt_client"]


def mqtt_client(
    url: str,
    client_id: str | None = None,
    session_expiry_s: int | None = None,
    protocol: str = "5",
) -> aiomqtt.Client:
    """An aiomqtt client for one broker URL (MQTT v5 unless ``protocol`` is "3.1.1"); with
    session_expiry_s, a persistent session (CleanStart=0 / CleanSession=0)."""
    parts = urlsplit(url.split(",", maxsplit=1)[0])
    session: dict[str, object]
    if protocol == "3.1.1":
        session = {
            "protocol": aiomqtt.ProtocolVersion.V311,
            "clean_session": session_expiry_s is None,
        }
    else:
        properties = None
        if session_expiry_s is not None:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = session_expiry_s
        session = {
            "protocol": aiomqtt.ProtocolVersion.V5,
            "clean_start": session_expiry_s is None,
            "properties": properties,
        }
    return aiomqtt.Client(
        parts.hostname or "127.0.0.1",
        parts.port or 1883,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        identifier=client_id,
        max_inflight_messages=200,
        max_queued_outgoing_messages=0,
        **session,  # type: ignore[arg-type]
    )
