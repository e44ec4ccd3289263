"""The manual-ack adapter against a real Mosquitto: no ack, no forgetting."""

from __future__ import annotations

import asyncio
import uuid

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.mqtt.acks import ManualAcks
from daemon.simulate import mqtt_client

pytestmark = pytest.mark.integration


def _persistent(broker, client_id: str) -> aiomqtt.Client:
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 300
    properties.ReceiveMaximum = 10
    return aiomqtt.Client(
        "127.0.0.1", broker.port, username="chargeflow-daemon",
        password="daemon-example-password", identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=properties,
    )  # fmt: skip


async def _receive(broker, client_id: str, topic: str, ack: bool, wait: float = 2.0):
    """Connect, take what arrives within `wait` seconds, ack it or not, disconnect."""
    client = _persistent(broker, client_id)
    acks = ManualAcks(client)
    got = []
    async with client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(wait):
                async for message in client.messages:
                    got.append(message.payload)
                    if ack:
                        assert acks.ack(message)
        except TimeoutError:
            pass
    return got


async def test_an_unacknowledged_message_is_redelivered_and_an_acknowledged_one_is_not(broker):
    bike = f"ack-{uuid.uuid4().hex[:8]}"
    topic = f"chargeflow/v1/bikes/{bike}/telemetry"
    client_id = f"ack-test-{uuid.uuid4().hex[:8]}"
    await _receive(broker, client_id, topic, ack=True, wait=0.2)  # create the session
    async with mqtt_client(broker.fleet_url) as publisher:
        await publisher.publish(topic, b"one", qos=1)

    assert await _receive(broker, client_id, topic, ack=False) == [b"one"]
    assert await _receive(broker, client_id, topic, ack=True) == [b"one"]
    assert await _receive(broker, client_id, topic, ack=True, wait=1.0) == []


async def test_acks_of_a_closed_connection_are_skipped(broker):
    client = _persistent(broker, f"ack-closed-{uuid.uuid4().hex[:8]}")
    acks = ManualAcks(client)
    acks.close()
    message = aiomqtt.Message("t/1", b"x", qos=1, retain=False, mid=7, properties=None)
    assert acks.ack(message) is False
    assert acks.skipped == 1
