"""Whatever the edge accepts, PostgreSQL stores and the domain sums exactly (issue: hostile input).

For arbitrary JSON-like values in every field of every payload kind, ``decode`` never raises;
every message, accepted or rejected, commits on a real PostgreSQL (nothing is dropped); and the
running totals the domain keeps equal the SQL sums of the samples stored.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.db.store import Store
from daemon.mqtt.schemas import Inbound, decode
from daemon.service.arrival import Arrival
from daemon.service.ingestion import Ingestion
from daemon.simulate import json_payload
from domain.commands import RecordTelemetry
from domain.events import Outcome
from domain.session_values import SessionPolicy
from tests.conftest import shipped_pricing

pytestmark = pytest.mark.integration

PREFIX = "chargeflow/v1"
NOW = datetime.now(UTC)
T0 = NOW - timedelta(hours=1)

_text = st.text(max_size=20) | st.sampled_from(["a\x00b", "\ud800", "x" * 200, ""])
_numbers = (
    st.integers(min_value=-(2**80), max_value=2**80)
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.decimals(min_value=0, max_value=10**9, places=6)
    | st.floats(allow_nan=False, allow_infinity=False)
)
_anything = st.recursive(
    st.none() | st.booleans() | _numbers | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
_instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.timezones()
).map(lambda t: t.isoformat())


def _field(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes anything at all."""
    return st.one_of(good, good, good, _anything)


@st.composite
def _session_messages(draw: st.DrawFn) -> list[tuple[str, dict[str, Any]]]:
    sid = str(uuid.uuid4())
    at = st.integers(0, 3_000).map(lambda s: (T0 + timedelta(seconds=s)).isoformat())
    start = {
        "event": draw(_field(st.sampled_from(["ride_started", "charging_started"]))),
        "session_id": sid,
        "rider_id": draw(_field(st.text(min_size=1, max_size=8))),
        "station_id": draw(_field(st.text(min_size=1, max_size=8))),
        "occurred_at": draw(_field(st.just(T0.isoformat()) | _instants)),
    }
    messages = [("lifecycle", start)]
    count = draw(st.integers(1, 6))
    for seq in range(1, count + 1):
        sample = {
            "telemetry_id": draw(_field(st.uuids().map(str))),
            "session_id": sid,
            "seq": draw(_field(st.just(seq) | st.integers(-1, 2**40))),
            "emitted_at": draw(_field(at | _instants)),
            "energy_wh": draw(_field(_numbers)),
        }
        if draw(st.booleans()):
            sample["distance_m"] = draw(_field(_numbers))
        if draw(st.booleans()):
            sample["soc_pct"] = draw(_field(_numbers))
        messages.append(("telemetry", sample))
    if draw(st.booleans()):
        end = {
            "event": draw(_field(st.sampled_from(["ride_ended", "charging_ended"]))),
            "session_id": sid,
            "occurred_at": draw(_field(st.just((T0 + timedelta(hours=1)).isoformat()))),
            "last_seq": draw(_field(st.just(count) | st.integers(-1, 2**70))),
        }
        messages.append(("lifecycle", end))
    return messages


async def _commit_and_check(database_url: str, bike: str, arrivals: list[Arrival]) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    assert pool is not None
    try:
        pricing = shipped_pricing()
        policy = SessionPolicy(pricing_version=pricing.version, finalize_grace=timedelta(hours=9))
        ingestion = Ingestion(Store(pool), policy, pricing, prefix=PREFIX, max_payload_bytes=16_384)
        settled, _ = await ingestion.commit_batch(arrivals)
        assert [s.dropped for s in settled if s.dropped] == []
        rejected = {(a.topic, a.payload) for a, s in zip(arrivals, settled, strict=True)
                    if s.rejection is not None}  # fmt: skip
        kept = await pool.fetchval(
            "SELECT count(*) FROM rejected_messages WHERE topic LIKE $1", f"%/bikes/{bike}/%"
        )
        assert kept == len(rejected)
        accepted = [
            a.inbound.command.sample
            for a, s in zip(arrivals, settled, strict=True)
            if s.outcome is Outcome.ACCEPTED and isinstance(a.inbound.command, RecordTelemetry)
        ]
        rows = await pool.fetch(
            "SELECT s.energy_wh, s.distance_m, s.telemetry_count,"
            " (SELECT coalesce(sum(t.energy_wh), 0) FROM telemetry t"
            "  WHERE t.session_id = s.session_id) AS sql_energy,"
            " (SELECT coalesce(sum(t.distance_m), 0) FROM telemetry t"
            "  WHERE t.session_id = s.session_id) AS sql_distance"
            " FROM sessions s WHERE s.bike_id = $1",
            bike,
        )
        for row in rows:
            assert row["energy_wh"] == row["sql_energy"]
            assert row["distance_m"] == row["sql_distance"]
        stored = sum((s.energy.wh for s in accepted), Decimal(0))
        assert sum((r["sql_energy"] for r in rows), Decimal(0)) == stored
    finally:
        await pool.close()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(messages=_session_messages())
def test_anything_the_edge_accepts_is_stored_and_summed_exactly_and_nothing_is_dropped(
    database_url, messages
):
    bike = f"edge-{uuid.uuid4().hex[:10]}"
    arrivals = []
    for suffix, document in messages:
        topic = f"{PREFIX}/bikes/{bike}/{suffix}"
        payload = json_payload(document)
        inbound = decode(topic, payload, PREFIX, 16_384)  # never raises
        assert isinstance(inbound, Inbound)
        assert (inbound.command is None) != (inbound.rejection is None)
        arrivals.append(Arrival(topic, payload, NOW, inbound))
    asyncio.run(_commit_and_check(database_url, bike, arrivals))
