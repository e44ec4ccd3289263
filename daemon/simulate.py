"""`chargeflow simulate`: a fleet of bikes riding and charging over MQTT, with progress."""

from __future__ import annotations

import json
import random
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from daemon.config import Settings
from daemon.documents import utc_text
from daemon.mqtt.publisher import Published, Publisher
from daemon.mqtt.topics import TopicKind, topics_for

__all__ = ["FleetPlan", "PublishRefused", "json_payload", "messages", "publish"]

_NUMBER = re.compile(r'"@@decimal:([-+0-9.eE]+)@@"')


def json_payload(document: object) -> bytes:
    """JSON bytes in which every Decimal is written as an exact JSON number (not a string)."""

    def number(value: object) -> str:
        if isinstance(value, Decimal) and value.is_finite():
            return f"@@decimal:{value}@@"
        raise TypeError(f"{type(value).__name__} is not JSON")

    return _NUMBER.sub(r"\1", json.dumps(document, default=number)).encode()


@dataclass(frozen=True, slots=True)
class FleetPlan:
    bikes: int = 10
    sessions_per_bike: int = 2
    samples_per_session: int = 20
    prefix: str = "chargeflow/v1"
    seed: int | None = None

    @property
    def total(self) -> int:
        """How many messages the plan publishes: each session's start, samples and end."""
        return self.bikes * self.sessions_per_bike * (self.samples_per_session + 2)


def messages(plan: FleetPlan, start: datetime) -> Iterator[tuple[str, dict[str, object]]]:
    """(topic, payload) of every message: bikes interleaved, each bike's messages in order."""
    rng = random.Random(plan.seed)
    run = uuid.UUID(int=rng.getrandbits(128)).hex[:6]
    streams = []
    for b in range(plan.bikes):
        bike = f"sim-{run}-{b:05d}"
        streams.append(_bike(plan, rng, bike, start))
    while streams:
        for stream in list(streams):
            try:
                yield next(stream)
            except StopIteration:
                streams.remove(stream)


def _bike(
    plan: FleetPlan, rng: random.Random, bike: str, start: datetime
) -> Iterator[tuple[str, dict[str, object]]]:
    topics = topics_for(plan.prefix)
    at = start
    for n in range(plan.sessions_per_bike):
        ride = n % 2 == 0
        sid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        kind = "ride" if ride else "charging"
        party = (
            {"rider_id": f"rider-{rng.randint(1, 999)}"}
            if ride
            else {"station_id": f"station-{rng.randint(1, 99)}"}
        )
        yield (
            topics.bike(bike, TopicKind.LIFECYCLE),
            {"event": f"{kind}_started", "session_id": sid, "occurred_at": utc_text(at), **party},
        )
        for seq in range(1, plan.samples_per_session + 1):
            at += timedelta(milliseconds=100)
            sample: dict[str, object] = {
                "telemetry_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "session_id": sid,
                "seq": seq,
                "emitted_at": utc_text(at),
                "energy_wh": Decimal(rng.randint(50, 5000)) / 100,
                "soc_pct": rng.randint(5, 100),
            }
            if ride:
                sample["distance_m"] = Decimal(rng.randint(0, 2000)) / 10
            yield topics.bike(bike, TopicKind.TELEMETRY), sample
        at += timedelta(milliseconds=100)
        yield (
            topics.bike(bike, TopicKind.LIFECYCLE),
            {
                "event": f"{kind}_ended",
                "session_id": sid,
                "occurred_at": utc_text(at),
                "last_seq": plan.samples_per_session,
            },
        )
        at += timedelta(milliseconds=100)


class PublishRefused(Exception):
    """The broker refused messages (MQTT v5 PUBACK 0x80 or more); the message says how many."""


async def publish(
    settings: Settings,
    plan: FleetPlan,
    rate: float = 0.0,
    progress: Callable[[int], None] | None = None,
    summary: bool = True,
) -> Published:
    """Publish the plan's messages with QoS 1 on ``settings``' brokers (rate 0: as fast as the
    broker takes them), through a broker's restart or a cluster node's loss; ``progress`` hears
    how many are settled, and a summary line goes to stderr at the end. Raises
    ``PublishRefused`` when the broker refused any (after publishing the rest)."""
    start = datetime.now(UTC) - timedelta(
        seconds=plan.sessions_per_bike * (plan.samples_per_session + 2) * 0.1 + 60
    )
    began = time.perf_counter()

    def pace(handed: int) -> float:
        return handed / rate - (time.perf_counter() - began) if rate > 0 else 0.0

    stream = ((topic, json_payload(payload)) for topic, payload in messages(plan, start))
    async with Publisher(settings).connected() as publisher:
        report = await publisher.publish_all(stream, pace, progress)
    if summary:
        elapsed = time.perf_counter() - began
        print(
            f"\r{report.sent}/{plan.total} messages in {elapsed:.1f} s "
            f"({report.sent / elapsed:,.0f} msg/s) through {', '.join(report.nodes)}",
            file=sys.stderr,
        )
    if report.refused:
        raise PublishRefused(
            f"the broker refused {report.refused} of {plan.total} messages "
            f"({report.first_refusal}): may this login write the bikes' topics? "
            "(a bike's login writes only its own; CHARGEFLOW_SIMULATOR_MQTT_URL names a fleet "
            "login)"
        )
    return report
