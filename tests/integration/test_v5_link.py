"""The MQTT v5 link's connection state machine against the repo's Mosquitto (daemon.mqtt.v5).

Each test names one thing the daemon relies on its broker connection for: a persistent session,
Receive Maximum, the read pause, PUBACKs only when told and in order, redelivery with DUP,
credentials, refusals reported with the broker's reason, keep-alive, a broker that goes away
mid-batch, reconnecting, publishing for the outbox, leaving cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import mqtt5
import pytest

from daemon.config import Settings
from daemon.devbroker import free_port
from daemon.metrics import Metrics
from daemon.mqtt.delivery import Delivery, LinkDown, ReadGate
from daemon.mqtt.v5 import V5Link, V5Session
from daemon.simulate import mqtt_client
from tests.conftest import DAEMON_USER, Broker

pytestmark = pytest.mark.integration


@dataclass
class Inbox:
    """What a session received, with each PUBLISH's DUP flag."""

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


class Recording(V5Session):
    """A session that also notes each PUBLISH's DUP flag and every write it makes."""

    def __init__(self, *args: object, inbox: Inbox, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.inbox = inbox
        self.writes: list[bytes] = []

    def _publish_received(self, packet: mqtt5.PublishPacket, received_at: object) -> None:
        self.inbox.dup.append(packet.duplicate)
        super()._publish_received(packet, received_at)  # type: ignore[arg-type]

    def _write(self, data: bytes) -> None:
        self.writes.append(data)
        super()._write(data)


def _connect(client_id: str, *, receive_max: int = 100, keep_alive: int = 30,
             user: tuple[str, str] = DAEMON_USER) -> mqtt5.ConnectPacket:  # fmt: skip
    return mqtt5.ConnectPacket(
        client_id, username=user[0], password=user[1].encode(), clean_start=False,
        keep_alive=keep_alive, session_expiry_interval=300, receive_max=receive_max,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def session(
    broker: Broker, connect: mqtt5.ConnectPacket, inbox: Inbox, topic: str | None = None
) -> AsyncIterator[Recording]:
    loop = asyncio.get_running_loop()
    s = Recording(connect, inbox.deliver, inbox=inbox)
    await loop.create_connection(lambda: s, "127.0.0.1", broker.port)
    connack = await asyncio.wait_for(s.connack, 5)
    assert connack.reason_code == mqtt5.ConnAckReasonCode.SUCCESS
    if topic is not None:
        codes = await s.subscribe([mqtt5.TopicFilter(topic, max_qos=mqtt5.QoS.AT_LEAST_ONCE)])
        assert [int(c) for c in codes] == [1]
    try:
        yield s
    finally:
        s.disconnect()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(s.closed, 5)


def _topic() -> str:
    return f"chargeflow/v1/bikes/v5-{uuid.uuid4().hex[:8]}/telemetry"


async def _publish(broker: Broker, topic: str, n: int, start: int = 0) -> None:
    async with mqtt_client(broker.fleet_url) as publisher:
        await asyncio.gather(
            *(publisher.publish(topic, b"%d" % i, qos=1) for i in range(start, start + n))
        )


async def test_a_persistent_session_keeps_queueing_while_the_daemon_is_away(broker):
    topic, client_id = _topic(), f"v5-persist-{uuid.uuid4().hex[:8]}"
    async with session(broker, _connect(client_id), Inbox(), topic):
        pass
    await _publish(broker, topic, 5)
    inbox = Inbox()
    async with session(broker, _connect(client_id), inbox) as s:
        assert s.connack.result().session_present
        await inbox.wait_for(5)
        for d in inbox.got:
            d.ack()
    assert sorted(inbox.payloads, key=int) == [b"%d" % i for i in range(5)]


async def test_unacknowledged_messages_come_back_with_dup_and_acknowledged_ones_do_not(broker):
    topic, client_id = _topic(), f"v5-dup-{uuid.uuid4().hex[:8]}"
    async with session(broker, _connect(client_id), Inbox(), topic):
        pass
    await _publish(broker, topic, 6)
    first = Inbox()
    async with session(broker, _connect(client_id), first):
        await first.wait_for(6)
        for d in first.got[:3]:  # the pipeline committed the first three only
            assert d.ack()
    again = Inbox()
    async with session(broker, _connect(client_id), again):
        await again.wait_for(3)
        await asyncio.sleep(0.3)
        for d in again.got:
            d.ack()
    assert first.dup == [False] * 6
    assert again.payloads == first.payloads[3:]
    assert again.dup == [True] * 3
    # ... and, acknowledged, they are gone for good.
    last = Inbox()
    async with session(broker, _connect(client_id), last):
        await asyncio.sleep(0.5)
    assert last.got == []


async def test_pubacks_are_written_in_the_order_given_in_one_write_per_turn(broker):
    topic = _topic()
    inbox = Inbox()
    async with session(broker, _connect(f"v5-order-{uuid.uuid4().hex[:8]}"), inbox, topic) as s:
        await _publish(broker, topic, 50)
        await inbox.wait_for(50)
        before = len(s.writes)
        for d in inbox.got:  # arrival order, as the pipeline acknowledges
            d.ack()
        assert len(s.writes) == before  # nothing written until this turn of the loop ends
        await asyncio.sleep(0)
        written = b"".join(s.writes[before:])
    mids = [d.mid for d in inbox.got]
    assert written == b"".join(bytes((0x40, 2, m >> 8, m & 0xFF)) for m in mids)
    assert len(s.writes) - before >= 1


async def test_receive_maximum_is_asked_for_and_the_first_window_respects_it(broker):
    """Mosquitto 2.0.11 honours the Receive Maximum asked for until the first acks, then sends
    what it has queued regardless: which is why the daemon bounds its own intake with the read
    pause (next test), whatever the broker sends."""
    topic = _topic()
    inbox = Inbox()
    connect = _connect(f"v5-recvmax-{uuid.uuid4().hex[:8]}", receive_max=5)
    async with session(broker, connect, inbox, topic):
        await _publish(broker, topic, 20)
        await inbox.wait_for(5)
        await asyncio.sleep(0.5)
        assert len(inbox.got) == 5
        for d in inbox.got:
            d.ack()
        await inbox.wait_for(20)
        for d in inbox.got[5:]:
            d.ack()


async def test_a_paused_session_takes_nothing_until_it_resumes(broker):
    topic = _topic()
    inbox = Inbox()
    async with session(broker, _connect(f"v5-pause-{uuid.uuid4().hex[:8]}"), inbox, topic) as s:
        s.pause_reading()
        await _publish(broker, topic, 200)
        await asyncio.sleep(0.5)
        while_paused = len(inbox.got)
        s.resume_reading()
        await inbox.wait_for(100)
        for d in inbox.got:
            d.ack()
        await inbox.wait_for(200)
    assert while_paused == 0
    assert sorted(inbox.payloads, key=int) == [b"%d" % i for i in range(200)]


async def test_acks_of_a_lost_connection_are_skipped_not_written_on_the_next(own_broker):
    topic, client_id = _topic(), f"v5-lost-{uuid.uuid4().hex[:8]}"
    inbox = Inbox()
    async with session(own_broker, _connect(client_id), inbox, topic) as s:
        await _publish(own_broker, topic, 10)
        await inbox.wait_for(10)
        await asyncio.to_thread(own_broker.stop)  # the broker goes away mid-batch
        with pytest.raises(Exception):  # noqa: B017,PT011 - whatever the socket reports
            await asyncio.wait_for(s.closed, 5)
        assert [d.ack() for d in inbox.got] == [False] * 10
        assert s.skipped == 10 and s.sent == 0


async def test_a_broker_that_answers_nothing_is_given_up_after_the_keep_alive(unused_tcp_port):
    """A broker that takes the connection and then says nothing (a half-open link)."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read(1024)  # CONNECT
        writer.write(mqtt5.ConnAckPacket().write())
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", unused_tcp_port)
    async with server:
        s = V5Session(_connect("v5-silent", keep_alive=1), Inbox().deliver)
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: s, "127.0.0.1", unused_tcp_port)
        await asyncio.wait_for(s.connack, 5)
        began = loop.time()
        with pytest.raises(TimeoutError, match="no answer from the broker"):
            await asyncio.wait_for(s.closed, 10)
        assert 1.0 <= loop.time() - began < 4
        for writer in accepted:
            writer.close()


async def test_keep_alive_holds_an_idle_connection_open(broker):
    inbox = Inbox()
    connect = _connect(f"v5-idle-{uuid.uuid4().hex[:8]}", keep_alive=1)
    async with session(broker, connect, inbox) as s:
        await asyncio.sleep(3.5)  # Mosquitto drops a client silent for 1.5 keep-alives
        assert not s.closed.done()
        assert mqtt5.PingReqPacket().write() in s.writes


async def test_publishing_waits_for_the_brokers_puback(broker):
    topic = _topic().replace("/telemetry", "/billing")
    inbox = Inbox()
    async with (
        mqtt_client(broker.fleet_url) as watcher,
        session(broker, _connect(f"v5-pub-{uuid.uuid4().hex[:8]}"), inbox) as s,
    ):
        await watcher.subscribe(topic, qos=1)
        await asyncio.gather(*(s.publish(topic, b"%d" % i) for i in range(150)))
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
) -> V5Link:
    settings = Settings(mqtt_url=broker_url, client_id=f"v5-link-{uuid.uuid4().hex[:8]}",
                        **overrides)  # type: ignore[arg-type]  # fmt: skip
    return V5Link(settings, Metrics(), deliver, gate)


async def test_a_wrong_password_is_reported_with_the_brokers_reason(broker):
    link = _link(f"mqtt://chargeflow-daemon:wrong@127.0.0.1:{broker.port}", Inbox().deliver)
    errors = await _warnings_of(link, 0.4)
    assert errors[0] == "the broker refused the connection: NOT_AUTHORIZED"
    assert not link.connected.is_set()


@contextlib.asynccontextmanager
async def scripted_broker(answer: Callable[[object], bytes | None]) -> AsyncIterator[int]:
    """A broker that answers each packet with ``answer(packet)``: for the refusals the repo's
    Mosquitto cannot be made to give (its ACLs grant any SUBSCRIBE and filter on delivery)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        while data := await reader.read(4096):
            buffer += data
            while buffer:
                try:
                    packet, n = mqtt5.read(memoryview(buffer))
                except IndexError:
                    break
                buffer = buffer[n:]
                reply = answer(packet)
                if reply is not None:
                    writer.write(reply)
        writer.close()

    port = free_port()
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        yield port


async def _warnings_of(link: V5Link, seconds: float) -> list[str]:
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
    def answer(packet: object) -> bytes | None:
        if isinstance(packet, mqtt5.ConnectPacket):
            return mqtt5.ConnAckPacket().write()
        if isinstance(packet, mqtt5.SubscribePacket):
            codes = [mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE,
                     mqtt5.SubAckReasonCode.NOT_AUTHORIZED]  # fmt: skip
            return mqtt5.SubAckPacket(packet.packet_id, codes).write()
        return None

    async with scripted_broker(answer) as port:
        link = _link(f"mqtt://chargeflow-daemon:pw@127.0.0.1:{port}", Inbox().deliver)
        errors = await _warnings_of(link, 1.2)
    assert len(errors) >= 2  # reported, then tried again
    assert errors[0] == ("subscription refused: chargeflow/v1/bikes/+/telemetry (NOT_AUTHORIZED)")


async def test_a_refused_connection_is_reported_with_the_brokers_reason():
    def answer(packet: object) -> bytes | None:
        if isinstance(packet, mqtt5.ConnectPacket):
            return mqtt5.ConnAckPacket(
                reason_code=mqtt5.ConnAckReasonCode.BANNED, reason_str="go away"
            ).write()
        return None

    async with scripted_broker(answer) as port:
        link = _link(f"mqtt://chargeflow-daemon:pw@127.0.0.1:{port}", Inbox().deliver)
        errors = await _warnings_of(link, 0.4)
    assert errors[0] == "the broker refused the connection: BANNED (go away)"


async def test_the_link_reconnects_after_a_broker_restart_and_takes_what_was_queued(own_broker):
    inbox = Inbox()
    topic = _topic()
    link = _link(own_broker.daemon_url, inbox.deliver)
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


async def test_a_link_built_behind_a_closed_gate_reads_nothing_until_it_opens(broker):
    """The pipeline closes the gate when it holds enough; a link follows it from the start,
    on its first connection as on any other."""
    inbox, gate, topic = Inbox(), ReadGate(), _topic()
    gate.close()
    link = _link(broker.daemon_url, inbox.deliver, gate)
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


async def test_leaving_sends_disconnect_and_the_link_ends(broker):
    link = _link(broker.daemon_url, Inbox().deliver)
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
