"""The grammar of topic names (MQTT 3.1.1 and 5, §4.7): what one topic level may hold.

The configuration checks the topic prefix with it when the daemon starts, and the MQTT
adapter (``daemon.mqtt.topics``) every topic it builds; one rule for both, in a module that
depends on nothing, so that the configuration need not import an adapter.
"""

from __future__ import annotations

import re

__all__ = ["LEVEL", "check_prefix"]

# One topic level: no wildcards, no separator, no NUL (MQTT 3.1.1 §4.7.3, MQTT 5 §4.7.3).
LEVEL = re.compile(r"[^#+/\x00]+")


def check_prefix(prefix: str) -> None:
    """Raise ValueError, saying what is wrong, unless ``prefix`` is one or more topic levels."""
    if not prefix or not all(LEVEL.fullmatch(level) for level in prefix.split("/")):
        raise ValueError(
            f"topic prefix {prefix!r} must be topic levels without wildcards, "
            "empty levels or NUL, e.g. chargeflow/v1"
        )
