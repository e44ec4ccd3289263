"""The daemon's MQTT 3.1.1 connection (paho through aiomqtt): persistent session, subscriptions,
reconnect with backoff. MQTT v5, the default, has its own lighter link (``daemon.mqtt.v5``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiomqtt
from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from daemon.backoff import Backoff
from daemon.config import Settings
from daemon.metrics import Metrics
from daemon.mqtt.acks import ManualAcks, PausableClient, disconnect, receive_directly
from daemon.mqtt.delivery import Delivery, LinkDown, ReadGate, log_connected, log_lost
from daemon.mqtt.topics import topics_for

__all__ = ["MqttLink"]


def _refused(code: object) -> bool:
    """A SUBACK code that refuses the subscription (MQTT v5 reason code, or v3 0x80)."""
    if isinstance(code, ReasonCode):
        return bool(code.is_failure)
    return isinstance(code, int) and code >= 0x80


class MqttLink:
    """Keeps one connection up; hands inbound messages to ``deliver``; publishes for the outbox.

    A fixed client id and a persistent session (MQTT v5: CleanStart=0 and a Session Expiry
    Interval; MQTT 3.1.1: CleanSession=0), so the broker keeps queueing while the daemon is
    away. The daemon bounds what it holds itself (``pause_reading``), whatever the broker sends.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        deliver: Callable[[Delivery], None],
        gate: ReadGate | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._deliver = deliver
        self._clock = clock
        self._client: PausableClient | None = None
        self._paused = False
        self.connected = asyncio.Event()
        self.connected_since = 0.0  # time.monotonic() of the last subscription granted
        self.stopping = False
        if gate is not None:
            gate.follow(self)

    def _new_client(self) -> PausableClient:
        s = self._settings
        broker = s.broker
        tls_context = s.tls_context()  # checked at start-up: here it only loads again
        if s.mqtt_protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = s.session_expiry_s
            properties.ReceiveMaximum = s.receive_maximum
            session: dict[str, Any] = {
                "protocol": aiomqtt.ProtocolVersion.V5,
                "clean_start": False,
                "properties": properties,
            }
        else:
            # MQTT 3.1.1: the broker's settings stand in for what v5 lets the client ask for
            # (Mosquitto: max_inflight_messages for Receive Maximum, persistent_client_expiration
            # for Session Expiry Interval); see the README, "MQTT protocol level".
            session = {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": False}
        client = PausableClient(
            broker.host,
            broker.port,
            username=broker.username,
            password=broker.password,
            identifier=s.client_id,
            keepalive=30,
            timeout=10,
            tls_context=tls_context,
            max_inflight_messages=100,
            **session,
        )
        client.pending_calls_threshold = 1000  # the outbox publisher keeps many PUBACKs pending
        return client

    def _subscriptions(self) -> list[tuple[str, Any]]:
        filters = topics_for(self._settings.topic_prefix).filters(self._settings.share_group)
        if self._settings.mqtt_protocol == "5":
            # No Local: the daemon never hears what it publishes itself.
            return [(f, SubscribeOptions(qos=1, noLocal=True)) for f in filters]
        return [(f, 1) for f in filters]

    async def run(self) -> None:
        """Connect, subscribe, pass messages on; on any MQTT error, back off and reconnect."""
        backoff = Backoff()
        while not self.stopping:
            wait: float | None = None
            client = self._new_client()
            acks = ManualAcks(client)
            # Each message goes straight to the pipeline from paho's read callback.
            receive_directly(client, self._receiver(acks))
            try:
                async with client:
                    self._connected(client)
                    backoff.reset()
                    await self._subscribe(client)
                    self.connected_since = time.monotonic()
                    if self._paused:
                        client.pause_reading()
                    # Messages are handed over as they arrive (receive_directly); this only
                    # waits for the connection to end, which aiomqtt reports with MqttError.
                    async for _ in client.messages:
                        pass
            except aiomqtt.MqttError as exc:
                if self.stopping:
                    break
                wait = backoff.next_wait()
                self._report_loss(acks, exc, wait)
            finally:
                acks.close()
                self._client = None
                self.connected.clear()
                self._metrics.mqtt_connected.set(0)
            await asyncio.sleep(backoff.next_wait() if wait is None else wait)

    def _receiver(self, acks: ManualAcks) -> Callable[[MQTTMessage], None]:
        deliver, clock = self._deliver, self._clock

        def receive(m: MQTTMessage) -> None:
            deliver(Delivery(m.topic, bytes(m.payload), m.mid, m.qos, acks, clock()))

        return receive

    def _connected(self, client: PausableClient) -> None:
        self._client = client
        self.connected.set()
        self._metrics.mqtt_connected.set(1)
        log_connected(self._settings.broker.display, self._settings.client_id)

    async def _subscribe(self, client: PausableClient) -> None:
        """Subscribe to the bikes' topics; MqttError naming each filter the broker refused."""
        subscriptions = self._subscriptions()
        granted = await client.subscribe(subscriptions)
        refused = [
            f"{f} ({code})"
            for (f, _), code in zip(subscriptions, granted, strict=False)
            if _refused(code)
        ]
        if refused:
            # Typically an ACL that does not let this user read the bike topics.
            raise aiomqtt.MqttError(f"subscription refused: {', '.join(refused)}")

    def _report_loss(self, acks: ManualAcks, exc: aiomqtt.MqttError, wait: float) -> None:
        was_connected = bool(acks.sent) or self.connected.is_set()
        log_lost(
            self._settings.broker.display, was_connected=was_connected, error=str(exc), wait=wait
        )

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
        """Publish with QoS 1 and wait for the broker's PUBACK; raises LinkDown when down."""
        client = self._client
        if client is None:
            raise LinkDown("not connected")
        try:
            await client.publish(topic, payload, qos=1, timeout=10)
        except aiomqtt.MqttError as exc:
            raise LinkDown(str(exc)) from exc
