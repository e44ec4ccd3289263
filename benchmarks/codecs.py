"""Reading a PUBLISH: the candidates for the daemon's MQTT 3.1.1 path, side by side, in-process.

A buffer of 20,000 QoS 1 PUBLISH packets (a telemetry topic and a 211-byte sample, as the
daemon reads them) is read whole by each candidate; the figure is CPU time per packet, best of
five rounds (the machine is shared: the best round is the least disturbed one). Each candidate
returns topic, payload, packet id and QoS, what the daemon's connection needs of a PUBLISH.

- ``ours 3.1.1``: ``daemon.mqtt.packets.V311Codec.read`` (pure Python, the daemon's);
- ``mqtt5 v5``: ``mqtt5.read`` on the same message at v5 (Rust, the daemon's v5 path);
- ``amqtt 3.1.1`` (when installed: ``pip install amqtt``): its codec
  (``amqtt.mqtt.publish.PublishPacket.from_stream`` on its ``BufferReader``), asynchronous by
  design, one coroutine chain per packet;
- paho is not a codec one can call apart from its client; its cost reading and acknowledging
  a message is in the drains (``python -m benchmarks.throughput``: 21-45 µs of CPU a message).

    python -m benchmarks.codecs [--packets 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Callable

from daemon.mqtt.packets import V5Codec, V311Codec

TOPIC = "chargeflow/v1/bikes/bike-0001/telemetry"


def _payload() -> bytes:
    sample = {
        "telemetry_id": str(uuid.uuid4()),
        "session_id": str(uuid.uuid4()),
        "seq": 12,
        "emitted_at": "2026-12-06T12:00:00Z",
        "energy_wh": 1.5,
        "distance_m": 3.2,
        "soc_pct": 71,
    }
    return json.dumps(sample).encode()


def _read_all(read: Callable[[memoryview], tuple[object, int]], data: bytes) -> object:
    view, taken, last = memoryview(data), 0, None
    while taken < len(data):
        last, n = read(view[taken:])
        taken += n
    return last


def _amqtt(data: bytes, count: int) -> Callable[[], object] | None:
    try:
        from amqtt.adapters import BufferReader
        from amqtt.mqtt.packet import MQTTFixedHeader
        from amqtt.mqtt.publish import PublishPacket
    except ImportError:
        return None

    async def read() -> object:
        reader = BufferReader(data)
        last = None
        for _ in range(count):
            header = await MQTTFixedHeader.from_stream(reader)
            last = await PublishPacket.from_stream(reader, fixed_header=header)
        return last

    return lambda: asyncio.run(read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=20_000)
    args = parser.parse_args()
    payload, n = _payload(), args.packets
    v311, v5 = V311Codec(), V5Codec()
    data311 = b"".join(v311.publish(TOPIC, payload, i % 65_535 + 1) for i in range(n))
    data5 = b"".join(v5.publish(TOPIC, payload, i % 65_535 + 1) for i in range(n))
    candidates: dict[str, Callable[[], object] | None] = {
        "ours 3.1.1 (daemon.mqtt.packets)": lambda: _read_all(v311.read, data311),
        "mqtt5 v5 (the daemon's v5 path)": lambda: _read_all(v5.read, data5),
        "amqtt 3.1.1 codec": _amqtt(data311, n),
    }
    print(f"{n:,} QoS 1 PUBLISH packets of {len(payload)} payload bytes, read whole, best of 5")
    print(f"{'candidate':<36} {'µs/packet':>10}")
    for name, run in candidates.items():
        if run is None:
            print(f"{name:<36} {'(not installed)':>10}")
            continue
        best = float("inf")
        for _ in range(5):
            began = time.process_time()
            run()
            best = min(best, time.process_time() - began)
        print(f"{name:<36} {1e6 * best / n:>10.2f}")


if __name__ == "__main__":
    main()
