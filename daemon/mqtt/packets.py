"""The packets of the daemon's broker connection, at either protocol level: MQTT v5 on the
``mqtt5`` codec (the protocol in Rust), MQTT 3.1.1 written here.

The connection (``daemon.mqtt.connection``) is the same code for both levels; what differs is
how a few packets look on the wire, and that is all a ``Codec`` says. MQTT 3.1.1 needs few
packets and they are short (OASIS MQTT 3.1.1, §2 and §3): CONNECT/CONNACK, PUBLISH and PUBACK
(QoS 0 and 1), SUBSCRIBE/SUBACK, PINGREQ/PINGRESP, DISCONNECT. Its PUBLISH reader is the hot
path: a fixed header, a two-byte topic length, the topic, the packet id, the payload (about
a microsecond in CPython; ``python -m benchmarks.codecs`` measures it beside the ``mqtt5``
codec and paho). Three of the packets the daemon writes are byte for byte the same at both
levels (PUBACK with success, PINGREQ, DISCONNECT with normal disconnection).

Control packets are read into the small records below (``ConnAck``, ``SubAck``, ``PubAck``,
``Disconnect``, ``PingResp``) whichever level they came in; an inbound PUBLISH is the codec's
own ``publish_type``, read by the connection through the attributes both types share
(``topic``, ``payload``, ``packet_id``, ``qos``, ``duplicate``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import mqtt5

__all__ = [
    "DISCONNECT",
    "PINGREQ",
    "Codec",
    "ConnAck",
    "Disconnect",
    "PingResp",
    "ProtocolLevel",
    "PubAck",
    "Publish",
    "SubAck",
    "Unexpected",
    "V5Codec",
    "V311Codec",
    "codec_for",
    "puback",
]

ProtocolLevel = Literal["5", "3.1.1"]

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"  # v5: reason 0x00 (normal) may be left out, so both levels agree


def puback(packet_id: int) -> bytes:
    """A PUBACK (v5: reason 0x00, success, which may be left out; so both levels agree)."""
    return bytes((0x40, 2, packet_id >> 8, packet_id & 0xFF))


@dataclass(frozen=True, slots=True)
class ConnAck:
    """The broker's answer to CONNECT."""

    accepted: bool
    reason: str  # what the broker said, in its protocol's words
    session_present: bool = False
    receive_max: int | None = None  # v5: how many QoS 1 PUBLISHes it takes unacknowledged
    server_keep_alive: int | None = None  # v5: the keep-alive the broker imposes
    wrong_level: bool = False  # refused because it does not speak this protocol level


@dataclass(frozen=True, slots=True)
class SubAck:
    packet_id: int
    refused: tuple[str | None, ...]  # per filter: None if granted, else why


@dataclass(frozen=True, slots=True)
class PubAck:
    packet_id: int
    refused: str | None = None  # v5: why the broker refused the message


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason: str


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


@dataclass(frozen=True, slots=True)
class Unexpected:
    """A packet the daemon never asks for (QoS 2's PUBREC and friends, AUTH)."""

    name: str


Control = ConnAck | SubAck | PubAck | Disconnect | PingResp | Unexpected


class Codec(Protocol):
    """How one protocol level writes and reads the packets the connection uses."""

    @property
    def level(self) -> ProtocolLevel: ...

    @property
    def publish_type(self) -> type:
        """The class of the inbound PUBLISH packets ``read`` returns."""
        ...

    def read(self, data: memoryview) -> tuple[object, int]:
        """The packet at the start of ``data`` and its length; IndexError while incomplete,
        ValueError when it is not a packet of this level."""
        ...

    def control(self, packet: object) -> Control:
        """A packet ``read`` returned that is not a PUBLISH, as one of the records above."""
        ...

    def connect(  # noqa: PLR0913 - the fields of CONNECT
        self,
        client_id: str,
        *,
        username: str | None,
        password: str | None,
        keep_alive: int,
        session_expiry_s: int,
        receive_max: int,
        clean: bool = False,
    ) -> bytes:
        """CONNECT: a persistent session (the daemon's), or with ``clean`` a session that
        ends with the connection (a publisher's)."""
        ...

    def subscribe(self, packet_id: int, filters: Sequence[str]) -> bytes: ...

    def publish(self, topic: str, payload: bytes, packet_id: int) -> bytes: ...

    def misread_connack(self, data: bytes) -> ConnAck | None:
        """What a first answer this level cannot read says, if it is another level's refusal of
        this one (a 3.1.1 broker answers a v5 CONNECT with its own CONNACK, return code 1)."""
        ...


# -- MQTT v5, on the mqtt5 codec --------------------------------------------------------------


def _v5_puback(packet: Any) -> Control:
    refused = packet.reason_code
    return PubAck(packet.packet_id, None if int(refused) < 0x80 else refused.name)


def _v5_suback(packet: Any) -> Control:
    codes = tuple(None if int(c) < 0x80 else c.name for c in packet.reason_codes)
    return SubAck(packet.packet_id, codes)


def _v5_connack(packet: Any) -> Control:
    code = packet.reason_code
    reason = code.name + (f" ({packet.reason_str})" if packet.reason_str else "")
    return ConnAck(
        accepted=code == mqtt5.ConnAckReasonCode.SUCCESS,
        reason=reason,
        session_present=packet.session_present,
        receive_max=packet.receive_max,
        server_keep_alive=packet.server_keep_alive,
        wrong_level=code == mqtt5.ConnAckReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    )


def _v5_disconnect(packet: Any) -> Control:
    why = packet.reason_code.name
    return Disconnect(f"{why}: {packet.reason_str}" if packet.reason_str else why)


# What each control packet of MQTT 5 the broker sends means to the connection.
_V5_CONTROL: dict[type, Callable[[Any], Control]] = {
    mqtt5.PubAckPacket: _v5_puback,
    mqtt5.SubAckPacket: _v5_suback,
    mqtt5.ConnAckPacket: _v5_connack,
    mqtt5.DisconnectPacket: _v5_disconnect,
    mqtt5.PingRespPacket: lambda _packet: PingResp(),
}


class V5Codec:
    """MQTT v5 through the ``mqtt5`` codec; control packets read into our records."""

    level: ProtocolLevel = "5"
    publish_type = mqtt5.PublishPacket

    read = staticmethod(mqtt5.read)  # the Rust reader itself: no Python frame per packet

    def control(self, packet: object) -> Control:
        read = _V5_CONTROL.get(type(packet))
        return read(packet) if read is not None else Unexpected(type(packet).__name__)

    def connect(  # noqa: PLR0913 - the fields of CONNECT
        self,
        client_id: str,
        *,
        username: str | None,
        password: str | None,
        keep_alive: int,
        session_expiry_s: int,
        receive_max: int,
        clean: bool = False,
    ) -> bytes:
        return mqtt5.ConnectPacket(
            client_id,
            username=username,
            password=password.encode() if password is not None else None,
            clean_start=clean,
            keep_alive=keep_alive,
            session_expiry_interval=0 if clean else session_expiry_s,
            receive_max=receive_max,
        ).write()

    def subscribe(self, packet_id: int, filters: Sequence[str]) -> bytes:
        # No Local: the daemon never hears what it publishes itself.
        qos = mqtt5.QoS.AT_LEAST_ONCE
        wanted = [mqtt5.TopicFilter(f, max_qos=qos, no_local=True) for f in filters]
        return mqtt5.SubscribePacket(packet_id, wanted).write()

    def publish(self, topic: str, payload: bytes, packet_id: int) -> bytes:
        return mqtt5.PublishPacket(
            topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=packet_id
        ).write()

    def misread_connack(self, data: bytes) -> ConnAck | None:
        # MQTT 3.1.1 §3.2: CONNACK is 0x20, length 2, flags, return code; 1 = "unacceptable
        # protocol version" (what NATS, RabbitMQ 3 and a Mosquitto limited to 3.1.1 answer).
        if len(data) >= 4 and data[0] == 0x20 and data[1] == 2 and data[3] == 1:
            return ConnAck(
                accepted=False,
                reason="unacceptable protocol version (an MQTT 3.1.1 CONNACK)",
                wrong_level=True,
            )
        return None


# -- MQTT 3.1.1, ours -------------------------------------------------------------------------


class Publish:
    """An inbound MQTT 3.1.1 PUBLISH (the attributes of ``mqtt5.PublishPacket`` it shares)."""

    __slots__ = ("duplicate", "packet_id", "payload", "qos", "topic")

    def __init__(self, topic: str, payload: bytes, packet_id: int, qos: int, duplicate: bool):
        self.topic = topic
        self.payload = payload
        self.packet_id = packet_id
        self.qos = qos
        self.duplicate = duplicate


_CONNACK_311 = {
    0: "accepted",
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


def _varint(n: int) -> bytes:
    """The Remaining Length of a fixed header (§2.2.3)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _text(s: str) -> bytes:
    """A UTF-8 string with its two-byte length (§1.5.3)."""
    raw = s.encode()
    if len(raw) > 0xFFFF:
        raise ValueError(f"{s[:40]!r}... is longer than MQTT allows (65,535 bytes)")
    return len(raw).to_bytes(2, "big") + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def _remaining_length(data: memoryview, size: int) -> tuple[int, int]:
    """Remaining Length of more than one byte: up to four, seven bits each, least
    significant first; the length and where the variable header starts."""
    length, shift, i = data[1] & 0x7F, 7, 2
    while True:
        if i >= size:
            raise IndexError("incomplete remaining length")
        digit = data[i]
        i += 1
        length |= (digit & 0x7F) << shift
        if not digit & 0x80:
            return length, i
        shift += 7
        if shift > 21:
            raise ValueError("malformed remaining length")


def _v311_puback(body: memoryview) -> Control | None:
    return PubAck((body[0] << 8) | body[1]) if len(body) == 2 else None


def _v311_suback(body: memoryview) -> Control | None:
    if len(body) < 3:
        return None
    granted = tuple(None if c < 0x80 else "failure" for c in body[2:])  # 0-2 QoS, 0x80 failure
    return SubAck((body[0] << 8) | body[1], granted)


def _v311_connack(body: memoryview) -> Control | None:
    if len(body) != 2:
        return None
    code = body[1]
    return ConnAck(
        accepted=code == 0,
        reason=_CONNACK_311.get(code, f"return code {code}"),
        session_present=bool(body[0] & 1),
        wrong_level=code == 1,
    )


# What each control packet of MQTT 3.1.1 the broker sends means to the connection (None: the
# packet is malformed), and those it has no business sending on our QoS 1 subscriptions.
_V311_CONTROL: dict[int, Callable[[memoryview], Control | None]] = {
    4: _v311_puback,
    9: _v311_suback,
    2: _v311_connack,
    13: lambda body: None if body else PingResp(),
}
_V311_UNEXPECTED = {5: "PUBREC", 6: "PUBREL", 7: "PUBCOMP", 11: "UNSUBACK", 14: "DISCONNECT"}


class V311Codec:
    """MQTT 3.1.1, written here: the packets the connection uses, nothing more."""

    level: ProtocolLevel = "3.1.1"
    publish_type = Publish

    def read(self, data: memoryview) -> tuple[object, int]:
        size = len(data)
        if size < 2:
            raise IndexError("incomplete fixed header")
        first = data[0]
        length, i = (data[1], 2) if data[1] < 0x80 else _remaining_length(data, size)
        end = i + length
        if end > size:
            raise IndexError("incomplete packet")
        kind = first >> 4
        if kind == 3:  # PUBLISH: the hot path
            topic_end = i + 2 + ((data[i] << 8) | data[i + 1])
            if topic_end > end:
                raise ValueError("PUBLISH topic runs past the packet")
            topic = str(data[i + 2 : topic_end], "utf-8")
            qos = (first >> 1) & 3
            if qos:
                packet_id = (data[topic_end] << 8) | data[topic_end + 1]
                topic_end += 2
            else:
                packet_id = 0
            return Publish(topic, bytes(data[topic_end:end]), packet_id, qos, bool(first & 8)), end
        return self._control(kind, first, data[i:end]), end

    def _control(self, kind: int, first: int, body: memoryview) -> Control:
        read = _V311_CONTROL.get(kind)
        packet = read(body) if read is not None else None
        if packet is not None:
            return packet
        if kind in _V311_UNEXPECTED:
            return Unexpected(_V311_UNEXPECTED[kind])
        raise ValueError(f"not an MQTT 3.1.1 packet a broker sends (type {kind}, {first:#04x})")

    def control(self, packet: object) -> Control:
        assert isinstance(packet, ConnAck | SubAck | PubAck | Disconnect | PingResp | Unexpected)
        return packet

    def connect(  # noqa: PLR0913 - the fields of CONNECT
        self,
        client_id: str,
        *,
        username: str | None,
        password: str | None,
        keep_alive: int,
        session_expiry_s: int,
        receive_max: int,
        clean: bool = False,
    ) -> bytes:
        # CleanSession=0: the broker keeps the session and queues while we are away, until its
        # own limit (3.1.1 has no Session Expiry Interval, no Receive Maximum: README, "MQTT
        # protocol level"). A password without a user name is not allowed in 3.1.1 (§3.1.2.9).
        del session_expiry_s, receive_max
        flags = 0x02 if clean else 0
        payload = _text(client_id)
        if username is not None:
            flags |= 0x80
            payload += _text(username)
            if password is not None:
                flags |= 0x40
                raw = password.encode()
                payload += len(raw).to_bytes(2, "big") + raw
        header = b"\x00\x04MQTT\x04" + bytes((flags,)) + keep_alive.to_bytes(2, "big")
        return _packet(0x10, header + payload)

    def subscribe(self, packet_id: int, filters: Sequence[str]) -> bytes:
        body = packet_id.to_bytes(2, "big") + b"".join(_text(f) + b"\x01" for f in filters)
        return _packet(0x82, body)

    def publish(self, topic: str, payload: bytes, packet_id: int) -> bytes:
        return _packet(0x32, _text(topic) + packet_id.to_bytes(2, "big") + payload)

    def misread_connack(self, data: bytes) -> ConnAck | None:
        return None  # a v5-only broker answers a 3.1.1 CONNECT in 3.1.1 (MQTT 5 §3.1.2.2)


def codec_for(level: ProtocolLevel) -> Codec:
    return V5Codec() if level == "5" else V311Codec()
