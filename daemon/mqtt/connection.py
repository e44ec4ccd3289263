"""The daemon's MQTT connection: persistent session, subscriptions, reconnect with backoff."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from daemon.config import Settings
from daemon.metrics import Metrics
from daemon.mqtt.acks import ManualAcks, PausableClient, disconnect, handoff_queue
from daemon.mqtt.topics import topics_for

__all__ = ["Delivery", "MqttLink"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Delivery:
    """An inbound message, the connection that will acknowledge it, and when it arrived."""

    message: aiomqtt.Message
    acks: ManualAcks
    received_at: datetime

    @property
    def topic(self) -> str:
        return self.message.topic.value

    @property
    def payload(self) -> bytes:
        payload = self.message.payload
        if isinstance(payload, bytes | bytearray):
            return bytes(payload)
        return str(payload).encode() if payload is not None else b""


def _refused(code: object) -> bool:
    """A SUBACK code that refuses the subscription (MQTT v5 reason code, or v3 0x80)."""
    if isinstance(code, ReasonCode):
        return bool(code.is_failure)
    return isinstance(code, int) and code >= 0x80


class MqttLink:
    """Keeps one connection up; hands inbound messages to ``deliver``; publishes for the outbox.

    MQTT v5 with a fixed client id, CleanStart=0 on every connect and a Session Expiry Interval,
    so the broker keeps queueing while the daemon is away; Receive Maximum bounds how many
    unacknowledged messages the broker sends, which bounds the daemon's memory.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        deliver: Callable[[Delivery], None],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._deliver = deliver
        self._clock = clock
        self._client: PausableClient | None = None
        self._paused = False
        self.connected = asyncio.Event()
        self.stopping = False

    def _new_client(self, holder: list[ManualAcks]) -> PausableClient:
        s = self._settings
        broker = s.broker
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = s.session_expiry_s
        properties.ReceiveMaximum = s.receive_maximum
        tls_context = None
        if broker.tls:
            tls_context = ssl.create_default_context(
                cafile=str(s.mqtt_ca_file) if s.mqtt_ca_file else None
            )
        deliver, clock = self._deliver, self._clock

        # Each message goes straight to the pipeline from paho's receive callback.
        handoff = handoff_queue(lambda item: deliver(Delivery(item, holder[0], clock())))

        client = PausableClient(
            broker.host,
            broker.port,
            username=broker.username,
            password=broker.password,
            identifier=s.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=properties,
            keepalive=30,
            timeout=10,
            tls_context=tls_context,
            max_inflight_messages=100,
            queue_type=handoff,
        )
        client.pending_calls_threshold = 1000  # the outbox publisher keeps many PUBACKs pending
        return client

    async def run(self) -> None:
        """Connect, subscribe, pass messages on; on any MQTT error, back off and reconnect."""
        backoff = 0.5
        while not self.stopping:
            holder: list[ManualAcks] = []
            client = self._new_client(holder)
            acks = ManualAcks(client)
            holder.append(acks)
            try:
                async with client:
                    self._client = client
                    self.connected.set()
                    self._metrics.mqtt_connected.set(1)
                    log.info(
                        "mqtt connected",
                        broker=self._settings.broker.display,
                        client_id=self._settings.client_id,
                    )
                    backoff = 0.5
                    options = SubscribeOptions(qos=1, noLocal=True)
                    filters = topics_for(self._settings.topic_prefix).filters(
                        self._settings.share_group
                    )
                    granted = await client.subscribe([(f, options) for f in filters])
                    refused = [
                        f"{f} ({code})"
                        for f, code in zip(filters, granted, strict=False)
                        if _refused(code)
                    ]
                    if refused:
                        # Typically an ACL that does not let this user read the bike topics.
                        raise aiomqtt.MqttError(f"subscription refused: {', '.join(refused)}")
                    if self._paused:
                        client.pause_reading()
                    # Messages are handed off as they arrive (Handoff); this only waits for the
                    # connection to end, which aiomqtt reports by raising MqttError here.
                    async for _ in client.messages:
                        pass
            except aiomqtt.MqttError as exc:
                if self.stopping:
                    break
                what = (
                    "mqtt connection lost; reconnecting"
                    if acks.sent or self.connected.is_set()
                    else "cannot connect to the MQTT broker; retrying"
                )
                log.warning(
                    what, error=str(exc), retry_in_s=backoff, broker=self._settings.broker.display
                )
            finally:
                acks.close()
                self._client = None
                self.connected.clear()
                self._metrics.mqtt_connected.set(0)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def pause_reading(self) -> None:
        """Take nothing more from the broker for now (the daemon holds enough)."""
        self._paused = True
        if self._client is not None:
            self._client.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        if self._client is not None:
            self._client.resume_reading()

    async def disconnect(self) -> None:
        """Leave cleanly: the broker keeps the session and queues for us."""
        self.stopping = True
        client = self._client
        if client is not None:
            disconnect(client)

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish with QoS 1 and wait for the broker's PUBACK; raises MqttError when down."""
        client = self._client
        if client is None:
            raise aiomqtt.MqttError("not connected")
        await client.publish(topic, payload, qos=1, timeout=10)
