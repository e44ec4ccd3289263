"""Which samples of a session are stored, compactly: sorted ranges of seqs, not the samples."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from domain.errors import InvalidValue

__all__ = ["SeqRanges"]


@dataclass(frozen=True, slots=True)
class SeqRanges:
    """A set of seqs as sorted, disjoint, non-adjacent inclusive ranges ``(low, high)``.

    A session that took samples 1..100,000 in order is one range, so a session's summary costs
    the same whatever the number of its samples; gaps (samples still missing) add ranges.
    """

    ranges: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        previous_high = 0
        for low, high in self.ranges:
            if low < 1 or high < low or (previous_high and low <= previous_high + 1):
                raise InvalidValue(
                    f"seq ranges must be sorted, disjoint, non-adjacent and from 1: {self.ranges}"
                )
            previous_high = high

    @classmethod
    def of(cls, seqs: Iterable[int]) -> SeqRanges:
        """The ranges of any collection of seqs."""
        result = cls()
        for seq in sorted(set(seqs)):
            result = result.with_seq(seq)
        return result

    @classmethod
    def from_flat(cls, bounds: Iterable[int]) -> SeqRanges:
        """From ``[low1, high1, low2, high2, ...]``, as the store keeps them."""
        flat = list(bounds)
        if len(flat) % 2:
            raise InvalidValue(f"seq range bounds come in pairs, got {len(flat)} numbers")
        if len(flat) == 2 and flat[0] == 1 and flat[1] >= 1:
            return _one_to(flat[1])
        return cls(tuple(zip(flat[::2], flat[1::2], strict=True)))

    def flat(self) -> list[int]:
        return [bound for pair in self.ranges for bound in pair]

    def __contains__(self, seq: object) -> bool:
        if not isinstance(seq, int) or not self.ranges:
            return False
        low, high = self.ranges[-1]
        if seq >= low:  # the usual case: at or after the newest range
            return seq <= high
        index = bisect_right(self.ranges, (seq, float("inf"))) - 1
        return index >= 0 and self.ranges[index][0] <= seq <= self.ranges[index][1]

    def __len__(self) -> int:
        return sum(high - low + 1 for low, high in self.ranges)

    @property
    def highest(self) -> int:
        """The highest seq in the set, 0 when it is empty."""
        return self.ranges[-1][1] if self.ranges else 0

    def with_seq(self, seq: int) -> SeqRanges:
        """This set plus ``seq`` (the same set if it is in already)."""
        ranges = self.ranges
        if ranges and ranges[-1][1] + 1 == seq:  # in-order arrival: extend the newest range
            if len(ranges) == 1 and ranges[0][0] == 1:
                return _one_to(seq)
            return SeqRanges((*ranges[:-1], (ranges[-1][0], seq)))
        if not ranges and seq == 1:
            return _one_to(1)
        if seq in self:
            return self
        return SeqRanges(_merged(ranges, seq))


def _merged(ranges: tuple[tuple[int, int], ...], seq: int) -> tuple[tuple[int, int], ...]:
    """The ranges with ``seq`` added: the ranges it touches joined into one, in order."""
    merged: list[tuple[int, int]] = []
    low, high = seq, seq
    for r_low, r_high in ranges:
        if r_high + 1 < low or r_low > high + 1:
            merged.append((r_low, r_high))
        else:
            low, high = min(low, r_low), max(high, r_high)
    merged.append((low, high))
    merged.sort()
    return tuple(merged)


@lru_cache(maxsize=4096)
def _one_to(high: int) -> SeqRanges:
    """Seqs 1..high, shared: most Active sessions have taken their samples in order, and one
    set each (three objects, 168 bytes) was a third of a 100,000-bike fleet's memory growth."""
    return SeqRanges(((1, high),))
