"""Keep the daemon's resident memory proportional to what it holds, over months of running.

The daemon holds little (session summaries, up to Receive Maximum messages in flight), but it
churns through millions of short-lived objects interleaved with those long-lived ones. With
CPython's small-object allocator (pymalloc) the long-lived ones pin its 1 MiB arenas and the
resident size creeps up by hundreds of bytes per message; with the C library's allocator the
freed memory is reused and, with ``malloc_trim``, handed back. Measured with
``benchmarks/session_memory.py`` (1,000 Active sessions, 199,000 samples): +94 MiB with
pymalloc, +24 MiB with the system allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable

__all__ = ["ALLOCATOR", "release_free_memory", "use_system_allocator"]

ALLOCATOR = "PYTHONMALLOC"


def use_system_allocator() -> None:
    """Re-execute this process (same PID) with the system allocator, unless the operator chose
    one with PYTHONMALLOC (which is respected as it is, ``pymalloc`` included)."""
    if os.environ.get(ALLOCATOR) or not sys.orig_argv:
        return
    argv = [sys.executable, *sys.orig_argv[1:]]  # the same command line, the same PID
    os.execve(sys.executable, argv, {**os.environ, ALLOCATOR: "malloc"})  # noqa: S606


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        return None
    return trim


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hand the heap's free pages back to the operating system (glibc; elsewhere a no-op)."""
    if _TRIM is not None:
        _TRIM(0)
