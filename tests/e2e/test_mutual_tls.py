"""MQTT with mutual TLS: the repo's Mosquitto with a TLS listener that requires a client
certificate and takes the username from it (``use_identity_as_username``), as managed IoT
brokers authenticate devices and services. A test CA, a server certificate and client
certificates are made with openssl for each run."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from daemon.config import ConfigError, Settings
from daemon.devbroker import REPO_CONFIG, REPO_ROOT, free_port, start_broker
from daemon.simulate import json_payload
from tests.conftest import missing_service
from tests.e2e.helpers import PREFIX, running_daemon, settings_for, wait_until

pytestmark = pytest.mark.e2e


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass
class Pki:
    """A test CA and what it signed, in one directory."""

    root: Path

    def issue(self, name: str, *, server: bool = False) -> tuple[Path, Path]:
        key, csr, crt = (self.root / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
        _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name,
                 "-out", csr.name, "-subj", f"/CN={name}", cwd=self.root)  # fmt: skip
        ext = self.root / f"{name}.ext"
        ext.write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            if server
            else "extendedKeyUsage=clientAuth\n"
        )
        _openssl("x509", "-req", "-in", csr.name, "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", crt.name, "-extfile", ext.name,
                 cwd=self.root)  # fmt: skip
        return crt, key

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    if shutil.which("openssl") is None:
        missing_service("openssl (Debian's openssl package)")
    root = Path(tempfile.mkdtemp(prefix="chargeflow-pki-"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "2", "-subj", "/CN=ChargeFlow test CA", cwd=root)  # fmt: skip
    yield Pki(root)
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class TlsBroker:
    port: int  # TLS, client certificates required
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def tls_broker(pki: Pki) -> Iterator[TlsBroker]:
    """The repo's mosquitto.conf (ACLs, persistence) with its listener replaced by a TLS one
    that requires a certificate signed by the test CA and takes its CN as the username."""
    pki.issue("server", server=True)
    data = Path(tempfile.mkdtemp(prefix="chargeflow-mosquitto-tls-"))
    for name in ("ca.crt", "server.crt", "server.key"):
        shutil.copy(pki.root / name, data / name)
    port = free_port()
    text = REPO_CONFIG.read_text()
    text = text.replace("deploy/mosquitto/", f"{REPO_ROOT}/deploy/mosquitto/")
    text += (
        f"\n# TLS, mutual: as deploy/TLS.md\nlistener {port} 127.0.0.1\n"
        f"certfile {data}/server.crt\nkeyfile {data}/server.key\ncafile {data}/ca.crt\n"
        "require_certificate true\nuse_identity_as_username true\n"
    )
    # The repo's plain listener stays, on a port of its own (start_broker needs one to wait on).
    config = data / "source.conf"
    config.write_text(text)
    proc = start_broker(free_port(), data, config=config)
    try:
        yield TlsBroker(port, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(data, ignore_errors=True)


def _bike_client(pki: Pki, name: str | None, port: int) -> tuple[paho.Client, list[int]]:
    """A bike over TLS, on MQTT v5 (so that a refused publish is answered, not dropped); with
    ``name``, authenticated by a certificate whose CN is ``name``."""
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=f"tls-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv5,
    )
    context = ssl.create_default_context(cafile=str(pki.ca))
    if name is not None:
        crt, key = (pki.root / f"{name}.crt", pki.root / f"{name}.key")
        if not crt.exists():
            pki.issue(name)
        context.load_cert_chain(crt, key)
    client.tls_set_context(context)
    codes: list[int] = []
    client.on_publish = lambda _c, _u, _mid, reason, _p: codes.append(reason.value)
    return client, codes


def _ride(bike_id: str) -> list[tuple[str, bytes]]:
    session = str(uuid.uuid4())
    t0 = datetime.now(UTC) - timedelta(minutes=20)
    start = {"event": "ride_started", "session_id": session, "rider_id": "rider-tls",
             "occurred_at": t0.isoformat()}  # fmt: skip
    sample = {"telemetry_id": str(uuid.uuid4()), "session_id": session, "seq": 1,
              "emitted_at": (t0 + timedelta(seconds=5)).isoformat(), "energy_wh": 1234.5}  # fmt: skip
    end = {"event": "ride_ended", "session_id": session, "last_seq": 1,
           "occurred_at": (t0 + timedelta(minutes=10)).isoformat()}  # fmt: skip
    topic = f"{PREFIX}/bikes/{bike_id}"
    return [
        (f"{topic}/lifecycle", json_payload(start)),
        (f"{topic}/telemetry", json_payload(sample)),
        (f"{topic}/lifecycle", json_payload(end)),
    ]


def _connect_and_publish(client: paho.Client, port: int, messages: list[tuple[str, bytes]]) -> None:
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


def _daemon_on_mutual_tls(pki: Pki, broker: TlsBroker, database_url: str) -> Settings:
    """A daemon that authenticates to the TLS listener by its certificate (CN chargeflow-daemon)."""
    crt, key = pki.issue("chargeflow-daemon")
    return settings_for(
        database_url,
        f"mqtts://127.0.0.1:{broker.port}",
        mqtt_ca_file=pki.ca,
        mqtt_cert_file=crt,
        mqtt_key_file=key,
    )


async def test_a_bike_authenticated_by_its_certificate_is_ingested_and_billed_by_a_daemon_on_mutual_tls(
    pki, tls_broker, database_url, pool
):
    bike_id = f"bike-tls-{uuid.uuid4().hex[:6]}"
    settings = _daemon_on_mutual_tls(pki, tls_broker, database_url)
    async with running_daemon(settings):
        bike, codes = _bike_client(pki, bike_id, tls_broker.port)
        # The bike listens to its own billing topic (its certificate's CN is its username).
        bills: list[bytes] = []
        listener, _ = _bike_client(pki, bike_id, tls_broker.port)
        listener.on_message = lambda _c, _u, m: bills.append(m.payload)
        listener.connect("127.0.0.1", tls_broker.port)
        listener.subscribe(f"{PREFIX}/bikes/{bike_id}/billing", qos=1)
        listener.loop_start()
        try:
            await asyncio.sleep(0.5)
            await asyncio.to_thread(_connect_and_publish, bike, tls_broker.port, _ride(bike_id))
            await wait_until(lambda: bills, timeout=20, what="the bill on the bike's topic")
        finally:
            listener.disconnect()
            listener.loop_stop()
    assert codes == [0, 0, 0]
    assert b'"amount":"0.37"' in bills[0].replace(b" ", b"")
    energy = await pool.fetchval(
        "SELECT energy_wh FROM sessions WHERE bike_id = $1 AND state = 'finalized'", bike_id
    )
    assert str(energy) == "1234.5"


async def test_a_bikes_certificate_cannot_publish_under_another_bikes_topics(
    pki, tls_broker, database_url, pool
):
    thief, victim = f"bike-tls-{uuid.uuid4().hex[:6]}", f"bike-tls-{uuid.uuid4().hex[:6]}"
    settings = _daemon_on_mutual_tls(pki, tls_broker, database_url)
    async with running_daemon(settings) as daemon:
        client, codes = _bike_client(pki, thief, tls_broker.port)
        await asyncio.to_thread(_connect_and_publish, client, tls_broker.port, _ride(victim))
        await asyncio.sleep(1.0)
        received = daemon.metrics.received.labels("lifecycle")._value.get()
    assert codes == [0x87, 0x87, 0x87]  # Not authorized, for each of the three
    assert received == 0
    stored = await pool.fetchval(
        "SELECT (SELECT count(*) FROM sessions WHERE bike_id = $1)"
        " + (SELECT count(*) FROM rejected_messages WHERE bike_id = $1)",
        victim,
    )
    assert stored == 0


def _tls_session(client: paho.Client, port: int) -> None:
    """Connect and read until the broker answers; TLS 1.3 reports a refused certificate on the
    first read after the handshake."""
    client.connect("127.0.0.1", port)
    for _ in range(20):
        if client.loop(timeout=0.1) != paho.MQTT_ERR_SUCCESS:
            raise OSError("the broker closed the connection")


def test_a_client_without_a_certificate_is_refused(pki, tls_broker):
    client, _ = _bike_client(pki, None, tls_broker.port)
    with pytest.raises((ssl.SSLError, OSError)):
        _tls_session(client, tls_broker.port)
    assert not client.is_connected()


def test_a_daemon_certificate_without_its_key_is_refused_at_start_up_in_one_line(pki, database_url):
    daemon_crt, _ = pki.issue("chargeflow-daemon")
    _, other_key = pki.issue("someone-else")
    settings = settings_for(
        database_url,
        "mqtts://127.0.0.1:8883",
        mqtt_ca_file=pki.ca,
        mqtt_cert_file=daemon_crt,
        mqtt_key_file=other_key,
    )
    with pytest.raises(ConfigError, match="the private key does not belong to the certificate"):
        settings.tls_context()
    unreadable = settings.model_copy(update={"mqtt_key_file": pki.root / "missing.key"})
    with pytest.raises(ConfigError, match="No such file"):
        unreadable.tls_context()
