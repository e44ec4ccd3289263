"""The import-linter layers (pyproject.toml, checked by ``lint-imports`` in CI) name every
module of daemon/: a module left out of them would be checked by nothing."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layered = next(c for c in config["contracts"] if c["type"] == "layers")
    return [m.strip() for layer in layered["layers"] for m in layer.split("|")]


def _top_level_modules() -> set[str]:
    """daemon's subpackages and modules, as the layers name them (daemon.x)."""
    found = set()
    for path in (ROOT / "daemon").iterdir():
        if path.name.startswith(("_", ".")) and path.name != "__main__.py":
            continue
        if path.suffix == ".py" or (path / "__init__.py").exists():
            found.add(f"daemon.{path.stem}")
    return found


def test_every_module_of_the_daemon_is_in_a_layer():
    assert _top_level_modules() - set(_layers()) == set()


def test_the_configuration_sits_below_every_adapter():
    layers = _layers()
    config = layers.index("daemon.config")
    for adapter in ("daemon.db", "daemon.mqtt", "daemon.http", "daemon.service"):
        assert layers.index(adapter) < config, adapter
