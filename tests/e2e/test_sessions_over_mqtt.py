"""A ride and a charging session through real Mosquitto and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, timedelta, timezone
from decimal import Decimal

import pytest

from tests.e2e.helpers import http_get, wait_until

pytestmark = pytest.mark.e2e


async def test_a_ride_produces_its_finalized_and_billing_messages(daemon, bike, outbound, pool):
    session_id = await bike.start("ride", party="rider-42")
    await bike.sample(session_id, 1, 1000.25, distance_m="1200.5", soc_pct=80)
    await bike.sample(session_id, 2, "234.25", distance_m=300)
    await bike.end(session_id, 2)

    (finalized,) = await outbound.wait_for(bike.bike_id, "sessions/finalized")
    (billing,) = await outbound.wait_for(bike.bike_id, "billing")
    assert finalized["session_id"] == session_id
    assert finalized["kind"] == "ride"
    assert finalized["rider_id"] == "rider-42"
    assert Decimal(finalized["energy_wh"]) == Decimal("1234.5")
    assert Decimal(finalized["distance_m"]) == Decimal("1500.5")
    assert finalized["telemetry_count"] == 2
    assert finalized["missing_samples"] == 0
    assert finalized["end_reason"] == "ended"
    assert finalized["duration_s"] == 600
    assert billing == {
        "session_id": session_id,
        "bike_id": bike.bike_id,
        "kind": "ride",
        "billable_energy_wh": finalized["energy_wh"],
        "unit_price": "0.30",
        "currency": "EUR",
        "amount": "0.37",
        "pricing_version": "2026-01",
    }
    row = await pool.fetchrow("SELECT * FROM sessions WHERE session_id = $1", uuid.UUID(session_id))
    assert row["state"] == "finalized"
    assert row["energy_wh"] == Decimal("1234.5")
    assert row["telemetry_count"] == 2
    stored = await pool.fetchval(
        "SELECT sum(energy_wh) FROM telemetry WHERE session_id = $1", uuid.UUID(session_id)
    )
    assert stored == Decimal("1234.5")


@pytest.mark.parametrize(("energy", "amount"), [("1500", "0.38"), ("500", "0.12")])
async def test_a_charging_session_is_billed_with_half_even_rounding(
    daemon, bike, outbound, energy, amount
):
    session_id = await bike.start("charging", party="station-7")
    await bike.sample(session_id, 1, energy)
    await bike.end(session_id, 1, kind="charging")
    (finalized,) = await outbound.wait_for(bike.bike_id, "sessions/finalized")
    (billing,) = await outbound.wait_for(bike.bike_id, "billing")
    assert finalized["station_id"] == "station-7"
    assert billing["kind"] == "charging"
    assert billing["unit_price"] == "0.25"
    assert billing["amount"] == amount


async def test_redelivered_messages_are_duplicates_not_rejections(daemon, bike, outbound, pool):
    session_id = await bike.start("ride")
    telemetry_id = await bike.sample(session_id, 1, "5")
    await bike.start("ride", session_id=session_id)
    await bike.sample(session_id, 1, "5", telemetry_id=telemetry_id)
    await bike.end(session_id, 1)
    await bike.end(session_id, 1)
    (finalized,) = await outbound.wait_for(bike.bike_id, "sessions/finalized")
    await wait_until(
        lambda: (
            daemon.metrics.duplicates.labels("lifecycle")._value.get() >= 2
            and daemon.metrics.duplicates.labels("telemetry")._value.get() >= 1
        ),
        what="duplicates counted",
    )
    assert Decimal(finalized["energy_wh"]) == 5
    assert outbound.of(bike.bike_id, "rejections") == []
    count = await pool.fetchval(
        "SELECT count(*) FROM telemetry WHERE session_id = $1", uuid.UUID(session_id)
    )
    assert count == 1


async def test_a_late_sample_inside_the_grace_period_is_counted(daemon, bike, outbound):
    session_id = await bike.start("ride")
    await bike.sample(session_id, 1, "7")
    await bike.end(session_id, 2)
    await bike.sample(session_id, 2, "8")
    (finalized,) = await outbound.wait_for(bike.bike_id, "sessions/finalized")
    assert Decimal(finalized["energy_wh"]) == 15
    assert finalized["missing_samples"] == 0


async def test_a_sample_after_finalization_is_rejected(daemon, bike, outbound):
    session_id = await bike.start("ride")
    await bike.sample(session_id, 1, "7")
    await bike.end(session_id, 2)  # sample 2 never comes in time: the 1 s grace expires
    (finalized,) = await outbound.wait_for(bike.bike_id, "sessions/finalized", timeout=10)
    assert finalized["missing_samples"] == 1
    await bike.sample(session_id, 2, "8")
    (rejection,) = await outbound.wait_for(bike.bike_id, "rejections")
    assert rejection["reason"] == "session_finalized"
    assert rejection["session_id"] == session_id


async def test_the_session_endpoint_traces_a_session_to_its_bill(daemon, bike, outbound):
    session_id = await bike.start("ride")
    await bike.sample(session_id, 1, "1234.5")
    await bike.end(session_id, 1)
    await outbound.wait_for(bike.bike_id, "billing")
    status, view = await http_get(daemon, f"/sessions/{session_id}")
    assert status == 200
    assert view["stored_telemetry_count"] == 1
    assert view["billing"]["amount"] == "0.37"
    status, report = await http_get(daemon, f"/analytics?bike_id={bike.bike_id}")
    assert report["rides"]["session_ids"] == [session_id]
    assert report["revenue"] == {"EUR": "0.37"}
    status, error = await http_get(daemon, "/analytics?from=yesterday")
    assert status == 400
    assert (error["status"], error["title"]) == (400, "Invalid request")
    assert error["errors"][0]["parameter"] == "from"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_daemon_in_a_share_group_ingests_through_a_shared_subscription(
    database_url, broker, bike, outbound, protocol
):
    from tests.e2e.helpers import running_daemon, settings_for

    # A group of its own: Mosquitto keeps giving a share to offline persistent members (such
    # as the daemon of another run of this test).
    group = f"chargeflow-{uuid.uuid4().hex[:6]}"
    settings = settings_for(
        database_url, broker.daemon_url, share_group=group, mqtt_protocol=protocol
    )
    async with running_daemon(settings):
        session_id = await bike.start("charging", party="station-1")
        await bike.sample(session_id, 1, "500")
        await bike.end(session_id, 1, kind="charging")
        (billing,) = await outbound.wait_for(bike.bike_id, "billing")
    assert billing["amount"] == "0.12"


async def test_a_session_that_goes_dark_is_finalized_as_timed_out(
    database_url, broker, bike, outbound
):
    from tests.e2e.helpers import running_daemon, settings_for

    settings = settings_for(database_url, broker.daemon_url, abandon_after_s=1.0)
    async with running_daemon(settings):
        session_id = await bike.start("ride")
        await bike.sample(session_id, 1, "40")
        await bike.sample(session_id, 3, "2")  # sample 2 is lost, and the bike goes dark
        (finalized,) = await outbound.wait_for(bike.bike_id, "sessions/finalized")
        (billing,) = await outbound.wait_for(bike.bike_id, "billing")
    assert finalized["end_reason"] == "timed_out"
    assert finalized["energy_wh"] == "42"
    assert finalized["missing_samples"] == 1
    assert billing["amount"] == "0.01"  # 0.042 kWh x 0.30 = 0.0126


async def test_a_session_reported_with_an_offset_has_one_form_on_mqtt_and_over_http(
    daemon, bike, outbound
):
    india = timezone(timedelta(hours=5, minutes=30))
    at = bike.t0.astimezone(india)
    session_id = await bike.start("ride", at=at)
    await bike.sample(session_id, 1, "1.50", at=at + timedelta(seconds=1), distance_m="2.000")
    await bike.sample(session_id, 2, "1.00", at=at + timedelta(seconds=2), distance_m="0")
    await bike.end(session_id, 2, at=at + timedelta(minutes=1))

    (finalized,) = await outbound.wait_for(bike.bike_id, "sessions/finalized")
    (billing,) = await outbound.wait_for(bike.bike_id, "billing")
    status, view = await http_get(daemon, f"/sessions/{session_id}")

    assert status == 200
    assert view["finalized"] == finalized
    assert view["billing"] == billing
    assert view["started_at"] == finalized["started_at"]
    assert finalized["started_at"] == bike.t0.astimezone(UTC).isoformat().replace("+00:00", "Z")
    assert (finalized["energy_wh"], finalized["distance_m"]) == ("2.5", "2")
    assert billing["billable_energy_wh"] == "2.5"
