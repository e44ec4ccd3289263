"""docker-compose.yml, read as an operator would run it: each profile's daemons are settings the
daemon accepts, on a broker the file starts, with a home each (no Docker needed to check)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from daemon.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
NATS_CONF = (ROOT / "deploy" / "nats" / "nats.conf").read_text()


def _daemons(profile: str | None) -> dict[str, dict]:
    return {
        name: service
        for name, service in SERVICES.items()
        if "CHARGEFLOW_MQTT_URL" in service.get("environment", {})
        and (service.get("profiles") or [None])[0] == profile
    }


@pytest.mark.parametrize("profile", [None, "nats"])
def test_each_profiles_daemons_are_valid_settings_with_one_home_each(profile):
    daemons = _daemons(profile)
    assert len(daemons) >= 2
    settings = {name: load_settings(s["environment"], env_file=None) for name, s in daemons.items()}
    partitions = sorted(s.partition for s in settings.values())
    assert partitions == [f"{i}/{len(daemons)}" for i in range(len(daemons))]
    assert len({s.client_id for s in settings.values()}) == len(daemons)
    for s in settings.values():
        hosts = {b.host for b in s.brokers}
        started = {
            h for h in hosts if h in SERVICES and profile in (SERVICES[h].get("profiles") or [None])
        }
        assert started == hosts, f"{s.brokers} names brokers this profile does not start"


def test_the_nats_daemons_are_given_every_node_each_starting_on_another():
    nodes = {n for n, s in SERVICES.items() if s.get("image", "").startswith("nats")}
    assert len(nodes) == 3
    firsts = []
    for service in _daemons("nats").values():
        settings = load_settings(service["environment"], env_file=None)
        assert {b.host for b in settings.brokers} == nodes
        assert settings.mqtt_protocol == "3.1.1"  # NATS speaks nothing newer
        assert settings.subscription == "one"  # one JetStream consumer: publish order kept
        assert all(b.username == "chargeflow-daemon" for b in settings.brokers)
        firsts.append(settings.brokers[0].host)
    assert len(set(firsts)) == len(firsts)


def test_the_nats_grace_period_outlasts_its_redelivery_wait():
    """A message in flight on a connection that died comes back after NATS's ack_wait, once
    the cluster has new leaders: the daemons' grace period must leave room for both."""
    ack_wait = float(re.search(r'ack_wait: "(\d+)s"', NATS_CONF).group(1))  # type: ignore[union-attr]
    for service in _daemons("nats").values():
        grace = load_settings(service["environment"], env_file=None).finalize_grace_s
        assert grace >= ack_wait + 20


def test_the_nats_config_lets_the_daemon_read_what_it_subscribes_to_and_write_its_answers():
    daemon = NATS_CONF[NATS_CONF.index("user: chargeflow-daemon") :]
    daemon = daemon[: daemon.index("}\n    }")]
    for subject in ("chargeflow.v1.bikes.*.*", "$MQTT.sub.>", "chargeflow.v1.bikes.*.billing",
                    "chargeflow.v1.bikes.*.rejections", "chargeflow.v1.bikes.*.sessions.finalized"):  # fmt: skip
        assert f'"{subject}"' in daemon
    assert "stream_replicas: 3" in NATS_CONF and "consumer_replicas: 3" in NATS_CONF
