"""How long to wait before trying again: one policy for every retry loop of the daemon.

The broker's connection, the database at start-up, a batch held while the database is away,
and the outbox relay all wait the same way: from half a second, doubling, capped at
``CAP_S``, with jitter (a wait is half to all of its nominal value, so that instances
knocking at a returning broker or database do not knock in step). However long either was
away, the daemon is back within about ``CAP_S`` of its return (README, "Outages").
"""

from __future__ import annotations

import random

__all__ = ["CAP_S", "FIRST_S", "Backoff"]

FIRST_S = 0.5
CAP_S = 2.0


class Backoff:
    """The waits of one retry loop: ``next_wait()`` before each retry, ``reset()`` on success."""

    __slots__ = ("_nominal",)

    def __init__(self) -> None:
        self._nominal = FIRST_S

    def next_wait(self) -> float:
        """The wait before the next attempt, in seconds; the one after is twice as long."""
        wait = self._nominal * random.uniform(0.5, 1.0)
        self._nominal = min(self._nominal * 2, CAP_S)
        return wait

    def reset(self) -> None:
        self._nominal = FIRST_S
