"""Bills that never change: each session is billed by the pricing version it was finalized under."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from tests.e2e.helpers import Bike, Outbound, http_get, running_daemon, settings_for
from tests.e2e.test_cli import chargeflow
from tests.peers import mqtt_client

pytestmark = pytest.mark.e2e


def pricing_file(folder: Path, version: str, ride: str) -> Path:
    path = folder / f"pricing-{version}.toml"
    path.write_text(
        f'version = "{version}"\ncurrency = "EUR"\n'
        f"[ride]\nunit_price = {ride}\n[charging]\nunit_price = 0.25\n"
    )
    return path


async def ride_of_1234_5_wh(bike: Bike, outbound: Outbound, count: int) -> dict:
    session_id = await bike.start("ride")
    await bike.sample(session_id, 1, "1234.5")
    await bike.end(session_id, 1)
    bills = await outbound.wait_for(bike.bike_id, "billing", count=count)
    return next(b for b in bills if b["session_id"] == session_id)


async def test_a_bill_stays_what_was_published_after_prices_change(database_url, broker, tmp_path):
    # Versions are named per run: the test database outlives this test.
    run = uuid.uuid4().hex[:6]
    a = pricing_file(tmp_path, f"a-{run}", "0.30")
    b = pricing_file(tmp_path, f"b-{run}", "0.60")
    async with Outbound(broker.fleet_url) as outbound, mqtt_client(broker.fleet_url) as client:
        bike = Bike(client)
        async with running_daemon(settings_for(database_url, broker.daemon_url, pricing_file=a)):
            first = await ride_of_1234_5_wh(bike, outbound, 1)
        async with running_daemon(
            settings_for(database_url, broker.daemon_url, pricing_file=b)
        ) as daemon:
            second = await ride_of_1234_5_wh(bike, outbound, 2)
            _, view = await http_get(daemon, f"/sessions/{first['session_id']}")
            _, report = await http_get(daemon, f"/analytics?bike_id={bike.bike_id}")
            _, history = await http_get(daemon, "/pricing")
            _, only_a = await http_get(
                daemon, f"/analytics?bike_id={bike.bike_id}&pricing_version=a-{run}"
            )

    assert (first["amount"], first["pricing_version"]) == ("0.37", f"a-{run}")
    assert (second["amount"], second["pricing_version"]) == ("0.74", f"b-{run}")
    # The first ride's bill, everywhere, is still the one published under version A.
    assert view["billing"] == first
    assert view["finalized"]["session_id"] == first["session_id"]
    shown = await asyncio.to_thread(
        chargeflow, "session", first["session_id"], CHARGEFLOW_DATABASE_URL=database_url
    )
    assert json.loads(shown.stdout)["billing"] == first
    published = Decimal(first["amount"]) + Decimal(second["amount"])
    assert Decimal(report["rides"]["revenue"]["EUR"]) == published
    assert report["by_pricing_version"] == {
        f"a-{run}": {"sessions": 1, "revenue": {"EUR": "0.37"}},
        f"b-{run}": {"sessions": 1, "revenue": {"EUR": "0.74"}},
    }
    assert only_a["rides"]["session_ids"] == [first["session_id"]]
    versions = {v["version"]: v for v in history["pricing_versions"]}
    assert versions[f"a-{run}"]["ride"]["unit_price"] == "0.30"
    assert versions[f"b-{run}"]["ride"]["unit_price"] == "0.60"
    assert versions[f"a-{run}"]["first_used_at"] <= versions[f"b-{run}"]["first_used_at"]


async def test_a_recorded_version_with_other_prices_is_refused_at_start_up_in_one_line(
    database_url, broker, tmp_path
):
    version = f"c-{uuid.uuid4().hex[:6]}"
    recorded = pricing_file(tmp_path, version, "0.30")
    async with running_daemon(settings_for(database_url, broker.daemon_url, pricing_file=recorded)):
        pass
    changed = tmp_path / "changed.toml"
    changed.write_text(pricing_file(tmp_path, version, "0.45").read_text())

    run = await asyncio.to_thread(
        chargeflow,
        "run",
        CHARGEFLOW_DATABASE_URL=database_url,
        CHARGEFLOW_MQTT_URL=broker.daemon_url,
        CHARGEFLOW_PRICING_FILE=str(changed),
        CHARGEFLOW_HTTP_PORT="0",
    )

    assert run.returncode == 2
    said = [line for line in run.stderr.splitlines() if not line.startswith("{")]  # not logs
    assert "Traceback" not in run.stderr
    assert said == [
        f"chargeflow: configuration error: pricing version {version} is already recorded"
        " with other prices; give the new prices a new version"
    ]
