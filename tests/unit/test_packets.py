"""The MQTT 3.1.1 packets of ours (daemon.mqtt.packets), byte for byte against the OASIS
standard's layouts, and read back whatever way the bytes are cut."""

from __future__ import annotations

import mqtt5
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.mqtt.packets import (
    DISCONNECT,
    PINGREQ,
    ConnAck,
    PingResp,
    PubAck,
    Publish,
    SubAck,
    Unexpected,
    V5Codec,
    V311Codec,
    puback,
)

codec = V311Codec()

topics = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"),
    min_size=1,
    max_size=300,
)


def read_all(data: bytes) -> list[object]:
    view, taken, packets = memoryview(data), 0, []
    while taken < len(data):
        packet, n = codec.read(view[taken:])
        packets.append(packet)
        taken += n
    return packets


def test_connect_is_the_standards_layout_with_clean_session_off():
    """§3.1: protocol name MQTT, level 4, flags (user name 0x80, password 0x40, clean
    session 0x02), keep-alive, then client id, user name, password, each length-prefixed."""
    packet = codec.connect("cf", username="u", password="pw", keep_alive=30,
                           session_expiry_s=60, receive_max=10)  # fmt: skip
    body = b"\x00\x04MQTT\x04\xc0\x00\x1e" + b"\x00\x02cf" + b"\x00\x01u" + b"\x00\x02pw"
    assert packet == bytes((0x10, len(body))) + body


def test_a_clean_connect_without_credentials_sets_only_clean_session():
    packet = codec.connect("p", username=None, password=None, keep_alive=0,
                           session_expiry_s=0, receive_max=1, clean=True)  # fmt: skip
    assert packet == b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01p"


def test_a_password_without_a_user_name_is_not_sent():
    """MQTT 3.1.1 §3.1.2.9: the password flag needs the user name flag."""
    packet = codec.connect("p", username=None, password="pw", keep_alive=0,
                           session_expiry_s=0, receive_max=1)  # fmt: skip
    assert packet[9] == 0 and not packet.endswith(b"pw")


def test_subscribe_asks_for_qos_1_per_filter():
    assert codec.subscribe(7, ["a/+", "b/#"]) == (
        b"\x82\x0e\x00\x07" + b"\x00\x03a/+\x01" + b"\x00\x03b/#\x01"
    )


@given(topic=topics, payload=st.binary(max_size=70_000), packet_id=st.integers(1, 65_535))
def test_a_publish_written_is_read_back_whole(topic, payload, packet_id):
    packet = codec.publish(topic, payload, packet_id)
    assert packet[0] == 0x32  # QoS 1, no DUP, no RETAIN
    (read,) = read_all(packet)
    assert isinstance(read, Publish)
    assert (read.topic, read.payload, read.packet_id, read.qos, read.duplicate) == (
        topic, payload, packet_id, 1, False
    )  # fmt: skip


@given(
    packets=st.lists(st.tuples(topics, st.binary(max_size=300)), min_size=1, max_size=5),
    cut=st.integers(0, 10_000),
)
def test_a_stream_cut_anywhere_is_incomplete_until_the_rest_arrives(packets, cut):
    data = b"".join(codec.publish(t, p, i + 1) for i, (t, p) in enumerate(packets))
    cut %= len(data)
    first = codec.publish(*packets[0], 1)
    if cut < len(first):
        with pytest.raises(IndexError):
            codec.read(memoryview(data[:cut]))
    assert [(p.topic, p.payload) for p in read_all(data)] == packets  # type: ignore[attr-defined]


def test_the_remaining_length_takes_up_to_four_bytes_at_the_standards_boundaries():
    """§2.2.3: 127 in one byte, 128 in two, 16,383 in two, 16,384 in three."""
    for size, header in [(127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
                         (16_384, b"\x80\x80\x01")]:  # fmt: skip
        packet = codec.publish("t", b"x" * (size - 5), 1)
        assert packet[1 : 1 + len(header)] == header
        (read,) = read_all(packet)
        assert read.payload == b"x" * (size - 5)  # type: ignore[attr-defined]


def test_a_remaining_length_of_five_bytes_is_malformed():
    with pytest.raises(ValueError, match="remaining length"):
        codec.read(memoryview(b"\x30\xff\xff\xff\xff\x01"))


def test_qos_0_publish_has_no_packet_id_and_dup_is_read():
    qos0 = b"\x30\x05\x00\x01tab"
    dup = b"\x3a\x07\x00\x01t\x00\x09ab"
    (zero, again) = read_all(qos0 + dup)
    assert (zero.qos, zero.packet_id, zero.payload) == (0, 0, b"ab")  # type: ignore[attr-defined]
    assert (again.qos, again.packet_id, again.duplicate) == (1, 9, True)  # type: ignore[attr-defined]


def test_control_packets_are_read_into_records():
    assert read_all(b"\x40\x02\x01\x02") == [PubAck(0x0102)]
    assert read_all(b"\x90\x04\x00\x07\x01\x80") == [SubAck(7, (None, "failure"))]
    assert read_all(b"\x20\x02\x01\x00") == [
        ConnAck(accepted=True, reason="accepted", session_present=True)
    ]
    assert read_all(b"\x20\x02\x00\x05") == [ConnAck(accepted=False, reason="not authorized")]
    assert read_all(b"\x20\x02\x00\x01")[0].wrong_level  # type: ignore[attr-defined]
    assert read_all(b"\xd0\x00") == [PingResp()]
    assert read_all(b"\x62\x02\x00\x01") == [Unexpected("PUBREL")]


def test_a_packet_no_broker_sends_is_malformed():
    with pytest.raises(ValueError, match=r"not an MQTT 3\.1\.1 packet"):
        codec.read(memoryview(b"\x10\x00"))  # CONNECT, from the broker


def test_puback_pingreq_and_disconnect_are_the_same_bytes_at_both_levels():
    """So the connection writes them the same way whatever the level."""
    assert puback(0x1234) == mqtt5.PubAckPacket(0x1234).write()
    assert mqtt5.PingReqPacket().write() == PINGREQ
    assert mqtt5.DisconnectPacket().write() == DISCONNECT
    assert puback(0x1234) == b"\x40\x02\x12\x34"


def test_the_v5_codec_reads_a_3_1_1_refusal_of_its_connect_as_one():
    """A 3.1.1 broker answers a v5 CONNECT with its own CONNACK (return code 1): the v5 reader
    cannot read it, and ``misread_connack`` tells what it is."""
    with pytest.raises(ValueError):  # noqa: PT011 - the mqtt5 codec's own message
        mqtt5.read(memoryview(b"\x20\x02\x00\x01"))
    refusal = V5Codec().misread_connack(b"\x20\x02\x00\x01")
    assert refusal is not None and refusal.wrong_level and not refusal.accepted
    assert V5Codec().misread_connack(b"\x20\x02\x00\x05") is None


@given(topic=topics, payload=st.binary(max_size=1000), packet_id=st.integers(1, 65_535))
def test_a_message_written_at_either_level_reads_back_the_same(topic, payload, packet_id):
    """The same message at the two levels: ours at 3.1.1, the mqtt5 codec's at v5."""
    v311 = codec.publish(topic, payload, packet_id)
    v5 = V5Codec().publish(topic, payload, packet_id)
    read5, _ = mqtt5.read(memoryview(v5))
    assert (read5.topic, read5.payload, read5.packet_id) == (topic, payload, packet_id)
    (read311,) = read_all(v311)
    assert (read311.topic, read311.payload, read311.packet_id) == (topic, payload, packet_id)  # type: ignore[attr-defined]
    assert len(v5) - len(v311) in (1, 2)  # v5's properties length (0), and a longer header
