"""The daemon's broker connection against the repo's Mosquitto (daemon.mqtt.connection), at
both protocol levels: one code, the same guarantees.

Each test names one thing the daemon relies on its broker connection for: a persistent session,
Receive Maximum, the read pause, PUBACKs only when told and in order, redelivery with DUP,
credentials, refusals reported with the broker's reason, keep-alive, a broker that goes away
mid-batch, reconnecting, a list of brokers, publishing for the outbox, leaving cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import mqtt5
import pytest

from daemon.config import Settings
from daemon.devbroker import free_port
from daemon.metrics import Metrics
from daemon.mqtt.connection import Connection, MqttLink
from daemon.mqtt.delivery import Delivery, LinkDown, ReadGate
from daemon.mqtt.packets import PINGREQ, Codec, codec_for
from tests.conftest import DAEMON_USER, Broker
from tests.peers import mqtt_client

pytestmark = pytest.mark.integration


@pytest.fixture(params=["5", "3.1.1"])
def level(request: pytest.FixtureRequest) -> str:
    """Every test of the connection runs at both protocol levels."""
    return str(request.param)


@dataclass
class Inbox:
    """What a connection received, with each PUBLISH's DUP flag."""

    got: list[Delivery] = field(default_factory=list)
    dup: list[bool] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self, delivery: Delivery) -> None:
        self.got.append(delivery)
        self.arrived.set()

    async def wait_for(self, n: int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while len(self.got) < n:
                self.arrived.clear()
                await self.arrived.wait()

    @property
    def payloads(self) -> list[bytes]:
        return [d.payload for d in self.got]


class Recording(Connection):
    """A connection that also notes each PUBLISH's DUP flag and every write it makes."""

    def __init__(self, *args: object, inbox: Inbox, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.inbox = inbox
        self.writes: list[bytes] = []

    def _publish_received(self, packet: object, received_at: object) -> None:
        self.inbox.dup.append(packet.duplicate)  # type: ignore[attr-defined]
        super()._publish_received(packet, received_at)  # type: ignore[arg-type]

    def _write(self, data: bytes) -> None:
        self.writes.append(data)
        super()._write(data)


@dataclass(frozen=True)
class Hello:
    """A CONNECT at one protocol level."""

    codec: Codec
    packet: bytes
    keep_alive: int


def _connect(level: str, client_id: str, *, receive_max: int = 100, keep_alive: int = 30,
             user: tuple[str, str] = DAEMON_USER) -> Hello:  # fmt: skip
    codec = codec_for(level)  # type: ignore[arg-type]
    packet = codec.connect(client_id, username=user[0], password=user[1], keep_alive=keep_alive,
                           session_expiry_s=300, receive_max=receive_max)  # fmt: skip
    return Hello(codec, packet, keep_alive)


@contextlib.asynccontextmanager
async def connection(
    broker: Broker, hello: Hello, inbox: Inbox, topic: str | None = None
) -> AsyncIterator[Recording]:
    loop = asyncio.get_running_loop()
    c = Recording(hello.codec, hello.packet, inbox.deliver, keep_alive=hello.keep_alive,
                  inbox=inbox)  # fmt: skip
    await loop.create_connection(lambda: c, "127.0.0.1", broker.port)
    connack = await asyncio.wait_for(c.connack, 5)
    assert connack.accepted, connack
    if topic is not None:
        assert await c.subscribe([topic]) == (None,)
    try:
        yield c
    finally:
        c.disconnect()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.closed, 5)


def _topic() -> str:
    return f"chargeflow/v1/bikes/v5-{uuid.uuid4().hex[:8]}/telemetry"


async def _publish(broker: Broker, topic: str, n: int, start: int = 0) -> None:
    async with mqtt_client(broker.fleet_url) as publisher:
        await asyncio.gather(
            *(publisher.publish(topic, b"%d" % i, qos=1) for i in range(start, start + n))
        )


async def test_a_persistent_session_keeps_queueing_while_the_daemon_is_away(broker, level):
    topic, client_id = _topic(), f"link-persist-{uuid.uuid4().hex[:8]}"
    async with connection(broker, _connect(level, client_id), Inbox(), topic):
        pass
    await _publish(broker, topic, 5)
    inbox = Inbox()
    async with connection(broker, _connect(level, client_id), inbox) as c:
        assert c.connack.result().session_present
        await inbox.wait_for(5)
        for d in inbox.got:
            d.ack()
    assert sorted(inbox.payloads, key=int) == [b"%d" % i for i in range(5)]


async def test_unacknowledged_messages_come_back_with_dup_and_acknowledged_ones_do_not(
    broker, level
):
    topic, client_id = _topic(), f"link-dup-{uuid.uuid4().hex[:8]}"
    async with connection(broker, _connect(level, client_id), Inbox(), topic):
        pass
    await _publish(broker, topic, 6)
    first = Inbox()
    async with connection(broker, _connect(level, client_id), first):
        await first.wait_for(6)
        for d in first.got[:3]:  # the pipeline committed the first three only
            assert d.ack()
    again = Inbox()
    async with connection(broker, _connect(level, client_id), again):
        await again.wait_for(3)
        await asyncio.sleep(0.3)
        for d in again.got:
            d.ack()
    assert first.dup == [False] * 6
    assert again.payloads == first.payloads[3:]
    assert again.dup == [True] * 3
    # ... and, acknowledged, they are gone for good.
    last = Inbox()
    async with connection(broker, _connect(level, client_id), last):
        await asyncio.sleep(0.5)
    assert last.got == []


async def test_pubacks_are_written_in_the_order_given_in_one_write_per_turn(broker, level):
    topic = _topic()
    inbox = Inbox()
    hello = _connect(level, f"link-order-{uuid.uuid4().hex[:8]}")
    async with connection(broker, hello, inbox, topic) as c:
        await _publish(broker, topic, 50)
        await inbox.wait_for(50)
        before = len(c.writes)
        for d in inbox.got:  # arrival order, as the pipeline acknowledges
            d.ack()
        assert len(c.writes) == before  # nothing written until this turn of the loop ends
        await asyncio.sleep(0)
        written = b"".join(c.writes[before:])
    mids = [d.mid for d in inbox.got]
    assert written == b"".join(bytes((0x40, 2, m >> 8, m & 0xFF)) for m in mids)
    assert len(c.writes) - before >= 1


async def test_receive_maximum_is_asked_for_and_the_first_window_respects_it(broker):
    """MQTT v5 only (3.1.1 has no Receive Maximum). Mosquitto 2.0.11 honours the Receive
    Maximum asked for until the first acks, then sends what it has queued regardless: which is
    why the daemon bounds its own intake with the read pause (next test), whatever the broker
    sends."""
    topic = _topic()
    inbox = Inbox()
    hello = _connect("5", f"link-recvmax-{uuid.uuid4().hex[:8]}", receive_max=5)
    async with connection(broker, hello, inbox, topic):
        await _publish(broker, topic, 20)
        await inbox.wait_for(5)
        await asyncio.sleep(0.5)
        assert len(inbox.got) == 5
        for d in inbox.got:
            d.ack()
        await inbox.wait_for(20)
        for d in inbox.got[5:]:
            d.ack()


async def test_a_paused_connection_takes_nothing_until_it_resumes(broker, level):
    topic = _topic()
    inbox = Inbox()
    hello = _connect(level, f"link-pause-{uuid.uuid4().hex[:8]}")
    async with connection(broker, hello, inbox, topic) as c:
        c.pause_reading()
        await _publish(broker, topic, 200)
        await asyncio.sleep(0.5)
        while_paused = len(inbox.got)
        c.resume_reading()
        await inbox.wait_for(100)
        for d in inbox.got:
            d.ack()
        await inbox.wait_for(200)
    assert while_paused == 0
    assert sorted(inbox.payloads, key=int) == [b"%d" % i for i in range(200)]


async def test_acks_of_a_lost_connection_are_skipped_not_written_on_the_next(own_broker, level):
    topic, client_id = _topic(), f"link-lost-{uuid.uuid4().hex[:8]}"
    inbox = Inbox()
    async with connection(own_broker, _connect(level, client_id), inbox, topic) as c:
        await _publish(own_broker, topic, 10)
        await inbox.wait_for(10)
        await asyncio.to_thread(own_broker.stop)  # the broker goes away mid-batch
        with pytest.raises(Exception):  # noqa: B017,PT011 - whatever the socket reports
            await asyncio.wait_for(c.closed, 5)
        assert [d.ack() for d in inbox.got] == [False] * 10
        assert c.skipped == 10 and c.sent == 0


async def test_a_broker_that_answers_nothing_is_given_up_after_the_keep_alive(
    unused_tcp_port, level
):
    """A broker that takes the connection and then says nothing (a half-open link)."""
    accepted: list[asyncio.StreamWriter] = []
    connack = mqtt5.ConnAckPacket().write() if level == "5" else b"\x20\x02\x00\x00"

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read(1024)  # CONNECT
        writer.write(connack)
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", unused_tcp_port)
    async with server:
        hello = _connect(level, "link-silent", keep_alive=1)
        c = Connection(hello.codec, hello.packet, Inbox().deliver, keep_alive=1)
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: c, "127.0.0.1", unused_tcp_port)
        assert (await asyncio.wait_for(c.connack, 5)).accepted
        began = loop.time()
        with pytest.raises(TimeoutError, match="no answer from the broker"):
            await asyncio.wait_for(c.closed, 10)
        assert 1.0 <= loop.time() - began < 4
        for writer in accepted:
            writer.close()


async def test_keep_alive_holds_an_idle_connection_open(broker, level):
    inbox = Inbox()
    hello = _connect(level, f"link-idle-{uuid.uuid4().hex[:8]}", keep_alive=1)
    async with connection(broker, hello, inbox) as c:
        await asyncio.sleep(3.5)  # Mosquitto drops a client silent for 1.5 keep-alives
        assert not c.closed.done()
        assert PINGREQ in c.writes


async def test_publishing_waits_for_the_brokers_puback(broker, level):
    topic = _topic().replace("/telemetry", "/billing")
    inbox = Inbox()
    async with (
        mqtt_client(broker.fleet_url) as watcher,
        connection(broker, _connect(level, f"link-pub-{uuid.uuid4().hex[:8]}"), inbox) as c,
    ):
        await watcher.subscribe(topic, qos=1)
        await asyncio.gather(*(c.publish(topic, b"%d" % i) for i in range(150)))
        got = []
        async with asyncio.timeout(5):
            async for message in watcher.messages:
                got.append(message.payload)
                if len(got) == 150:
                    break
    assert got == [b"%d" % i for i in range(150)]  # in order, beyond a window of 100


def _link(
    broker_url: str,
    deliver: Callable[[Delivery], None],
    gate: ReadGate | None = None,
    **overrides: object,
) -> MqttLink:
    settings = Settings(mqtt_url=broker_url, client_id=f"link-{uuid.uuid4().hex[:8]}",
                        **overrides)  # type: ignore[arg-type]  # fmt: skip
    return MqttLink(settings, Metrics(), deliver, gate)


async def test_a_wrong_password_is_reported_with_the_brokers_reason(broker, level):
    link = _link(f"mqtt://chargeflow-daemon:wrong@127.0.0.1:{broker.port}", Inbox().deliver,
                 mqtt_protocol=level)  # fmt: skip
    errors = await _warnings_of(link, 0.4)
    said = "NOT_AUTHORIZED" if level == "5" else "not authorized"
    assert errors[0] == f"the broker refused the connection: {said}"
    assert not link.connected.is_set()


@contextlib.asynccontextmanager
async def scripted_broker(answer: Callable[[bytes], bytes | None]) -> AsyncIterator[int]:
    """A broker that answers each read with ``answer(what was read)`` (None: close): for the
    refusals the repo's Mosquitto cannot be made to give (its ACLs grant any SUBSCRIBE and
    filter on delivery) and for brokers that speak another protocol level."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            reply = answer(data)
            if reply is None:
                break
            writer.write(reply)
        writer.close()

    port = free_port()
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        yield port


def v5_answers(reply: Callable[[object], bytes | None]) -> Callable[[bytes], bytes | None]:
    """``scripted_broker``'s answer from MQTT v5 packets (one packet a read, as the link
    writes them here)."""

    def answer(data: bytes) -> bytes | None:
        packet, _ = mqtt5.read(memoryview(data))
        return reply(packet) or b""

    return answer


async def _warnings_of(link: MqttLink, seconds: float) -> list[str]:
    from structlog.testing import capture_logs

    with capture_logs() as events:
        task = asyncio.create_task(link.run())
        await asyncio.sleep(seconds)
        link.stopping = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return [e["error"] for e in events if "retry_in_s" in e]


async def test_a_refused_subscription_is_reported_with_the_filter_and_retried():
    def reply(packet: object) -> bytes | None:
        if isinstance(packet, mqtt5.ConnectPacket):
            return mqtt5.ConnAckPacket().write()
        if isinstance(packet, mqtt5.SubscribePacket):
            codes = [mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE,
                     mqtt5.SubAckReasonCode.NOT_AUTHORIZED]  # fmt: skip
            return mqtt5.SubAckPacket(packet.packet_id, codes).write()
        return None

    async with scripted_broker(v5_answers(reply)) as port:
        link = _link(f"mqtt://chargeflow-daemon:pw@127.0.0.1:{port}", Inbox().deliver)
        errors = await _warnings_of(link, 1.2)
    assert len(errors) >= 2  # reported, then tried again
    assert errors[0] == ("subscription refused: chargeflow/v1/bikes/+/telemetry (NOT_AUTHORIZED)")


async def test_a_refused_connection_is_reported_with_the_brokers_reason():
    def reply(packet: object) -> bytes | None:
        if isinstance(packet, mqtt5.ConnectPacket):
            return mqtt5.ConnAckPacket(
                reason_code=mqtt5.ConnAckReasonCode.BANNED, reason_str="go away"
            ).write()
        return None

    async with scripted_broker(v5_answers(reply)) as port:
        link = _link(f"mqtt://chargeflow-daemon:pw@127.0.0.1:{port}", Inbox().deliver)
        errors = await _warnings_of(link, 0.4)
    assert errors[0] == "the broker refused the connection: BANNED (go away)"


async def test_a_broker_that_speaks_only_3_1_1_is_answered_with_the_setting_to_change():
    """What NATS (and RabbitMQ 3, and a Mosquitto limited to 3.1.1) answer a v5 CONNECT: an
    MQTT 3.1.1 CONNACK, return code 1, unacceptable protocol version."""
    async with scripted_broker(lambda data: b"\x20\x02\x00\x01") as port:
        link = _link(f"mqtt://127.0.0.1:{port}", Inbox().deliver)
        errors = await _warnings_of(link, 0.4)
    assert errors[0] == (
        "the broker does not accept MQTT 5 (its answer: unacceptable protocol version (an MQTT "
        "3.1.1 CONNACK)); set CHARGEFLOW_MQTT_PROTOCOL=3.1.1"
    )


async def test_a_broker_that_closes_a_v5_connect_unanswered_is_told_which_setting_may_fix_it():
    async with scripted_broker(lambda data: None) as port:
        link = _link(f"mqtt://127.0.0.1:{port}", Inbox().deliver)
        errors = await _warnings_of(link, 0.4)
    assert errors[0].startswith("the broker closed the connection without answering CONNECT")
    assert "set CHARGEFLOW_MQTT_PROTOCOL=3.1.1" in errors[0]


async def test_a_broker_that_refuses_3_1_1_is_told_to_use_5():
    async with scripted_broker(lambda data: b"\x20\x02\x00\x01") as port:
        link = _link(f"mqtt://127.0.0.1:{port}", Inbox().deliver, mqtt_protocol="3.1.1")
        errors = await _warnings_of(link, 0.4)
    assert errors[0] == (
        "the broker does not accept MQTT 3.1.1 (its answer: unacceptable protocol version); "
        "set CHARGEFLOW_MQTT_PROTOCOL=5"
    )


async def test_a_list_whose_first_broker_is_dead_is_connected_past_at_once(broker, level):
    dead = free_port()  # nothing listens there
    link = _link(f"mqtt://127.0.0.1:{dead},{broker.daemon_url}", Inbox().deliver,
                 mqtt_protocol=level)  # fmt: skip
    began = time.monotonic()
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.connected.wait(), 5)
        took = time.monotonic() - began
        assert link.node is not None and link.node.port == broker.port
        assert link.node.username == DAEMON_USER[0]  # the first URL's login stands for all
    finally:
        await link.disconnect()
        await asyncio.wait_for(task, 5)
    assert took < 1.0


async def test_losing_the_broker_it_is_on_moves_the_link_to_the_next_at_once(level):
    """Two brokers of a list: the one the link is on stops, the link is on the other within a
    second (no backoff), says so, and counts a failover."""
    from structlog.testing import capture_logs

    from tests.conftest import _launched_broker

    with _launched_broker() as first, _launched_broker() as second:
        metrics = Metrics()
        settings = Settings(
            mqtt_url=f"{first.daemon_url},mqtt://127.0.0.1:{second.port}",
            client_id=f"link-failover-{uuid.uuid4().hex[:8]}",
            mqtt_protocol=level,  # type: ignore[arg-type]
        )
        link = MqttLink(settings, metrics, Inbox().deliver)
        with capture_logs() as events:
            task = asyncio.create_task(link.run())
            try:
                await asyncio.wait_for(link.connected.wait(), 5)
                assert link.node is not None and link.node.port == first.port
                await asyncio.to_thread(first.stop)
                lost = time.monotonic()
                async with asyncio.timeout(5):
                    while link.node is None or link.node.port != second.port:  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
                took = time.monotonic() - lost
            finally:
                await link.disconnect()
                await asyncio.wait_for(task, 5)
    assert took < 1.0
    assert metrics.mqtt_failovers._value.get() == 1
    moved = [e for e in events if e["event"] == "mqtt failed over to another broker"]
    assert moved[0]["broker"] == f"mqtt://chargeflow-daemon:***@127.0.0.1:{second.port}"
    assert moved[0]["previous"] == f"mqtt://chargeflow-daemon:***@127.0.0.1:{first.port}"


async def test_the_link_reconnects_after_a_broker_restart_and_takes_what_was_queued(
    own_broker, level
):
    inbox = Inbox()
    topic = _topic()
    link = _link(own_broker.daemon_url, inbox.deliver, mqtt_protocol=level)
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.connected.wait(), 5)
        await asyncio.sleep(0.2)
        await _publish(own_broker, topic, 5)
        await inbox.wait_for(5)
        for d in inbox.got:
            d.ack()
        await asyncio.sleep(0.2)
        await asyncio.to_thread(own_broker.stop)
        await asyncio.to_thread(own_broker.start)
        await _publish(own_broker, topic, 5, start=5)  # before the link is back
        await inbox.wait_for(10, timeout=15)
        assert link.connected.is_set()
    finally:
        await link.disconnect()
        await asyncio.wait_for(task, 5)
    assert sorted(inbox.payloads, key=int) == [b"%d" % i for i in range(10)]


async def test_a_link_built_behind_a_closed_gate_reads_nothing_until_it_opens(broker, level):
    """The pipeline closes the gate when it holds enough; a link follows it from the start,
    on its first connection as on any other."""
    inbox, gate, topic = Inbox(), ReadGate(), _topic()
    gate.close()
    link = _link(broker.daemon_url, inbox.deliver, gate, mqtt_protocol=level)
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.connected.wait(), 5)
        await asyncio.sleep(0.2)
        await _publish(broker, topic, 50)
        await asyncio.sleep(0.5)
        while_closed = len(inbox.got)
        gate.open()
        await inbox.wait_for(50)
        for d in inbox.got:
            d.ack()
    finally:
        await link.disconnect()
        await asyncio.wait_for(task, 5)
    assert while_closed == 0
    assert sorted(inbox.payloads, key=int) == [b"%d" % i for i in range(50)]


async def test_leaving_sends_disconnect_and_the_link_ends(broker, level):
    link = _link(broker.daemon_url, Inbox().deliver, mqtt_protocol=level)
    task = asyncio.create_task(link.run())
    await asyncio.wait_for(link.connected.wait(), 5)
    await link.disconnect()
    await asyncio.wait_for(task, 5)
    assert not link.connected.is_set()
    with pytest.raises(LinkDown):
        await link.publish("chargeflow/v1/bikes/b/billing", b"{}")


@pytest.fixture
def unused_tcp_port() -> int:
    return free_port()
