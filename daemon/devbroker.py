"""Start a Mosquitto with the repository's mosquitto.conf on a chosen port (tests, local runs).

The config is used as it is, but for three lines: the listener (port, loopback only), the
persistence directory, and the password/ACL paths made absolute so any working directory works.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["REPO_CONFIG", "free_port", "render_config", "start_broker"]

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_CONFIG = REPO_ROOT / "mosquitto.conf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render_config(text: str, port: int, data_dir: Path, root: Path = REPO_ROOT) -> str:
    def rewrite(line: str) -> str:
        key, _, value = line.partition(" ")
        if key == "listener":
            return f"listener {port} 127.0.0.1"
        if key == "persistence_location":
            return f"persistence_location {data_dir}/"
        if key in {"password_file", "acl_file"} and not value.startswith("/"):
            return f"{key} {root / value.strip()}"
        return line

    return "\n".join(rewrite(line) for line in text.splitlines()) + "\n"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_broker(
    port: int, data_dir: Path, config: Path = REPO_CONFIG, log_file: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start mosquitto in the background and wait until it listens."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    data_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # Run as root, mosquitto drops to the mosquitto user before it writes its database.
        shutil.chown(data_dir, user="mosquitto")
        data_dir.chmod(0o755)
    conf = data_dir / "mosquitto.conf"
    conf.write_text(render_config(config.read_text(), port, data_dir))
    out = open(log_file or data_dir / "mosquitto.log", "ab")  # noqa: SIM115 - owned by Popen
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=out)
    deadline = time.monotonic() + 10
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"mosquitto did not start on port {port}; see {out.name}")
        time.sleep(0.05)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=1884)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".mosquitto-data")
    args = parser.parse_args()
    if _listening(args.port):
        print(f"a broker already listens on 127.0.0.1:{args.port}")
        return
    proc = start_broker(args.port, args.data_dir.resolve())
    print(f"mosquitto (repo config) on 127.0.0.1:{args.port}, pid {proc.pid}")


if __name__ == "__main__":
    main()
