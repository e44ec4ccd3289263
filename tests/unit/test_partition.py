"""Bike-affine instances: which bikes an instance takes, and how a change of layout stays safe."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.partition import Ownership, Partition, PartitionRegistry, bike_slot

bike_ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)


def test_a_bikes_slot_is_the_crc32_of_its_id_so_every_instance_and_version_agrees():
    assert bike_slot("bike-0001", 7) == zlib.crc32(b"bike-0001") % 7
    assert [bike_slot(f"bike-{i:04d}", 2) for i in range(6)] == [
        zlib.crc32(f"bike-{i:04d}".encode()) % 2 for i in range(6)
    ]


def test_a_topic_that_names_no_bike_is_answered_by_slot_zero():
    assert bike_slot(None, 3) == bike_slot("", 3) == 0


@given(bike_ids, st.integers(1, 64))
def test_the_partitions_of_a_count_take_every_bike_exactly_once(bike_id, count):
    takers = [i for i in range(count) if Partition(i, count).covers(bike_id)]
    assert len(takers) == 1


@pytest.mark.parametrize("text", ["2/2", "0/0", "-1/2", "1", "a/b", "0/2000", " / "])
def test_a_partition_outside_its_count_is_refused_with_the_form_it_takes(text):
    with pytest.raises(ValueError, match="i/N"):
        Partition.parse(text)


def test_a_partition_reads_back_as_it_is_written():
    assert str(Partition.parse(" 1/3 ")) == "1/3"


def _split(count: int, bikes: list[str], index: int) -> tuple[list[str], list[str]]:
    mine = [b for b in bikes if bike_slot(b, count) == index]
    return mine, [b for b in bikes if b not in mine]


BIKES = [f"bike-{i:04d}" for i in range(200)]


def test_an_instance_takes_its_share_when_the_others_cover_the_rest():
    ownership = Ownership([Partition(0, 2)], [Partition(1, 2)])
    mine, theirs = _split(2, BIKES, 0)
    assert all(ownership.takes(b) for b in mine)
    assert not any(ownership.takes(b) for b in theirs)


def test_bikes_nobody_else_claims_are_taken_too():
    # Two instances on 0/2 and none on 1/2: each takes every bike.
    ownership = Ownership([Partition(0, 2)], [Partition(0, 2)])
    assert all(ownership.takes(b) for b in BIKES)


def test_with_no_partition_an_instance_takes_every_bike():
    assert Ownership().everything
    assert all(Ownership().takes(b) for b in BIKES)
    assert all(Ownership([Partition(0, 1)], [Partition(1, 2)]).takes(b) for b in BIKES)


def test_a_changed_view_is_taken_at_once():
    ownership = Ownership([Partition(0, 2)], [])
    assert all(ownership.takes(b) for b in BIKES)  # alone: everything
    ownership.update([Partition(0, 2)], [Partition(1, 2)])
    _, theirs = _split(2, BIKES, 0)
    assert not any(ownership.takes(b) for b in theirs)


@given(
    st.lists(st.tuples(st.integers(1, 5), st.integers(0, 4)), min_size=1, max_size=5),
    st.lists(bike_ids, min_size=1, max_size=20),
)
def test_whatever_the_claims_every_bike_is_taken_by_at_least_one_instance(claims, bikes):
    partitions = [Partition(i % n, n) for n, i in claims]
    for bike in bikes:
        takers = [
            p
            for k, p in enumerate(partitions)
            if Ownership([p], partitions[:k] + partitions[k + 1 :]).takes(bike)
        ]
        assert takers, bike


class FakeClaims:
    """The registry's port, in memory: rows by client id, with their unsettled claims."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[Partition, list[Partition]]] = {}

    async def register(self, client_id, partition):
        held: set[Partition] = set()
        if client_id in self.rows:
            current, previous = self.rows[client_id]
            held = {current, *previous} - {partition}
        self.rows[client_id] = (partition, sorted(held))
        return sorted(held)

    async def live(self, client_id, lease_s):
        return [p for c, (p, _) in self.rows.items() if c != client_id]

    async def settle(self, client_id):
        current, _ = self.rows[client_id]
        self.rows[client_id] = (current, [])


async def test_an_instance_that_restarts_with_another_claim_keeps_the_old_one_until_settled():
    claims = FakeClaims()
    claims.rows["b"] = (Partition(1, 2), [])
    first = PartitionRegistry(claims, "a", Partition(0, 2), Ownership(), lease_s=60, idle=lambda: 0)
    await first.claim()
    idle = 0.0
    # N goes from 2 to 3: "a" restarts as 0/3 while the broker still holds what was queued
    # for it as 0/2.
    ownership = Ownership()
    again = PartitionRegistry(
        claims, "a", Partition(0, 3), ownership, lease_s=60, idle=lambda: idle, settle_after_s=0
    )
    await again.claim()
    assert set(ownership.mine) == {Partition(0, 3), Partition(0, 2)}
    await again.refresh()  # still busy with the backlog: keeps both
    assert set(ownership.mine) == {Partition(0, 3), Partition(0, 2)}
    idle = 5.0  # the backlog is in
    await again.refresh()
    assert ownership.mine == (Partition(0, 3),)
    assert claims.rows["a"] == (Partition(0, 3), [])


async def test_a_restart_cut_short_before_settling_still_remembers_every_older_claim():
    claims = FakeClaims()
    for partition in (Partition(0, 2), Partition(0, 3), Partition(0, 4)):
        await PartitionRegistry(
            claims, "a", partition, Ownership(), lease_s=60, idle=lambda: 0
        ).claim()
    assert claims.rows["a"] == (Partition(0, 4), [Partition(0, 2), Partition(0, 3)])
