"""Every rejection reason code, produced by a real message and answered on the bike's topic."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest

from tests.e2e.helpers import PREFIX, Bike, wait_until

pytestmark = pytest.mark.e2e


async def _finalized(bike: Bike, outbound, last_seq: int = 0) -> str:
    session_id = await bike.start()
    for seq in range(1, last_seq + 1):
        await bike.sample(session_id, seq)
    await bike.end(session_id, last_seq)
    await outbound.wait_for(bike.bike_id, "sessions/finalized")
    return session_id


async def malformed_json(bike, outbound):
    await bike.send("telemetry", b'{"telemetry_id": ')


async def schema_violation(bike, outbound):
    await bike.send("telemetry", {"telemetry_id": str(uuid.uuid4()), "seq": 1})


async def payload_too_large(bike, outbound):
    await bike.send("telemetry", b'{"pad": "' + b"x" * 20_000 + b'"}')


async def unknown_topic(bike, outbound):
    bike.bike_id = f"bike.{uuid.uuid4().hex[:6]}"  # a dot is not allowed in a bike_id
    await bike.send("telemetry", {"seq": 1})


async def active_session_exists(bike, outbound):
    await bike.start()
    await bike.start()


async def unknown_session(bike, outbound):
    await bike.sample(str(uuid.uuid4()), 1)


async def session_finalized(bike, outbound):
    session_id = await _finalized(bike, outbound)
    await bike.sample(session_id, 1)


async def session_kind_mismatch(bike, outbound):
    session_id = await bike.start("ride")
    await bike.end(session_id, 0, kind="charging")


async def session_id_conflict(bike, outbound):
    session_id = await bike.start("ride", party="rider-1")
    await bike.start("ride", session_id=session_id, party="rider-2")


async def timestamp_out_of_range(bike, outbound):
    session_id = await bike.start()
    await bike.sample(session_id, 1, at=bike.t0 - timedelta(seconds=1))


async def seq_beyond_end(bike, outbound):
    session_id = await bike.start()
    await bike.sample(session_id, 1)
    await bike.end(session_id, 2)
    await bike.sample(session_id, 3)


CASES = [
    malformed_json, schema_violation, payload_too_large, unknown_topic, active_session_exists,
    unknown_session, session_finalized, session_kind_mismatch, session_id_conflict,
    timestamp_out_of_range, seq_beyond_end,
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
async def test_each_reason_code_is_answered_kept_and_counted(daemon, bike, outbound, pool, case):
    reason = case.__name__
    before = daemon.metrics.rejected.labels(reason)._value.get()
    await case(bike, outbound)
    (rejection,) = await outbound.wait_for(bike.bike_id, "rejections")
    assert rejection["reason"] == reason
    assert rejection["detail"]
    assert rejection["topic"].startswith(f"{PREFIX}/bikes/{bike.bike_id}/")
    row = await pool.fetchrow("SELECT * FROM rejected_messages WHERE bike_id = $1", bike.bike_id)
    assert row["reason"] == reason
    assert row["payload_size"] >= len(row["payload"]) > 0
    await wait_until(
        lambda: daemon.metrics.rejected.labels(reason)._value.get() == before + 1,
        what=f"{reason} counted",
    )


async def test_a_rejection_names_the_ids_it_could_read(daemon, bike, outbound):
    session_id = str(uuid.uuid4())
    telemetry_id = await bike.sample(session_id, 1)
    (rejection,) = await outbound.wait_for(bike.bike_id, "rejections")
    assert rejection["session_id"] == session_id
    assert rejection["telemetry_id"] == telemetry_id
    assert "has no session" in rejection["detail"]


async def test_a_repeated_bad_payload_is_kept_once_and_answered_each_time(
    daemon, bike, outbound, pool
):
    body = json.dumps({"telemetry_id": "not-a-uuid"}).encode()
    await bike.send("telemetry", body)
    await bike.send("telemetry", body)
    answers = await outbound.wait_for(bike.bike_id, "rejections", 2)
    assert [a["reason"] for a in answers] == ["schema_violation", "schema_violation"]
    await wait_until(
        lambda: daemon.metrics.rejected.labels("schema_violation")._value.get() == 2,
        what="both copies settled",
    )
    rows = await pool.fetchval(
        "SELECT count(*) FROM rejected_messages WHERE bike_id = $1", bike.bike_id
    )
    assert rows == 1


async def test_bad_input_loses_nothing_already_accepted(daemon, bike, outbound):
    session_id = await bike.start()
    await bike.sample(session_id, 1, "100")
    await bike.send("telemetry", b"\xff\xfe not utf-8")
    await bike.sample(session_id, 1, "999")  # a second sample 1: a conflict, not an overwrite
    await bike.sample(session_id, 2, "50")
    await bike.end(session_id, 2)
    (finalized,) = await outbound.wait_for(bike.bike_id, "sessions/finalized")
    assert finalized["energy_wh"] == "150"
    reasons = sorted(r["reason"] for r in await outbound.wait_for(bike.bike_id, "rejections", 2))
    assert reasons == ["malformed_json", "session_id_conflict"]
