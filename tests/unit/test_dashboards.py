"""The Grafana dashboard and the Prometheus alerts name only metrics the daemon exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from daemon.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
FILES = sorted([*DEPLOY.glob("grafana/**/*.json"), *DEPLOY.glob("prometheus/*.yml")], key=str)
_NAME = re.compile(r"\bchargeflow_[a-z0-9_]+")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def exported() -> set[str]:
    """Every series name the daemon's registry can export, used labels or not."""
    names = set()
    for family in Metrics().registry.collect():
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
    return names


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_there_are_dashboards_and_alerts_to_check():
    assert any(f.suffix == ".json" for f in FILES)
    assert any(f.name == "alerts.yml" for f in FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_metric_a_deploy_file_names_is_exported(path):
    text = path.read_text()
    document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    named = {m for s in _strings(document) for m in _NAME.findall(s)}

    assert named - exported() == set()


def test_the_check_would_notice_a_renamed_metric():
    assert "chargeflow_messages_received_total" in exported()
    assert "chargeflow_messages_recieved_total" not in exported()


def test_every_reason_counter_has_a_series_from_start_up():
    """An alert on increase() never sees the first event of a series that appears at 1
    (deploy/prometheus/alerts_test.yml shows it): every label value is exported at 0."""
    from prometheus_client import generate_latest

    from daemon.metrics import DropReason
    from domain.errors import Reason

    text = generate_latest(Metrics().registry).decode()
    for reason in DropReason:
        assert f'chargeflow_messages_dropped_total{{reason="{reason}"}} 0.0' in text
    for code in Reason:
        assert f'chargeflow_messages_rejected_total{{reason="{code}"}} 0.0' in text
    assert "chargeflow_mqtt_failovers_total 0.0" in text
