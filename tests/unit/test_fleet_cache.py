"""What the cache knows of each bike's version: the rule that tells a bike nobody else took
since we last wrote it (kept, no read) from one another writer took (read again)."""

from __future__ import annotations

from daemon.service.fleet_cache import BikeVersions


def test_a_batch_can_be_decided_on_the_cache_only_when_every_bike_is_known():
    versions = BikeVersions()
    versions.read("bike-a", 3)
    assert versions.knows(["bike-a"])
    assert versions.knows([])  # a batch of only not-owned or undecodable messages
    assert not versions.knows(["bike-a", "bike-b"])


def test_a_bike_whose_version_moved_is_read_again_and_one_that_did_not_is_kept():
    versions = BikeVersions()
    versions.read("bike-a", 3)
    versions.read("bike-b", 3)
    # bike-a: the version after ours (we wrote it last); bike-b: someone else wrote it twice;
    # bike-c: never read.
    assert versions.stale({"bike-a": 4, "bike-b": 6, "bike-c": 1}) == ["bike-b", "bike-c"]
    assert versions.stale({"bike-a": 5}) == []  # and now 4 is ours


def test_deciding_ahead_expects_each_bike_at_the_version_after_ours_once_per_batch():
    versions = BikeVersions()
    versions.read("a", 4)
    versions.read("b", 9)
    assert versions.assume_written(["a", "b"]) == {"a": 5, "b": 10}
    assert versions.assume_written(["a"]) == {"a": 6}  # the next batch, decided before this commits
    # A later lock that finds the version after ours: nobody else wrote the bike, no read.
    assert versions.stale({"a": 7}) == []
    # Another writer in between: the lock's version skips ours, and the bike is read again.
    assert versions.stale({"b": 12}) == ["b"]
