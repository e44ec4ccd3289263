"""SeqRanges: which seqs a session has stored, in constant space for in-order arrival."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import InvalidValue
from domain.seqs import SeqRanges


def test_in_order_seqs_are_one_range_whatever_their_number():
    seqs = SeqRanges()
    for seq in range(1, 100_001):
        seqs = seqs.with_seq(seq)
    assert seqs.ranges == ((1, 100_000),)
    assert len(seqs) == 100_000


def test_a_gap_is_a_second_range_until_it_is_filled():
    seqs = SeqRanges.of([1, 2, 4])
    assert seqs.ranges == ((1, 2), (4, 4))
    assert 3 not in seqs
    assert seqs.with_seq(3).ranges == ((1, 4),)


def test_bounds_round_trip_through_their_flat_form():
    seqs = SeqRanges.of([1, 2, 3, 7, 9, 10])
    assert seqs.flat() == [1, 3, 7, 7, 9, 10]
    assert SeqRanges.from_flat(seqs.flat()) == seqs


@pytest.mark.parametrize(
    "ranges", [((0, 1),), ((3, 2),), ((1, 2), (3, 4)), ((5, 6), (1, 2)), ((1, 4), (2, 6))]
)
def test_ranges_that_are_not_sorted_disjoint_and_apart_are_refused(ranges):
    with pytest.raises(InvalidValue):
        SeqRanges(ranges)


def test_an_odd_number_of_bounds_is_refused():
    with pytest.raises(InvalidValue, match="pairs"):
        SeqRanges.from_flat([1, 2, 3])


@given(st.lists(st.integers(1, 200), max_size=80))
def test_the_ranges_hold_exactly_the_seqs_added_in_any_order(seqs):
    ranges = SeqRanges()
    for seq in seqs:
        ranges = ranges.with_seq(seq)
    assert [s for s in range(202) if s in ranges] == sorted(set(seqs))
    assert len(ranges) == len(set(seqs))
    assert ranges.highest == max(seqs, default=0)
    assert ranges == SeqRanges.of(seqs)


def test_sessions_that_took_their_samples_in_order_share_one_set_of_seqs():
    in_order = SeqRanges().with_seq(1).with_seq(2).with_seq(3)
    loaded = SeqRanges.from_flat([1, 3])
    assert in_order is loaded  # one object for every session at 1..3: memory per session
    with_gap = in_order.with_seq(5)
    assert with_gap.ranges == ((1, 3), (5, 5))
    assert in_order.ranges == ((1, 3),)  # shared, so never changed in place
