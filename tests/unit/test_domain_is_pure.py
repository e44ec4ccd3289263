"""domain/ imports only the standard library and never reads the clock or makes ids."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

DOMAIN = Path(__file__).resolve().parents[2] / "domain"


def _modules() -> list[Path]:
    return sorted(DOMAIN.glob("*.py"))


def test_domain_imports_only_the_standard_library_and_itself():
    offenders = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in {"domain", "__future__"}:
                    offenders.append(f"{path.name}: {name}")
                if top == "asyncio":
                    offenders.append(f"{path.name}: asyncio (the domain is synchronous)")
    assert offenders == []


def test_domain_never_reads_the_clock_or_makes_ids():
    forbidden = {"now", "utcnow", "today", "uuid4", "uuid1", "time", "monotonic"}
    offenders = [
        f"{path.name}:{node.lineno} {node.func.attr}()"
        for path in _modules()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in forbidden
    ]
    assert offenders == []
