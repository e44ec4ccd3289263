"""Several daemon instances in one share group, and messages that overtake what they need."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import timedelta
from decimal import Decimal

import asyncpg

from tests.e2e.helpers import Bike, Outbound, running_daemon, settings_for, wait_until
from tests.peers import mqtt_client

BIKES = 120
SAMPLES = 6  # per session; every bike rides, then charges: 240 sessions, 2,400 messages
KINDS = ("lifecycle", "telemetry")


async def _ride_then_charge(bike: Bike, energies: dict[str, Decimal]) -> None:
    """Publish a bike's two sessions as one burst, in order on one connection: the share group
    spreads the burst over the instances, which then see the bike's messages in any order."""
    ride, charging = str(uuid.uuid4()), str(uuid.uuid4())
    later = bike.t0 + timedelta(minutes=11)
    sends = [bike.start("ride", session_id=ride)]
    sends += [bike.sample(ride, seq, f"{seq}.25") for seq in range(1, SAMPLES + 1)]
    sends.append(bike.end(ride, SAMPLES))
    sends.append(bike.start("charging", session_id=charging, party="station-9", at=later))
    sends += [
        bike.sample(charging, seq, "100", at=later + timedelta(seconds=seq))
        for seq in range(1, SAMPLES + 1)
    ]
    sends.append(bike.end(charging, SAMPLES, kind="charging", at=later + timedelta(minutes=5)))
    await asyncio.gather(*sends)  # paho sends in call order; PUBACKs are awaited together
    energies[ride] = sum(Decimal(f"{seq}.25") for seq in range(1, SAMPLES + 1))
    energies[charging] = Decimal(100 * SAMPLES)


async def test_three_instances_in_one_share_group_finalize_every_session_once_exactly(
    database_url, broker
):
    group = f"cf-{uuid.uuid4().hex[:6]}"
    settings = [settings_for(database_url, broker.daemon_url, share_group=group) for _ in range(3)]
    energies: dict[str, Decimal] = {}
    async with contextlib.AsyncExitStack() as stack:
        daemons = [await stack.enter_async_context(running_daemon(s)) for s in settings]
        outbound = await stack.enter_async_context(Outbound(broker.fleet_url))
        async with mqtt_client(broker.fleet_url) as client:
            bikes = [Bike(client) for _ in range(BIKES)]
            await asyncio.gather(*(_ride_then_charge(b, energies) for b in bikes))
        pool = daemons[0].store.pool  # type: ignore[union-attr]
        ids = [uuid.UUID(s) for s in energies]

        async def all_finalized() -> bool:
            count = await pool.fetchval(
                "SELECT count(*) FROM sessions WHERE session_id = ANY($1) AND state = 'finalized'",
                ids,
            )
            return count == len(ids)

        await wait_until(all_finalized, timeout=90, what="every session finalized")
        await wait_until(
            lambda: sum(len(outbound.of(b.bike_id, "billing")) >= 2 for b in bikes) == BIKES,
            timeout=60,
            what="every billing record published",
        )
        rows = await pool.fetch(
            "SELECT s.session_id, s.energy_wh, s.telemetry_count, s.missing_samples,"
            " (SELECT sum(t.energy_wh) FROM telemetry t WHERE t.session_id = s.session_id) AS sql_sum"
            " FROM sessions s WHERE s.session_id = ANY($1)",
            ids,
        )
        rejected = await pool.fetchval(
            "SELECT count(*) FROM rejected_messages WHERE bike_id = ANY($1)",
            [b.bike_id for b in bikes],
        )
        finalized_rows = await pool.fetchval(
            "SELECT count(*) FROM outbox WHERE event = 'session_finalized' AND topic = ANY($1)",
            [f"chargeflow/v1/bikes/{b.bike_id}/sessions/finalized" for b in bikes],
        )
        dropped = sum(
            d.metrics.dropped.labels(r)._value.get()
            for d in daemons
            for r in ("commit_failed", "internal_error")
        )
    assert rejected == 0
    assert dropped == 0
    assert finalized_rows == len(ids)  # finalized exactly once, whichever instance did it
    for row in rows:
        expected = energies[str(row["session_id"])]
        assert (
            row["energy_wh"],
            row["sql_sum"],
            row["telemetry_count"],
            row["missing_samples"],
        ) == (
            expected,
            expected,
            SAMPLES,
            0,
        ), row
    for bike in bikes:
        published = {m["session_id"] for m in outbound.of(bike.bike_id, "sessions/finalized")}
        billed = {m["session_id"] for m in outbound.of(bike.bike_id, "billing")}
        assert len(published) == 2 and published == billed
    # The work was shared, and the instances did see messages overtake what they depend on.
    assert all(d.metrics.accepted.labels("telemetry")._value.get() > 0 for d in daemons)
    deferred = sum(d.metrics.deferred.labels(k)._value.get() for d in daemons for k in KINDS)
    print(f"messages that waited for what they depend on: {deferred:.0f}")
    assert deferred > 0


async def test_a_sample_before_its_start_and_a_start_before_the_previous_end_are_applied(
    daemon, bike, outbound
):
    ride = str(uuid.uuid4())
    await bike.sample(ride, 1, "1234.5")  # overtakes its start
    await bike.start("ride", session_id=ride)
    charging = str(uuid.uuid4())
    later = bike.t0 + timedelta(minutes=11)
    await bike.start("charging", session_id=charging, party="station-2", at=later)  # overtakes
    await bike.end(ride, 1)
    await bike.sample(charging, 1, "1500", at=later + timedelta(seconds=1))
    await bike.end(charging, 1, kind="charging", at=later + timedelta(minutes=2))

    bills = await outbound.wait_for(bike.bike_id, "billing", count=2)
    finalized = outbound.of(bike.bike_id, "sessions/finalized")

    by_session = {m["session_id"]: m for m in finalized}
    assert (by_session[ride]["energy_wh"], by_session[ride]["missing_samples"]) == ("1234.5", 0)
    assert (by_session[charging]["energy_wh"], by_session[charging]["missing_samples"]) == (
        "1500",
        0,
    )
    amounts = {m["session_id"]: m["amount"] for m in bills}
    assert amounts == {ride: "0.37", charging: "0.38"}
    assert outbound.of(bike.bike_id, "rejections") == []
    assert daemon.metrics.waiting_settled.labels("applied")._value.get() >= 2


async def test_a_waiting_message_is_durable_across_a_restart(database_url, broker, bike, outbound):
    settings = settings_for(database_url, broker.daemon_url, finalize_grace_s=3.0)
    ride = str(uuid.uuid4())
    async with running_daemon(settings) as first:
        await bike.sample(ride, 1, "20")
        pool: asyncpg.Pool = first.store.pool  # type: ignore[union-attr]
        await wait_until(
            lambda: pool.fetchval(
                "SELECT count(*) FROM waiting_messages WHERE bike_id = $1", bike.bike_id
            ),
            what="the sample kept waiting",
        )
    async with running_daemon(settings):
        await bike.start("ride", session_id=ride)
        await bike.end(ride, 1)
        (finalized,) = await outbound.wait_for(bike.bike_id, "sessions/finalized")
    assert (finalized["energy_wh"], finalized["missing_samples"]) == ("20", 0)
