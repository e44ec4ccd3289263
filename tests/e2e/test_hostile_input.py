"""Hostile input over real Mosquitto and PostgreSQL: every bad message answered and kept.

A short run of the fuzz runner's generator (benchmarks/fuzz.py runs 100,000 of them and prints
rates and memory); here, what must hold for any input: nothing dropped, every rejection kept
with its raw payload, and a normal ride afterwards billed as ever.
"""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.fuzz import bad_messages
from tests.e2e.helpers import wait_until
from tests.peers import mqtt_client

pytestmark = pytest.mark.e2e

COUNT = 1_500


def _total(counter) -> float:
    return sum(sample.value for metric in counter.collect() for sample in metric.samples
               if sample.name.endswith("_total"))  # fmt: skip


async def test_a_stream_of_bad_messages_is_answered_and_kept_and_nothing_is_dropped(
    daemon, broker, pool, bike, outbound
):
    m = daemon.metrics
    before = {c: _total(c) for c in (m.rejected, m.accepted, m.deferred, m.duplicates)}
    kept_before = await pool.fetchval("SELECT count(*) FROM rejected_messages")
    async with mqtt_client(broker.fleet_url) as fuzzer:
        sent = list(bad_messages(COUNT, seed=11))
        for i in range(0, len(sent), 100):
            await asyncio.gather(*(fuzzer.publish(t, p, qos=1) for t, p, _ in sent[i : i + 100]))

    def rejected_after_waiting() -> float:
        return sum(
            sample.value
            for metric in m.waiting_settled.collect()
            for sample in metric.samples
            if sample.name.endswith("_total") and sample.labels["outcome"] != "applied"
        )

    later_before = rejected_after_waiting()

    def settled() -> float:
        # A message that waited and was then rejected counts once, when it was deferred.
        now = sum(_total(c) - before[c] for c in before)
        return now - (rejected_after_waiting() - later_before)

    await wait_until(lambda: settled() >= COUNT, timeout=60, what="every bad message settled")

    async def all_kept() -> bool:
        # Messages that waited for a start that never came are kept when their grace ends.
        if await pool.fetchval("SELECT count(*) FROM waiting_messages WHERE bike_id LIKE 'fuzz-%'"):
            return False
        kept = await pool.fetchval("SELECT count(*) FROM rejected_messages") - kept_before
        return kept == _total(m.rejected) - before[m.rejected]

    await wait_until(all_kept, timeout=30, what="every rejection kept")

    assert _total(m.dropped) == 0
    kept = await pool.fetchval("SELECT count(*) FROM rejected_messages") - kept_before
    accepted = _total(m.accepted) - before[m.accepted]
    assert kept + accepted == COUNT  # a few mutations happen to be valid (a start, say)
    assert accepted < 0.05 * COUNT
    answerable = await pool.fetchval(
        "SELECT count(*) FROM (SELECT bike_id FROM rejected_messages ORDER BY id DESC LIMIT $1)"
        " AS r WHERE bike_id IS NOT NULL",
        kept,
    )

    def answers() -> int:
        return sum(1 for t, _ in outbound.messages if t.endswith("/rejections"))

    await wait_until(lambda: answers() >= answerable, timeout=60, what="every rejection answered")
    stored = await pool.fetchval(
        "SELECT count(*) FROM rejected_messages WHERE length(payload) = 0 AND payload_size > 0"
    )
    assert stored == 0  # every kept rejection holds its raw payload

    session_id = await bike.start("ride")
    await bike.sample(session_id, 1, "1234.5")
    await bike.end(session_id, 1)
    (billing,) = await outbound.wait_for(bike.bike_id, "billing")
    assert billing["amount"] == "0.37"
