"""Every retry loop of the daemon waits the same way (daemon/backoff.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.backoff import CAP_S, FIRST_S, Backoff


@given(st.integers(min_value=1, max_value=40))
def test_waits_double_from_half_a_second_to_the_cap_each_less_up_to_half_in_jitter(attempts):
    backoff = Backoff()
    waits = [backoff.next_wait() for _ in range(attempts)]
    for n, wait in enumerate(waits):
        nominal = min(FIRST_S * 2**n, CAP_S)
        assert nominal / 2 <= wait <= nominal


def test_however_long_the_outage_no_wait_exceeds_the_cap():
    backoff = Backoff()
    assert max(backoff.next_wait() for _ in range(1000)) <= CAP_S == 2.0


def test_a_success_starts_the_waits_again_from_half_a_second():
    backoff = Backoff()
    for _ in range(10):
        backoff.next_wait()
    backoff.reset()
    assert backoff.next_wait() <= FIRST_S
