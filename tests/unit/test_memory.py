"""Handing free heap pages back is safe whenever the daemon does it."""

from __future__ import annotations

from daemon.memory import release_free_memory


def test_releasing_free_memory_is_safe_to_call_at_any_time():
    release_free_memory()
    release_free_memory()
