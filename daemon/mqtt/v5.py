"""The daemon's MQTT v5 connection: an asyncio protocol of ours on the ``mqtt5`` codec.

Why not paho (through aiomqtt): reading and acknowledging a message cost paho about 26-35 µs
of CPU, a quarter of the daemon's; the ``mqtt5`` codec (the protocol written in Rust) parses a
PUBLISH in about a microsecond, and the few states the daemon needs are short to write down
(``python -m benchmarks.throughput --only paho311,paho5,aiomqtt,v5session``
measures the candidates side by side; README, "Measured").

What the daemon relies on, each tested against the repo's Mosquitto
(``tests/integration/test_v5_link.py``):

- a persistent session: CleanStart=0, a Session Expiry Interval, a fixed client id;
- Receive Maximum asked for, and the read pause (``pause_reading``) that bounds what the daemon
  holds whatever the broker sends;
- PUBACKs only when the pipeline says so, written in the order it says so (it acks in arrival
  order, MQTT-4.6.0-2), coalesced into one write per turn of the event loop;
- the acks of a lost connection are never written on the next one (the broker redelivers what
  was not acknowledged, with DUP set, and the pipeline settles redeliveries as duplicates);
- keep-alive: PINGREQ when nothing was written for half the interval; a broker that answers
  nothing for a whole interval while we read is taken as gone;
- QoS 1 publishing for the outbox, within the broker's Receive Maximum;
- CONNACK and SUBACK refusals reported with the broker's reason; reconnect with capped backoff
  and jitter; DISCONNECT on the way out so the broker keeps the session and no Will fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import mqtt5

from daemon.backoff import Backoff
from daemon.config import Settings
from daemon.metrics import Metrics
from daemon.mqtt.delivery import Delivery, LinkDown, ReadGate, log_connected, log_lost
from daemon.mqtt.topics import topics_for

__all__ = ["V5Link", "V5Session"]

CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 30
_PINGREQ = mqtt5.PingReqPacket().write()
_DISCONNECT = mqtt5.DisconnectPacket().write()


class V5Session(asyncio.Protocol):
    """One MQTT v5 connection, from CONNECT to its loss. Hands each PUBLISH to ``deliver``."""

    def __init__(
        self,
        connect: mqtt5.ConnectPacket,
        deliver: Callable[[Delivery], None],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._connect = connect
        self._deliver = deliver
        self._clock = clock
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out = bytearray()  # acks waiting for the end of this turn of the loop
        self._flush_scheduled = False
        self.connack: asyncio.Future[mqtt5.ConnAckPacket] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        # How it closed is logged by the link, which may have stopped waiting by then.
        self.closed.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiting: dict[int, asyncio.Future[object]] = {}  # our packet id -> its answer
        self._next_id = 0
        self._window = asyncio.Semaphore(1)  # resized from CONNACK's Receive Maximum
        self.keep_alive = connect.keep_alive
        self._last_write = self._last_read = time.monotonic()
        self._ping_sent: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.open = True
        self.sent = 0
        self.skipped = 0
        self.received = 0
        self.disconnect_reason: str | None = None
        self._leaving = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._write(self._connect.write())
        if self.keep_alive:
            self._timer = self._loop.call_later(self.keep_alive / 2, self._tick)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        taken = 0
        received_at = self._clock()  # one read, one instant: what it held arrived together
        read = mqtt5.read
        try:
            with memoryview(buffer) as view:
                size = len(view)
                while taken < size:
                    try:
                        packet, n = read(view[taken:])
                    except IndexError:  # the rest of a packet is still on its way
                        break
                    taken += n
                    if type(packet) is mqtt5.PublishPacket:
                        self._publish_received(packet, received_at)
                    else:
                        self._control(packet)
        except ValueError as exc:  # not MQTT v5: nothing more on this connection makes sense
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
        futures: list[asyncio.Future[Any]] = [self.connack, *self._waiting.values()]
        for future in futures:
            if not future.done():
                future.set_exception(why)
        self._waiting.clear()
        if not self.closed.done():
            if self._leaving:
                self.closed.set_result(None)
            else:
                self.closed.set_exception(why)

    def pause_writing(self) -> None:  # the outbox waits on PUBACKs; acks are small
        pass

    def resume_writing(self) -> None:
        pass

    # -- inbound ---------------------------------------------------------------------------

    def _publish_received(self, packet: mqtt5.PublishPacket, received_at: datetime) -> None:
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

    def _control(self, packet: object) -> None:
        if isinstance(packet, mqtt5.PubAckPacket | mqtt5.SubAckPacket):
            self._answer(packet.packet_id, packet)
        elif isinstance(packet, mqtt5.ConnAckPacket):
            if not self.connack.done():
                if packet.reason_code == mqtt5.ConnAckReasonCode.SUCCESS:
                    window = max(1, min(packet.receive_max, 100))
                    self._window = asyncio.Semaphore(window)
                    if packet.server_keep_alive is not None:
                        self.keep_alive = packet.server_keep_alive
                self.connack.set_result(packet)
        elif isinstance(packet, mqtt5.DisconnectPacket):
            why = packet.reason_code.name
            self.disconnect_reason = f"{why}: {packet.reason_str}" if packet.reason_str else why
        elif isinstance(packet, mqtt5.PingRespPacket):
            pass
        else:  # PUBREL and friends belong to QoS 2, which we never ask for
            self._fail(LinkDown(f"unexpected {type(packet).__name__} from the broker"))

    def _answer(self, packet_id: int, packet: object) -> None:
        future = self._waiting.pop(packet_id, None)
        if future is not None and not future.done():
            future.set_result(packet)

    # -- acknowledgements (Acks) -----------------------------------------------------------

    def ack(self, message: Delivery) -> bool:
        """Queue the PUBACK of a settled message; False when its connection is gone."""
        if message.qos == 0:
            return True
        if not self.open:
            self.skipped += 1
            return False
        mid = message.mid
        self._out += bytes((0x40, 2, mid >> 8, mid & 0xFF))
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

    async def subscribe(self, filters: list[mqtt5.TopicFilter]) -> list[mqtt5.SubAckReasonCode]:
        suback = await self._request(lambda pid: mqtt5.SubscribePacket(pid, filters).write())
        assert isinstance(suback, mqtt5.SubAckPacket)
        return suback.reason_codes

    async def publish(self, topic: str, payload: bytes) -> None:
        """QoS 1; returns on the broker's PUBACK, raises LinkDown when it does not come."""
        async with self._window:
            puback = await self._request(
                lambda pid: mqtt5.PublishPacket(
                    topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=pid
                ).write()
            )
        assert isinstance(puback, mqtt5.PubAckPacket)
        if int(puback.reason_code) >= 0x80:
            raise LinkDown(f"the broker refused to publish on {topic}: {puback.reason_code.name}")

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
            raise LinkDown("the broker did not answer within 10 s") from None
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
            self._write(_PINGREQ)
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
            transport.write(_DISCONNECT)
            self._loop.call_later(CONNECT_TIMEOUT_S / 5, self._close_now)

    def _close_now(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def _why(exc: BaseException) -> str:
    """An operator's reading of why the connection failed ("Connection refused", not errno)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class V5Link:
    """Keeps one MQTT v5 connection up; hands inbound messages to ``deliver``; publishes for the
    outbox. The same surface as the MQTT 3.1.1 link (``daemon.mqtt.connection``)."""

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
        self._session: V5Session | None = None
        self._paused = False
        self.connected = asyncio.Event()
        self.connected_since = 0.0  # time.monotonic() of the last subscription granted
        self.stopping = False
        if gate is not None:
            gate.follow(self)

    def _connect_packet(self) -> mqtt5.ConnectPacket:
        s = self._settings
        broker = s.broker
        return mqtt5.ConnectPacket(
            s.client_id,
            username=broker.username,
            password=broker.password.encode() if broker.password is not None else None,
            clean_start=False,
            keep_alive=KEEP_ALIVE_S,
            session_expiry_interval=s.session_expiry_s,
            receive_max=s.receive_maximum,
        )

    def _filters(self) -> list[mqtt5.TopicFilter]:
        filters = topics_for(self._settings.topic_prefix).filters(self._settings.share_group)
        # No Local: the daemon never hears what it publishes itself.
        return [
            mqtt5.TopicFilter(f, max_qos=mqtt5.QoS.AT_LEAST_ONCE, no_local=True) for f in filters
        ]

    async def _open(self) -> V5Session:
        s = self._settings
        broker = s.broker
        tls = s.tls_context()  # checked at start-up: here it only loads again
        session = V5Session(self._connect_packet(), self._deliver, self._clock)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await loop.create_connection(
                lambda: session,
                broker.host,
                broker.port,
                ssl=tls,
                server_hostname=broker.host if tls is not None else None,
            )
            try:
                connack = await session.connack
            except TimeoutError:
                raise LinkDown("the broker did not answer CONNECT") from None
        if connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            session.disconnect()
            reason = connack.reason_code.name
            raise LinkDown(
                f"the broker refused the connection: {reason}"
                + (f" ({connack.reason_str})" if connack.reason_str else "")
            )
        return session

    async def run(self) -> None:
        """Connect, subscribe, pass messages on; when the connection ends, back off and retry."""
        backoff = Backoff()
        while not self.stopping:
            wait: float | None = None
            session: V5Session | None = None
            try:
                session = await self._open()
                self._connected(session)
                backoff.reset()
                await self._subscribe(session)
                self.connected_since = time.monotonic()
                await session.closed
            except (LinkDown, OSError, TimeoutError) as exc:
                if self.stopping:
                    break
                wait = backoff.next_wait()
                self._report_loss(session, exc, wait)
            finally:
                self._disconnected(session)
            await asyncio.sleep(backoff.next_wait() if wait is None else wait)

    def _connected(self, session: V5Session) -> None:
        self._session = session
        if self._paused:
            session.pause_reading()
        self.connected.set()
        self._metrics.mqtt_connected.set(1)
        log_connected(self._settings.broker.display, self._settings.client_id)

    async def _subscribe(self, session: V5Session) -> None:
        """Subscribe to the bikes' topics; LinkDown naming each filter the broker refused."""
        filters = self._filters()
        codes = await session.subscribe(filters)
        refused = [
            f"{f.pattern} ({code.name})"
            for f, code in zip(filters, codes, strict=False)
            if int(code) >= 0x80
        ]
        if refused:
            # Typically an ACL that does not let this user read the bike topics.
            raise LinkDown(f"subscription refused: {', '.join(refused)}")

    def _report_loss(self, session: V5Session | None, exc: BaseException, wait: float) -> None:
        was_connected = session is not None and (bool(session.sent) or self.connected.is_set())
        log_lost(
            self._settings.broker.display, was_connected=was_connected, error=_why(exc), wait=wait
        )

    def _disconnected(self, session: V5Session | None) -> None:
        if session is not None:
            session.open = False
            if not self.stopping:
                session.disconnect()
        self._session = None
        self.connected.clear()
        self._metrics.mqtt_connected.set(0)

    def pause_reading(self) -> None:
        """Take nothing more from the broker for now (the daemon holds enough)."""
        self._paused = True
        if self._session is not None:
            self._session.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        if self._session is not None:
            self._session.resume_reading()

    async def disconnect(self) -> None:
        """Leave cleanly: the broker keeps the session and queues for us."""
        self.stopping = True
        session = self._session
        if session is not None:
            session.disconnect()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(session.closed), 5)

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish with QoS 1 and wait for the broker's PUBACK; raises LinkDown when down."""
        session = self._session
        if session is None:
            raise LinkDown("not connected")
        await session.publish(topic, payload)
