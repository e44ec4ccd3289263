"""`chargeflow run` uses the system allocator unless the operator chose one."""

from __future__ import annotations

import os
import subprocess
import sys

from daemon.memory import release_free_memory

SHOW = (
    "import os; from daemon.memory import use_system_allocator; use_system_allocator();"
    " print(os.getpid(), os.environ.get('PYTHONMALLOC'))"
)


def run(env: dict[str, str]) -> tuple[str, str]:
    out = subprocess.run(
        [sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, check=True
    )
    pid, allocator = out.stdout.split()
    return pid, allocator


def test_the_process_re_executes_itself_with_the_system_allocator():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
    _, allocator = run(env)
    assert allocator == "malloc"


def test_an_allocator_the_operator_chose_is_kept():
    _, allocator = run({**os.environ, "PYTHONMALLOC": "pymalloc"})
    assert allocator == "pymalloc"


def test_releasing_free_memory_is_safe_to_call_at_any_time():
    release_free_memory()
    release_free_memory()
