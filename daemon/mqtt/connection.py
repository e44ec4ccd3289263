"""The daemon's broker connection: one asyncio protocol for MQTT v5 and MQTT 3.1.1, and the
link that keeps it up across reconnects and across the nodes of a cluster.

What differs between the two levels is how a few packets look (``daemon.mqtt.packets``);
everything the daemon relies on is this one code, each tested against the repo's Mosquitto at
both levels (``tests/integration/test_mqtt_link.py``) and against a NATS cluster
(``tests/e2e/test_cluster.py``):

- a persistent session: a fixed client id and CleanStart=0 (v5, with a Session Expiry
  Interval) or CleanSession=0 (3.1.1), so the broker (or the cluster) queues while we are away;
- the read pause (``pause_reading``) that bounds what the daemon holds whatever the broker
  sends (v5 also asks for a Receive Maximum);
- PUBACKs only when the pipeline says so, written in the order it says so (it acks in arrival
  order, MQTT-4.6.0-2), coalesced into one write per turn of the event loop;
- the acks of a lost connection are never written on the next one (the broker redelivers what
  was not acknowledged, with DUP set, and the pipeline settles redeliveries as duplicates);
- keep-alive: PINGREQ when nothing was written for half the interval; a broker that answers
  nothing for a whole interval while we read is taken as gone;
- QoS 1 publishing for the outbox and the simulator, within a window of PUBACKs outstanding;
- CONNACK and SUBACK refusals reported with the broker's reason, a broker that does not speak
  the configured protocol level answered with the setting to change;
- a list of brokers (the nodes of a cluster): when the one we are on is lost, the next, at
  once; backoff with jitter only once every node has failed in a row;
- DISCONNECT on the way out, so the broker keeps the session and no Will fires.

Why our own protocol rather than paho (through aiomqtt): reading and acknowledging a message
cost paho 16-45 µs of CPU, a quarter of the daemon's, and manual acks and a read pause were
reachable only through both libraries' private attributes; the codecs parse a PUBLISH in about
a microsecond (``python -m benchmarks.codecs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import structlog

from daemon.backoff import Backoff
from daemon.config import BrokerAddress, Settings
from daemon.metrics import Metrics
from daemon.mqtt.delivery import Delivery, LinkDown, ReadGate
from daemon.mqtt.packets import (
    DISCONNECT,
    PINGREQ,
    Codec,
    ConnAck,
    Disconnect,
    PingResp,
    PubAck,
    SubAck,
    codec_for,
    puback,
)
from daemon.mqtt.topics import topics_for

__all__ = ["Connection", "MqttLink", "WrongProtocolLevel"]

log = structlog.get_logger("daemon.mqtt")

TCP_CONNECT_TIMEOUT_S = 3.0  # a live host answers a SYN in milliseconds: move on to the next
CONNACK_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 30
PUBLISH_WINDOW = 100  # QoS 1 PUBLISHes outstanding at most (v5: less if the broker asks)
STABLE_S = 5.0  # a connection that lived this long was a good one: its loss is a failover


class WrongProtocolLevel(LinkDown):
    """The broker does not speak the protocol level we asked for."""


class Connection(asyncio.Protocol):
    """One broker connection, from CONNECT to its loss. Hands each PUBLISH to ``deliver``."""

    def __init__(
        self,
        codec: Codec,
        connect: bytes,
        deliver: Callable[[Delivery], None],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        keep_alive: int = KEEP_ALIVE_S,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.codec = codec
        self._read = codec.read
        self._publish_type = codec.publish_type
        self._connect = connect
        self._deliver = deliver
        self._clock = clock
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out = bytearray()  # acks waiting for the end of this turn of the loop
        self._flush_scheduled = False
        self.connack: asyncio.Future[ConnAck] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        # How it closed is logged by the link, which may have stopped waiting by then.
        self.closed.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiting: dict[int, asyncio.Future[object]] = {}  # our packet id -> its answer
        self._next_id = 0
        self._window = asyncio.Semaphore(PUBLISH_WINDOW)
        self.keep_alive = keep_alive
        self._last_write = self._last_read = time.monotonic()
        self._ping_sent: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.open = True
        self.sent = 0
        self.skipped = 0
        self.received = 0
        self.disconnect_reason: str | None = None
        self.session_present = False  # the broker still had our session (CONNACK)
        self._leaving = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._write(self._connect)
        if self.keep_alive:
            self._timer = self._loop.call_later(self.keep_alive / 2, self._tick)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        taken = 0
        received_at = self._clock()  # one read, one instant: what it held arrived together
        read, publish_type = self._read, self._publish_type
        try:
            with memoryview(buffer) as view:
                size = len(view)
                while taken < size:
                    try:
                        packet, n = read(view[taken:])
                    except IndexError:  # the rest of a packet is still on its way
                        break
                    taken += n
                    if type(packet) is publish_type:
                        self._publish_received(packet, received_at)
                    else:
                        self._control(packet)
        except ValueError as exc:  # not this protocol: nothing more on this connection makes sense
            refusal = None if self.connack.done() else self.codec.misread_connack(bytes(buffer))
            if refusal is not None:
                self.connack.set_result(refusal)
            self._fail(LinkDown(f"malformed packet from the broker: {exc}"))
            return
        finally:
            del buffer[:taken]
        self._last_read = time.monotonic()
        self._ping_sent = None

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
        why: BaseException = (
            exc
            if exc is not None
            else LinkDown(
                f"the broker disconnected us ({self.disconnect_reason})"
                if self.disconnect_reason
                else "the broker closed the connection"
            )
        )
        if not self.connack.done():
            self.connack.set_exception(why if exc is not None else _closed_before_connack(self))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(why)
        self._waiting.clear()
        if not self.closed.done():
            if self._leaving:
                self.closed.set_result(None)
            else:
                self.closed.set_exception(why)

    def pause_writing(self) -> None:  # publishers wait on PUBACKs; acks are small
        pass

    def resume_writing(self) -> None:
        pass

    # -- inbound ---------------------------------------------------------------------------

    def _publish_received(self, packet: Any, received_at: datetime) -> None:
        self.received += 1
        if self._leaving:
            return  # not acknowledged: the broker keeps it for the next connection
        qos = packet.qos
        if qos == 2:
            # Subscribed with QoS 1 at most: a QoS 2 PUBLISH breaks the protocol.
            self._fail(LinkDown("the broker sent QoS 2 on a QoS 1 subscription"))
            return
        self._deliver(
            Delivery(packet.topic, packet.payload, packet.packet_id or 0, qos, self, received_at)
        )

    def _control(self, raw: object) -> None:
        packet = self.codec.control(raw)
        if isinstance(packet, PubAck | SubAck):
            future = self._waiting.pop(packet.packet_id, None)
            if future is not None and not future.done():
                future.set_result(packet)
        elif isinstance(packet, ConnAck):
            if not self.connack.done():
                self._connacked(packet)
        elif isinstance(packet, Disconnect):
            self.disconnect_reason = packet.reason
        elif isinstance(packet, PingResp):
            pass
        else:  # PUBREL and friends belong to QoS 2, which we never ask for
            self._fail(LinkDown(f"unexpected {packet.name} from the broker"))

    def _connacked(self, packet: ConnAck) -> None:
        """The broker's answer to CONNECT: when accepted, what it says of the session, of
        how many messages may be in flight, and of the keep-alive."""
        if packet.accepted:
            self.session_present = packet.session_present
            if packet.receive_max is not None:
                self._window = asyncio.Semaphore(max(1, min(packet.receive_max, 100)))
            if packet.server_keep_alive is not None:
                self.keep_alive = packet.server_keep_alive
        self.connack.set_result(packet)

    # -- acknowledgements (Acks) -----------------------------------------------------------

    def ack(self, message: Delivery) -> bool:
        """Queue the PUBACK of a settled message; False when its connection is gone."""
        if message.qos == 0:
            return True
        if not self.open:
            self.skipped += 1
            return False
        self._out += puback(message.mid)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        self.sent += 1
        return True

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._transport is not None:
            self._write(bytes(self._out))
        self._out.clear()

    # -- outbound --------------------------------------------------------------------------

    async def subscribe(self, filters: Sequence[str]) -> tuple[str | None, ...]:
        """Subscribe with QoS 1; per filter, None if granted, else the broker's reason."""
        suback = await self._request(lambda pid: self.codec.subscribe(pid, filters))
        assert isinstance(suback, SubAck)
        return suback.refused

    async def publish(self, topic: str, payload: bytes) -> None:
        """QoS 1; returns on the broker's PUBACK, raises LinkDown when it does not come and
        ``Refused`` when the broker refuses the message (v5: a PUBACK reason of 0x80 or more,
        such as 0x87 for a topic the ACL does not allow)."""
        async with self._window:
            ack = await self._request(lambda pid: self.codec.publish(topic, payload, pid))
        assert isinstance(ack, PubAck)
        if ack.refused is not None:
            raise Refused(f"the broker refused to publish on {topic}: {ack.refused}")

    async def _request(self, packet: Callable[[int], bytes]) -> object:
        if not self.open:
            raise LinkDown("not connected")
        pid = self._packet_id()
        future: asyncio.Future[object] = self._loop.create_future()
        self._waiting[pid] = future
        self._write(packet(pid))
        try:
            return await asyncio.wait_for(future, PUBLISH_TIMEOUT_S)
        except TimeoutError:
            raise LinkDown(f"the broker did not answer within {PUBLISH_TIMEOUT_S:.0f} s") from None
        except OSError as exc:  # the connection was lost (reset, ...) before the answer
            raise LinkDown(_why(exc)) from exc
        finally:
            self._waiting.pop(pid, None)

    def _packet_id(self) -> int:
        for _ in range(65_535):
            self._next_id = self._next_id % 65_535 + 1
            if self._next_id not in self._waiting:
                return self._next_id
        raise LinkDown("no packet id free")  # pragma: no cover - the window is at most 100

    # -- the connection itself -------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        self._last_write = time.monotonic()

    def _tick(self) -> None:
        """Keep-alive: a PINGREQ when we have been quiet; a silent broker is a lost one."""
        now = time.monotonic()
        half = self.keep_alive / 2
        if self._ping_sent is not None and not self.paused and now - self._ping_sent > half * 2:
            self._fail(TimeoutError(f"no answer from the broker for {self.keep_alive} s"))
            return
        if now - self._last_write >= half:
            self._write(PINGREQ)
            if self._ping_sent is None:
                self._ping_sent = now
        self._timer = self._loop.call_later(half / 2, self._tick)

    def pause_reading(self) -> None:
        if not self.paused and self._transport is not None:
            self._transport.pause_reading()
        self.paused = True

    def resume_reading(self) -> None:
        if self.paused and self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
            self._ping_sent = None if self._ping_sent is None else time.monotonic()
        self.paused = False

    def _fail(self, why: Exception) -> None:
        transport = self._transport
        self.open = False
        if not self.closed.done():
            self.closed.set_exception(why)
        if transport is not None:
            transport.abort()

    def disconnect(self) -> None:
        """DISCONNECT (normal: the broker keeps the session and publishes no Will).

        The broker closes the connection on reading it; we keep reading until then rather than
        close first: a socket closed with unread input is reset, and a reset can make the broker
        discard the last PUBACKs it had not read yet (seen with Mosquitto 2.0.11 when PUBACKs
        and DISCONNECT went out in one write: the last ack's message came back as a duplicate).
        """
        self._flush()
        self._leaving = True
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(DISCONNECT)
            self._loop.call_later(CONNACK_TIMEOUT_S / 5, self._close_now)

    def _close_now(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class Refused(LinkDown):
    """The broker answered a PUBLISH with a refusal (MQTT v5 PUBACK reason 0x80 or more)."""


_OTHER_LEVEL = {"5": "3.1.1", "3.1.1": "5"}


def wrong_level(level: str, how: str) -> WrongProtocolLevel:
    """The one line for a broker that does not speak ``level``: which setting to change."""
    return WrongProtocolLevel(
        f"the broker does not accept MQTT {level} ({how}); "
        f"set CHARGEFLOW_MQTT_PROTOCOL={_OTHER_LEVEL[level]}"
    )


def _closed_before_connack(connection: Connection) -> LinkDown:
    if connection.codec.level == "5":
        # NATS, RabbitMQ 3 and a Mosquitto limited to 3.1.1 answer a v5 CONNECT this way, or
        # with a 3.1.1 CONNACK (which ``misread_connack`` reads).
        return LinkDown(
            "the broker closed the connection without answering CONNECT: if it speaks only "
            "MQTT 3.1.1 (NATS, RabbitMQ 3), set CHARGEFLOW_MQTT_PROTOCOL=3.1.1; otherwise see "
            "the broker's log (credentials, client id)"
        )
    return LinkDown(
        "the broker closed the connection without answering CONNECT (see the broker's log: "
        "credentials, client id)"
    )


def _why(exc: BaseException) -> str:
    """An operator's reading of why the connection failed ("Connection refused", not errno)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class MqttLink:
    """Keeps one connection up, on one broker of a list at a time; hands inbound messages to
    ``deliver``; publishes for the outbox (and the simulator, which subscribes to nothing)."""

    def __init__(  # noqa: PLR0913 - the link's collaborators, and keyword-only switches
        self,
        settings: Settings,
        metrics: Metrics,
        deliver: Callable[[Delivery], None],
        gate: ReadGate | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        *,
        subscribe: bool = True,
        clean: bool = False,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._deliver = deliver
        self._clock = clock
        self._subscribe_to = (
            topics_for(settings.topic_prefix).filters(
                settings.share_group, one=settings.subscription == "one"
            )
            if subscribe
            else []
        )
        self._clean = clean
        self.brokers: tuple[BrokerAddress, ...] = settings.brokers
        self._index = 0
        self.codec = codec_for(settings.mqtt_protocol)
        self._connection: Connection | None = None
        self._paused = False
        self.connected = asyncio.Event()
        self.connected_since = 0.0  # time.monotonic() of the last subscription granted
        self.node: BrokerAddress | None = None  # the broker we are on, while connected
        self._last_node: BrokerAddress | None = None
        self.last_error: str | None = None  # why the last connection or attempt ended
        self.stopping = False
        if gate is not None:
            gate.follow(self)

    def _connect_packet(self, broker: BrokerAddress) -> bytes:
        s = self._settings
        return self.codec.connect(
            s.client_id,
            username=broker.username,
            password=broker.password,
            keep_alive=KEEP_ALIVE_S,
            session_expiry_s=s.session_expiry_s,
            receive_max=s.receive_maximum,
            clean=self._clean,
        )

    async def _open(self, broker: BrokerAddress) -> Connection:
        tls = self._settings.tls_context()  # checked at start-up: here it only loads again
        connection = Connection(
            self.codec, self._connect_packet(broker), self._deliver, self._clock
        )
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(TCP_CONNECT_TIMEOUT_S):
                await loop.create_connection(
                    lambda: connection,
                    broker.host,
                    broker.port,
                    ssl=tls,
                    server_hostname=broker.host if tls is not None else None,
                )
        except TimeoutError:
            raise LinkDown(f"no answer within {TCP_CONNECT_TIMEOUT_S:.0f} s") from None
        try:
            async with asyncio.timeout(CONNACK_TIMEOUT_S):
                connack = await connection.connack
        except TimeoutError:
            connection.disconnect()
            raise LinkDown("the broker did not answer CONNECT") from None
        if not connack.accepted:
            connection.disconnect()
            if connack.wrong_level:
                raise wrong_level(self.codec.level, f"its answer: {connack.reason}")
            raise LinkDown(f"the broker refused the connection: {connack.reason}")
        return connection

    async def run(self) -> None:
        """Connect, subscribe, pass messages on; when the connection ends, the next broker of
        the list at once, backing off only once every one has failed in a row."""
        backoff = Backoff()
        failed = 0  # attempts in a row that came to nothing, on any broker
        while not self.stopping:
            broker = self.brokers[self._index]
            connection: Connection | None = None
            began = 0.0
            try:
                connection = await self._open(broker)
                self._connected(connection, broker)
                began = time.monotonic()
                await self._subscribe(connection)
                self.connected_since = time.monotonic()
                await connection.closed
            except (LinkDown, OSError, TimeoutError) as exc:
                if self.stopping:
                    break
                error = _why(exc)
            else:
                if self.stopping:  # we left (DISCONNECT): nothing to report or retry
                    break
                error = "the connection ended"
            finally:
                self._disconnected(connection)
            if began and time.monotonic() - began >= STABLE_S:
                failed = 0  # a good connection was lost: fail over now, without waiting
                backoff.reset()
            failed += 1
            self._index = (self._index + 1) % len(self.brokers)
            wait = backoff.next_wait() if failed >= len(self.brokers) else 0.0
            self._report_loss(broker, error, wait, was_connected=began > 0)
            await asyncio.sleep(wait)

    def _connected(self, connection: Connection, broker: BrokerAddress) -> None:
        self._connection = connection
        if self._paused:
            connection.pause_reading()
        self.node = broker
        self.connected.set()
        self._metrics.mqtt_connected.set(1)
        if self._last_node is not None and self._last_node != broker:
            self._metrics.mqtt_failovers.inc()
            log.warning(
                "mqtt failed over to another broker",
                broker=broker.display,
                previous=self._last_node.display,
            )
        self._last_node = broker
        log.info(
            "mqtt connected",
            broker=broker.display,
            client_id=self._settings.client_id,
            protocol=self.codec.level,
            session_present=connection.session_present,
        )

    async def _subscribe(self, connection: Connection) -> None:
        """Subscribe to the bikes' topics; LinkDown naming each filter the broker refused."""
        if not self._subscribe_to:
            return
        refused = await connection.subscribe(self._subscribe_to)
        named = [f"{f} ({why})" for f, why in zip(self._subscribe_to, refused, strict=False) if why]
        if named:
            # Typically an ACL that does not let this user read the bike topics.
            raise LinkDown(f"subscription refused: {', '.join(named)}")

    def _report_loss(
        self, broker: BrokerAddress, error: str, wait: float, *, was_connected: bool
    ) -> None:
        """A connection that ended, or an attempt that failed, and what comes next."""
        self.last_error = error
        what = (
            "mqtt connection lost; reconnecting"
            if was_connected
            else "cannot connect to the MQTT broker; retrying"
        )
        nxt = self.brokers[self._index]
        log.warning(
            what,
            error=error,
            broker=broker.display,
            **({"next_broker": nxt.display} if len(self.brokers) > 1 else {}),
            retry_in_s=round(wait, 2),
        )

    def _disconnected(self, connection: Connection | None) -> None:
        if connection is not None:
            connection.open = False
            if not self.stopping:
                connection.disconnect()
        self._connection = None
        self.node = None
        self.connected.clear()
        self._metrics.mqtt_connected.set(0)

    def pause_reading(self) -> None:
        """Take nothing more from the broker for now (the daemon holds enough)."""
        self._paused = True
        if self._connection is not None:
            self._connection.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        if self._connection is not None:
            self._connection.resume_reading()

    async def disconnect(self) -> None:
        """Leave cleanly: the broker keeps the session and queues for us."""
        self.stopping = True
        connection = self._connection
        if connection is not None:
            connection.disconnect()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(connection.closed), 5)

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish with QoS 1 and wait for the broker's PUBACK; raises LinkDown when down."""
        connection = self._connection
        if connection is None:
            raise LinkDown("not connected")
        await connection.publish(topic, payload)
