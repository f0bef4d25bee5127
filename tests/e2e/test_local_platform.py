"""The README's `up` command: the whole platform on embedded services, from nothing to an image and back; reached
from another machine by this one's address, a quiet start, an admin key made once, two stacks side by side."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
from PIL import Image

from api.infra.hosts import REFUSAL
from ops.embedded import free_port, wait_until

BANNER = "klein-serve is up at"
QUIET = 16  # at most this many lines before the banner, however much the services print


@contextmanager
def klein_up(data: Path, port: int, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`klein up` running (its terminal in <data>.out) until the banner; stopped with Ctrl-C at the end."""
    out = data.with_suffix(".out")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLEIN_")}
    with open(out, "wb") as terminal:
        up = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "up", "--data-dir", str(data), "--port", str(port), *args],
            stdout=terminal,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_until(lambda: "Ctrl-C stops everything" in out.read_text() or up.poll() is not None, 300, "up", out)
        assert up.poll() is None, out.read_text()
        yield up, out
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    assert up.returncode == 0, out.read_text()[-3000:]


def worker_ports(terminal: str) -> list[int]:
    (ports,) = re.findall(r"GPU workers on 127\.0\.0\.1:([\d, ]+),", terminal)
    return [int(p) for p in ports.split(", ")]


def this_machines_address() -> str:
    return next(
        a.address
        for addresses in psutil.net_if_addrs().values()
        for a in addresses
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    )


def test_klein_up_serves_an_image_and_stops_cleanly(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "data"
    with klein_up(data, port, "--gpus", "2", "--host", "0.0.0.0") as (up, out):
        terminal = out.read_text()
        assert "TINY RANDOM-WEIGHTS" in terminal
        assert len(terminal.split(BANNER)[0].splitlines()) <= QUIET, terminal
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 5  # 2 GPU workers, the webhook worker, API, SeaweedFS (PostgreSQL, Valkey detached)
        workers = [c for c in children if "worker.app" in c.cmdline()]
        assert sorted(c.environ().get("CUDA_VISIBLE_DEVICES") for c in workers) == ["0", "1"], "one device each"
        ports = worker_ports(terminal)
        for metrics_port in ports:  # each GPU worker's own /metrics, its pipeline loaded
            scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
            ready = [line for line in scraped.splitlines() if line.startswith("klein_worker_pipeline_state{")]
            assert any('klein_worker_pipeline_state="ready"' in line and line.endswith(" 1.0") for line in ready), ready
        # The workers' /metrics have no token: `up` binds them to loopback only.
        listening = {(c.laddr.ip, c.laddr.port) for w in workers for c in w.net_connections() if c.status == "LISTEN"}
        assert {port for ip, port in listening if ip != "127.0.0.1"} & set(ports) == set(), listening

        key = (data / "api-key").read_text().strip()
        admin_key = (data / "admin-key").read_text().strip()
        assert key in terminal and admin_key in terminal  # shown on the terminal, once …
        detail = (data / "logs" / "up.log").read_text()
        assert "initdb" in detail and "Running upgrade" in detail  # … the services' detail in the named log,
        assert key not in detail and admin_key not in detail  # which never holds a key

        # Another machine reaches it by this machine's address; a forged Host is refused, saying what to set.
        address = this_machines_address()
        url = f"http://{address}:{port}"
        headers = {"apikey": key, "Model": "flux-klein-4b", "Try-Sync": "true"}
        assert httpx.get(f"{url}/").status_code == 200
        forged = httpx.get(f"{url}/v1/predictions", headers={"apikey": key, "Host": "evil.example"})
        assert (forged.status_code, forged.text) == (400, REFUSAL)
        token = (data / "metrics-token").read_text().strip()  # /metrics is closed by default
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(f"{url}/admin/v1/tenants", headers={"X-Admin-Key": admin_key}).status_code == 200

        body = httpx.post(f"{url}/v1/predictions", headers=headers, json={"input": {"prompt": "x"}}, timeout=180).json()
        assert body["get_url"].startswith(f"{url}/"), body  # our URLs carry the address it was reached by
        deadline = time.monotonic() + 300  # a busy machine may outlast the Try-Sync wait (then 201): follow it
        while body["status"] not in ("succeeded", "failed", "canceled") and time.monotonic() < deadline:
            time.sleep(0.2)
            body = httpx.get(body["get_url"], headers={"apikey": key}).json()
        assert body["status"] == "succeeded", body
        image = httpx.get(body["generation_url"], headers={"apikey": key})
        assert Image.open(io.BytesIO(image.content)).size == (1024, 1024)
        models = httpx.get(f"{url}/v1/models", headers={"apikey": key}).json()
        assert models["data"][0]["weights"]["random_weights"] is True

        # A second stack on this machine: its own ports for everything it starts, both serving metrics; its API
        # two processes on one port, whose /metrics answer for both.
        second, second_port = tmp_path / "second", free_port()
        with klein_up(second, second_port, "--api-processes", "2") as (second_up, second_out):
            second_ports = worker_ports(second_out.read_text())
            assert set(second_ports).isdisjoint(ports)
            for metrics_port in (*ports, *second_ports):
                assert "klein_worker_info" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
            (api,) = [p for p in psutil.Process(second_up.pid).children(recursive=True) if "uvicorn" in p.cmdline()]
            served_by = [c for c in api.children() if "spawn_main" in " ".join(c.cmdline())]
            assert len(served_by) == 2, api.children()  # uvicorn's supervisor and its two processes
            second_url, second_key = f"http://127.0.0.1:{second_port}", (second / "api-key").read_text().strip()
            for _ in range(20):  # new connections: the kernel spreads them over both
                assert httpx.get(f"{second_url}/v1/models", headers={"apikey": second_key}).status_code == 200
            bearer = {"Authorization": f"Bearer {(second / 'metrics-token').read_text().strip()}"}
            scraped = httpx.get(f"{second_url}/metrics", headers=bearer).text
            (count,) = re.findall(
                r'klein_http_requests_total\{[^}]*route="/v1/models"[^}]*status="200"\} (\S+)', scraped
            )
            assert float(count) == 20
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    # Nothing left running that holds the data folder (PostgreSQL, Valkey, SeaweedFS all stopped).
    holders = [
        p.info for p in psutil.process_iter(["pid", "cmdline"]) if str(data) in " ".join(p.info["cmdline"] or [])
    ]
    assert holders == []

    # A warm start: as quiet, the same keys, the admin key not shown again.
    with klein_up(data, port) as (_, out):
        terminal = out.read_text().split(BANNER)[0]
        assert len(terminal.splitlines()) <= QUIET, terminal
        assert (data / "admin-key").read_text().strip() == admin_key and admin_key not in out.read_text()
        assert (data / "api-key").read_text().strip() == key


def test_klein_up_with_a_certificate_serves_https_itself(tmp_path: Path) -> None:
    """`--tls-cert`/`--tls-key`: the API answers https (a client trusting the CA submits and downloads), plain http
    is not served on that port, and the banner and the curl line say https."""
    from tests.e2e.test_redis_deployments import make_certificates

    certificates = make_certificates(tmp_path / "tls")
    port, data = free_port(), tmp_path / "data"
    tls = ["--tls-cert", str(certificates["server.crt"]), "--tls-key", str(certificates["server.key"])]
    with klein_up(data, port, *tls) as (_, out):
        terminal = out.read_text()
        assert f"{BANNER} https://127.0.0.1:{port}" in terminal
        assert f"curl -X POST https://127.0.0.1:{port}/v1/predictions" in terminal
        key = (data / "api-key").read_text().strip()
        with httpx.Client(
            base_url=f"https://127.0.0.1:{port}", verify=str(certificates["ca.crt"]), timeout=120
        ) as http:
            answer = http.post(
                "/v1/predictions",
                headers={"apikey": key, "Model": "flux-klein-4b", "Try-Sync": "true"},
                json={"input": {"prompt": "a red fox in snow", "aspect_ratio": "1:1"}},
            ).json()
            assert answer["status"] == "succeeded" and answer["generation_url"].startswith("https://")
            image = http.get(answer["generation_url"], headers={"apikey": key})
            assert Image.open(io.BytesIO(image.content)).size == (1024, 1024)
        try:
            plain: httpx.Response | None = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        except httpx.HTTPError:
            plain = None
        assert plain is None or plain.status_code >= 400  # uvicorn answers plain http on a TLS port with nothing
