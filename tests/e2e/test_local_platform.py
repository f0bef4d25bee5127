"""The README's `up` command: the whole platform on embedded services, from nothing to an image and back."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from PIL import Image

from ops.embedded import free_port, wait_until


def test_klein_up_serves_an_image_and_stops_cleanly(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "data"
    log = tmp_path / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLEIN_")}
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "up", "--data-dir", str(data), "--port", str(port), "--gpus", "2"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: "is up at" in log.read_text() or up.poll() is not None, 240, "klein up", log)
        assert up.poll() is None, log.read_text()
        assert "TINY RANDOM-WEIGHTS" in log.read_text()
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 5  # 2 GPU workers, the webhook worker, API, SeaweedFS (PostgreSQL, Valkey detached)
        workers = [c for c in children if "worker.app" in c.cmdline()]
        assert sorted(c.environ().get("CUDA_VISIBLE_DEVICES") for c in workers) == ["0", "1"], "one device each"
        for metrics_port in (29101, 29102):  # each GPU worker's own /metrics, its pipeline loaded
            scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
            ready = r'klein_worker_pipeline_state\{model="[a-z0-9.-]+",klein_worker_pipeline_state="ready"\} 1\.0'
            assert re.search(ready, scraped), scraped
        # The workers' /metrics have no token: `up` binds them to loopback only.
        listening = {(c.laddr.ip, c.laddr.port) for w in workers for c in w.net_connections() if c.status == "LISTEN"}
        assert {port for ip, port in listening if ip != "127.0.0.1"} & {29101, 29102} == set(), listening

        key = (data / "api-key").read_text().strip()
        token = (data / "metrics-token").read_text().strip()  # /metrics is closed by default
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert key in log.read_text()
        headers = {"apikey": key, "Model": "flux-klein-4b", "Try-Sync": "true"}
        body = httpx.post(f"{url}/v1/predictions", headers=headers, json={"input": {"prompt": "x"}}, timeout=180).json()
        deadline = time.monotonic() + 300  # a busy machine may outlast the Try-Sync wait (then 201): follow it
        while body["status"] not in ("succeeded", "failed", "canceled") and time.monotonic() < deadline:
            time.sleep(0.2)
            body = httpx.get(body["get_url"], headers={"apikey": key}).json()
        assert body["status"] == "succeeded", body
        image = httpx.get(body["generation_url"], headers={"apikey": key})
        assert Image.open(io.BytesIO(image.content)).size == (1024, 1024)
        models = httpx.get(f"{url}/v1/models", headers={"apikey": key}).json()
        assert models["data"][0]["weights"]["random_weights"] is True
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    assert up.returncode == 0, log.read_text()[-3000:]
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    # Nothing left running that holds the data folder (PostgreSQL, Valkey, SeaweedFS all stopped).
    holders = [
        p.info for p in psutil.process_iter(["pid", "cmdline"]) if str(data) in " ".join(p.info["cmdline"] or [])
    ]
    assert holders == []
