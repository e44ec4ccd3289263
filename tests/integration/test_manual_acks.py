"""The manual-ack adapter against a real Mosquitto: no ack, no forgetting."""

from __future__ import annotations

import asyncio
import functools
import uuid

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.mqtt.acks import ManualAcks
from daemon.simulate import mqtt_client

pytestmark = pytest.mark.integration


def _persistent(broker, client_id: str, protocol: str = "5") -> aiomqtt.Client:
    if protocol == "3.1.1":
        session = {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": False}
    else:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 300
        properties.ReceiveMaximum = 10
        session = {"protocol": aiomqtt.ProtocolVersion.V5, "clean_start": False,
                   "properties": properties}  # fmt: skip
    return aiomqtt.Client(
        "127.0.0.1", broker.port, username="chargeflow-daemon",
        password="daemon-example-password", identifier=client_id, **session,
    )  # fmt: skip


async def _receive(broker, client_id: str, topic: str, ack: bool, wait: float = 2.0,
                   protocol: str = "5"):  # fmt: skip
    """Connect, take what arrives within `wait` seconds, ack it or not, disconnect."""
    client = _persistent(broker, client_id, protocol)
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


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_an_unacknowledged_message_is_redelivered_and_an_acknowledged_one_is_not(
    broker, protocol
):
    bike = f"ack-{uuid.uuid4().hex[:8]}"
    topic = f"chargeflow/v1/bikes/{bike}/telemetry"
    client_id = f"ack-test-{uuid.uuid4().hex[:8]}"
    receive = functools.partial(_receive, broker, client_id, topic, protocol=protocol)
    await receive(ack=True, wait=0.2)  # create the session
    async with mqtt_client(broker.fleet_url) as publisher:
        await publisher.publish(topic, b"one", qos=1)

    assert await receive(ack=False) == [b"one"]
    assert await receive(ack=True) == [b"one"]
    assert await receive(ack=True, wait=1.0) == []


async def test_acks_of_a_closed_connection_are_skipped(broker):
    client = _persistent(broker, f"ack-closed-{uuid.uuid4().hex[:8]}")
    acks = ManualAcks(client)
    acks.close()
    message = aiomqtt.Message("t/1", b"x", qos=1, retain=False, mid=7, properties=None)
    assert acks.ack(message) is False
    assert acks.skipped == 1


def test_aiomqtt_still_registers_its_socket_reader_where_the_pausable_client_replaces_it():
    """PausableClient copies aiomqtt 2.5's `_on_socket_open`: an upgrade that moves it must
    fail here, loudly, not leave the daemon unable to pause."""
    import inspect

    assert aiomqtt.__version__.startswith("2.5."), aiomqtt.__version__
    source = inspect.getsource(aiomqtt.Client._on_socket_open)
    for part in ("loop_read", "add_reader", "_disconnected", "_misc_loop"):
        assert part in source, f"aiomqtt's _on_socket_open no longer uses {part}"
    assert aiomqtt.Client.__init__.__code__.co_names.count("_on_socket_open") >= 1


def _daemon_client(cls, broker, name: str, protocol: aiomqtt.ProtocolVersion):
    """A client logged in as the daemon, with a client id of its own."""
    return cls(
        "127.0.0.1", broker.port, username="chargeflow-daemon",
        password="daemon-example-password", identifier=f"{name}-{uuid.uuid4().hex[:8]}",
        protocol=protocol,
    )  # fmt: skip


async def test_a_paused_client_takes_nothing_until_it_resumes(broker):
    from daemon.mqtt.acks import PausableClient

    topic = f"chargeflow/v1/bikes/pause-{uuid.uuid4().hex[:8]}/telemetry"
    client = _daemon_client(PausableClient, broker, "pause", aiomqtt.ProtocolVersion.V5)
    got: list[bytes] = []
    all_in = asyncio.Event()
    async with client, mqtt_client(broker.fleet_url) as publisher:
        await client.subscribe(topic, qos=1)

        async def read() -> None:
            async for message in client.messages:
                got.append(message.payload)
                if len(got) == 200:
                    all_in.set()

        reader = asyncio.create_task(read())
        client.pause_reading()
        await asyncio.gather(*(publisher.publish(topic, b"%d" % i, qos=1) for i in range(200)))
        await asyncio.sleep(0.5)
        while_paused = len(got)
        client.resume_reading()
        await asyncio.wait_for(all_in.wait(), timeout=10)
        reader.cancel()
    assert while_paused == 0
    assert sorted(got, key=int) == [b"%d" % i for i in range(200)]


async def test_the_internals_the_edge_relies_on_are_where_it_expects_them():
    """Each line names what an aiomqtt or paho upgrade moved, and which part of
    daemon/mqtt/acks.py must follow it."""
    import inspect

    import paho.mqtt.client as paho
    from paho.mqtt import __version__ as paho_version

    import daemon.mqtt.acks as acks

    assert aiomqtt.__version__.startswith("2.5."), f"aiomqtt {aiomqtt.__version__}: review acks.py"
    assert paho_version.startswith("2.2."), f"paho-mqtt {paho_version}: review acks.py"
    client = aiomqtt.Client("127.0.0.1", 1)
    assert isinstance(client._client, paho.Client), "aiomqtt no longer keeps paho as _client"
    for method in ("manual_ack_set", "ack", "disconnect", "loop_read"):
        assert callable(getattr(client._client, method, None)), f"paho lost {method}()"
    # receive_directly replaces paho's on_message after aiomqtt set its own in __init__.
    assert client._client.on_message == client._on_message, (
        "aiomqtt no longer receives through paho's on_message: receive_directly is dead"
    )
    handle = inspect.getsource(paho.Client._handle_on_message)
    assert "on_message(self, self._userdata, message)" in handle, (
        "paho calls on_message differently: receive_directly's callback must follow"
    )
    acks.receive_directly(client, lambda m: None)
    assert client._client.on_message != client._on_message


async def test_receive_directly_hands_paho_messages_over_without_aiomqtt_queueing_them(broker):
    from daemon.mqtt.acks import PausableClient, receive_directly

    topic = f"chargeflow/v1/bikes/direct-{uuid.uuid4().hex[:8]}/telemetry"
    client = _daemon_client(PausableClient, broker, "direct", aiomqtt.ProtocolVersion.V311)
    got: list[tuple[str, bytes, int]] = []
    receive_directly(client, lambda m: got.append((m.topic, m.payload, m.qos)))
    async with client, mqtt_client(broker.fleet_url) as publisher:
        await client.subscribe(topic, qos=1)
        await asyncio.gather(*(publisher.publish(topic, b"%d" % i, qos=1) for i in range(20)))
        for _ in range(100):
            if len(got) == 20:
                break
            await asyncio.sleep(0.05)
        queued = client._queue.qsize()
    assert sorted(got, key=lambda g: int(g[1])) == [(topic, b"%d" % i, 1) for i in range(20)]
    assert queued == 0
