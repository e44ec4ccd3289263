"""Logs: structlog renders JSON lines in production and never carries credentials."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from daemon.config import Settings
from daemon.devbroker import free_port
from daemon.logs import configure_logging
from daemon.metrics import Metrics
from daemon.mqtt.connection import MqttLink
from daemon.mqtt.delivery import Delivery

PASSWORD = "s3cret-pw"


async def _ignore(_: Delivery) -> None:
    return None


def _reconnect_warnings(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Matched by shape, not wording: the message differs for "never connected" and "lost".
    return [e for e in events if e.get("log_level") == "warning" and "retry_in_s" in e]


@pytest.fixture
def broker_port() -> int:
    return free_port()  # nothing listens there: every connect attempt is refused


@pytest.fixture(params=["5", "3.1.1"])
async def reconnect_log(broker_port: int, request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """What the link (at either protocol level) to an unreachable broker logs over its first
    two reconnect attempts."""
    settings = Settings(
        mqtt_url=f"mqtt://chargeflow-daemon:{PASSWORD}@127.0.0.1:{broker_port}",
        mqtt_protocol=request.param,
    )
    link = MqttLink(settings, Metrics(), deliver=_ignore)
    with structlog.testing.capture_logs() as events:
        task = asyncio.create_task(link.run())
        try:
            async with asyncio.timeout(5):
                # capture_logs fills a plain list, which has nothing to await on: poll it.
                while len(_reconnect_warnings(events)) < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return events


async def test_a_refused_connection_is_logged_as_a_reconnect_warning(reconnect_log):
    warning = _reconnect_warnings(reconnect_log)[0]

    assert 0.25 <= warning["retry_in_s"] <= 0.5  # half a second, less up to half in jitter
    assert "refused" in warning["error"].lower()


async def test_reconnect_attempts_back_off(reconnect_log):
    delays = [e["retry_in_s"] for e in _reconnect_warnings(reconnect_log)]

    # Nominally 0.5 s, then 1 s, each less up to half in jitter (daemon/backoff.py).
    assert 0.25 <= delays[0] <= 0.5 <= delays[1] <= 1.0


async def test_a_reconnect_warning_shows_the_broker_without_its_password(
    reconnect_log, broker_port
):
    warning = _reconnect_warnings(reconnect_log)[0]

    assert warning["broker"] == f"mqtt://chargeflow-daemon:***@127.0.0.1:{broker_port}"


async def test_no_captured_event_ever_contains_the_password(reconnect_log):
    assert reconnect_log
    for event in reconnect_log:
        assert PASSWORD not in repr(event)


# -- configure_logging -----------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.usefixtures("restore_logging")
def test_json_format_renders_one_json_object_per_line(capsys):
    configure_logging("json")
    log = structlog.get_logger("test")

    log.info("session finalized", bike_id="bike-1", energy_wh="12.5")
    log.warning("mqtt connection lost; reconnecting", retry_in_s=0.5)

    lines = _json_lines(capsys.readouterr().err)
    assert [line["event"] for line in lines] == [
        "session finalized",
        "mqtt connection lost; reconnecting",
    ]
    assert lines[0]["bike_id"] == "bike-1"
    assert lines[0]["level"] == "info"
    assert lines[1]["level"] == "warning"
    assert lines[0]["timestamp"].endswith("Z")


@pytest.mark.usefixtures("restore_logging")
def test_json_format_binds_context_variables(capsys):
    configure_logging("json")
    log = structlog.get_logger("test")

    with structlog.contextvars.bound_contextvars(session_id="s-1"):
        log.info("sample accepted")

    (line,) = _json_lines(capsys.readouterr().err)
    assert line["session_id"] == "s-1"


@pytest.mark.usefixtures("restore_logging")
def test_json_format_drops_events_below_the_level(capsys):
    configure_logging("json", level="warning")
    log = structlog.get_logger("test")

    log.info("chatty")
    log.warning("worth reading")

    assert [line["event"] for line in _json_lines(capsys.readouterr().err)] == ["worth reading"]


@pytest.mark.usefixtures("restore_logging")
def test_json_format_renders_stdlib_warnings_as_json_lines_too(capsys):
    configure_logging("json")

    logging.getLogger("mqtt").warning("broker said %s", "goodbye")

    (line,) = _json_lines(capsys.readouterr().err)
    assert line["event"] == "broker said goodbye"
    assert line["level"] == "warning"
