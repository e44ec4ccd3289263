"""The topic layout of SPEC §2, in one place: ``{prefix}/bikes/{bike_id}/{suffix}``.

``Topics`` is a value object for one prefix: it validates itself (as aiomqtt's ``Topic`` does),
builds every topic the daemon publishes and subscribes to, and reads inbound topics back into
their kind and bike id. Nothing else in the code writes a topic out by hand.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import NamedTuple

from daemon.topic_names import LEVEL, check_prefix
from domain.commands import BIKE_ID_PATTERN, BIKE_ID_RULE

__all__ = ["OutboundKind", "ParsedTopic", "TopicKind", "Topics", "topics_for"]

_TOPIC_MAX_BYTES = 65_535


class TopicKind(StrEnum):
    """What an inbound topic carries; UNKNOWN for anything outside the layout."""

    LIFECYCLE = "lifecycle"
    TELEMETRY = "telemetry"
    UNKNOWN = "unknown"


class OutboundKind(StrEnum):
    """What the daemon publishes, per bike."""

    FINALIZED = "sessions/finalized"
    BILLING = "billing"
    REJECTIONS = "rejections"

    @property
    def event(self) -> str:
        """What an outbox row of this kind is called, there and in
        ``chargeflow_outbox_published_total{event=...}``."""
        return _OUTBOX_EVENTS[self]


_OUTBOX_EVENTS = {
    OutboundKind.FINALIZED: "session_finalized",
    OutboundKind.BILLING: "billing",
    OutboundKind.REJECTIONS: "rejection",
}


class ParsedTopic(NamedTuple):
    """An inbound topic read back: its kind, the bike it names (when it names one) and, for a
    topic outside the layout, what is wrong with it. A named tuple, immutable and built for
    every message of a fleet larger than the topic cache: a frozen dataclass took 4 times
    as long to build."""

    kind: TopicKind
    bike_id: str | None
    problem: str | None = None
    # One of the topics the daemon publishes (a bike's billing or rejections), heard through
    # the one-filter subscription (CHARGEFLOW_SUBSCRIPTION=one): not an inbound message.
    outbound: bool = False


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics of one deployment, under ``prefix`` (e.g. ``chargeflow/v1``)."""

    prefix: str

    def __post_init__(self) -> None:
        check_prefix(self.prefix)

    @property
    def _bikes(self) -> str:
        return _bikes_of(self.prefix)

    def bike(self, bike_id: str, suffix: TopicKind | OutboundKind) -> str:
        """The topic of one bike's inbound or outbound messages.

        Any single topic level is taken, so that a message on a topic with a bike id outside
        the pattern can still be answered on that same (mistaken) bike's rejections topic."""
        if not LEVEL.fullmatch(bike_id):
            raise ValueError(f"bike id {bike_id!r} is not one topic level")
        if suffix is TopicKind.UNKNOWN:
            raise ValueError("no topic carries unknown messages")
        return f"{self._bikes}{bike_id}/{suffix}"

    def filters(self, share_group: str | None = None, one: bool = False) -> list[str]:
        """The daemon's inbound subscriptions; with a share group, MQTT v5 shared ones.

        One filter per inbound kind, or with ``one`` a single filter for both, for brokers that
        keep a queue per subscription (NATS: a JetStream consumer each), where a backlog's
        lifecycle messages would otherwise come far ahead of its telemetry. That filter also
        matches two outbound kinds (billing, rejections): ``parse`` says so (``outbound``)."""
        if share_group is not None and not LEVEL.fullmatch(share_group):
            raise ValueError(f"share group {share_group!r} must be one topic level")
        share = f"$share/{share_group}/" if share_group else ""
        if one:
            return [f"{share}{self._bikes}+/+"]
        return [
            f"{share}{self._bikes}+/{kind}" for kind in (TopicKind.LIFECYCLE, TopicKind.TELEMETRY)
        ]

    def parse(self, topic: str) -> ParsedTopic:
        """Read an inbound topic; one outside the layout is UNKNOWN with the problem named."""
        # The usual topic in one match (0.7 us); anything else is read step by step, to name
        # what is wrong. No cache: a fleet's topics come round once per reporting interval, so
        # a bounded cache only hits in a fleet smaller than it, and at 100,000 bikes one of
        # 16,384 topics held 6 MiB and cost more on every miss than this match.
        usual = _usual_of(self.prefix)(topic)
        if usual is not None:
            return ParsedTopic(_INBOUND_KINDS[usual[2]], usual[1])
        return _parse(self._bikes, topic)

    def kind_of(self, topic: str) -> TopicKind:
        """The kind of an inbound topic, for metric labels."""
        return self.parse(topic).kind


@lru_cache(maxsize=8)
def _bikes_of(prefix: str) -> str:
    return f"{prefix}/bikes/"


@lru_cache(maxsize=8)
def _usual_of(prefix: str) -> Callable[[str], re.Match[str] | None]:
    """The full match of a well-formed inbound topic under ``prefix``: (bike id, kind)."""
    kinds = f"{TopicKind.LIFECYCLE}|{TopicKind.TELEMETRY}"
    pattern = f"{re.escape(_bikes_of(prefix))}({BIKE_ID_RULE})/({kinds})"
    return re.compile(pattern).fullmatch


def _parse(head: str, topic: str) -> ParsedTopic:
    # No character takes more than 4 bytes: only a long topic needs counting.
    if len(topic) > _TOPIC_MAX_BYTES // 4 and (
        len(topic.encode("utf-8", "surrogatepass")) > _TOPIC_MAX_BYTES
    ):
        return ParsedTopic(TopicKind.UNKNOWN, None, "topic is longer than MQTT allows")
    if not topic.startswith(head):
        return ParsedTopic(TopicKind.UNKNOWN, None, f"topic is not under {head}")
    rest = topic[len(head) :].split("/")
    bike_id = rest[0] or None
    if len(rest) == 2 and rest[1] in _OUTBOUND_LAST_LEVELS:
        return ParsedTopic(TopicKind.UNKNOWN, bike_id, "an outbound topic", outbound=True)
    if len(rest) != 2 or rest[1] not in (TopicKind.LIFECYCLE, TopicKind.TELEMETRY):
        return ParsedTopic(
            TopicKind.UNKNOWN,
            bike_id,
            f"expected {head}{{bike_id}}/lifecycle or {head}{{bike_id}}/telemetry",
        )
    if bike_id is None or not BIKE_ID_PATTERN.fullmatch(bike_id):
        return ParsedTopic(
            TopicKind.UNKNOWN, bike_id, f"bike_id in the topic must match {BIKE_ID_RULE}"
        )
    return ParsedTopic(_INBOUND_KINDS[rest[1]], bike_id)


# The outbound kinds a one-level wildcard after the bike id matches (not sessions/finalized).
_OUTBOUND_LAST_LEVELS = frozenset(k.value for k in OutboundKind if "/" not in k.value)
_INBOUND_KINDS = {k.value: k for k in (TopicKind.LIFECYCLE, TopicKind.TELEMETRY)}


@lru_cache(maxsize=8)
def topics_for(prefix: str) -> Topics:
    """The (validated, shared) layout of a prefix."""
    return Topics(prefix)
