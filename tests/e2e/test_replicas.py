"""Several API processes as one platform: what one replica leaves behind when it dies, another picks up."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import itertools
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from httpx_sse import connect_sse
from sqlalchemy import func, select, update

from core import lifecycle
from core.ids import new_id
from core.tables import predictions
from core.tenants import IssuedKey
from ops.embedded import free_port, start_api, wait_until
from tests.conftest import Stack, make_tenant
from tests.deploy.test_deploy_manifests import ROOT
from tests.images import data_uri, picture


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An endpoint that accepts connections and never answers: storage stalled mid-request."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_a_replica_killed_between_reserving_a_key_and_storing_its_prediction_does_not_hold_the_key(
    stack: Stack, tenant: IssuedKey, black_hole: str, tmp_path: Path
) -> None:
    # A replica whose storage stalls while it stores a reference image: it has reserved the key, nothing more.
    doomed, doomed_url = start_api(
        stack.env | {"KLEIN_S3_ENDPOINT_URL": black_hole, "KLEIN_IDEMPOTENCY_LEASE_S": "2"},
        tmp_path / "doomed.log",
        ready_path="/healthz",
    )
    headers = {"apikey": tenant.key, "Model": "flux-klein-4b", "Idempotency-Key": "order-7"}
    body = {"input": {"prompt": "a kite", "images": [data_uri(picture())], "seed": 5}}

    def submit_to_the_doomed() -> None:
        with contextlib.suppress(httpx.HTTPError):  # it is killed mid-request
            httpx.post(f"{doomed_url}/v1/predictions", headers=headers, json=body, timeout=60)

    hanging = threading.Thread(target=submit_to_the_doomed, daemon=True)
    broker = redis.Redis.from_url(stack.env["KLEIN_REDIS_URL"])
    digest = hashlib.sha256(b"order-7").hexdigest()
    reservation = f"{stack.env['KLEIN_QUEUE_NAME']}:{{{tenant.tenant_id}}}:idempotency:{digest}"
    try:
        hanging.start()
        wait_until(lambda: broker.exists(reservation) == 1, 60, "the key reserved by the doomed replica")
        time.sleep(3)  # longer than the lease: the live holder renews it (lease / 3)
        assert broker.exists(reservation) == 1, "a live holder keeps its lease"
        assert doomed.process is not None
        doomed.process.kill()  # SIGKILL mid-request: no cleanup runs
    finally:
        doomed.stop()

    # The retry, on the other replica, creates the prediction once the lease lapses (not 24 h of 409s).
    started = time.monotonic()
    retry = httpx.post(f"{stack.api_url}/v1/predictions", headers=headers, json=body, timeout=60)
    assert retry.status_code == 201, retry.text
    assert time.monotonic() - started < 2 + 5
    again = httpx.post(f"{stack.api_url}/v1/predictions", headers=headers, json=body, timeout=60)
    assert again.json()["id"] == retry.json()["id"]  # and from then on the key names it
    assert broker.ttl(reservation) > 3600
    with stack.engine.connect() as conn:
        count = select(func.count()).select_from(predictions).where(predictions.c.tenant_id == tenant.tenant_id)
        assert conn.execute(count).scalar_one() == 1


def test_a_poller_through_two_replicas_never_sees_its_queue_position_go_back(
    stack: Stack, tenant: IssuedKey, tmp_path: Path
) -> None:
    other, other_url = start_api(stack.env, tmp_path / "second-replica.log")
    ids = [new_id() for _ in range(8)]
    params = {"prompt": "q", "width": 256, "height": 256, "num_inference_steps": 4, "guidance_scale": 1.0}
    for prediction_id in ids:  # stored (one transaction each: one created_at each), not enqueued: no worker takes them
        with stack.engine.begin() as conn:
            conn.execute(
                lifecycle.create(
                    prediction_id=prediction_id,
                    tenant_id=tenant.tenant_id,
                    api_key_id=tenant.key_id,
                    model="flux-klein-4b",
                    input={"prompt": "q"},
                    params=params | {"seed": 1, "output_format": "png", "output_quality": 80},
                )
            )
    last = ids[-1]
    seen: list[int] = []
    try:
        with httpx.Client(headers={"apikey": tenant.key}, timeout=30) as http:
            replicas = [stack.api_url, other_url]
            for ahead in ids[:-1]:  # those ahead leave one by one while the client polls through both replicas
                with stack.engine.begin() as conn:
                    conn.execute(update(predictions).where(predictions.c.id == ahead).values(status="canceled"))
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    url = replicas[len(seen) % 2]
                    seen.append(http.get(f"{url}/v1/predictions/status/{last}").json()["queue_position"])
    finally:
        other.stop()
        with stack.engine.begin() as conn:
            conn.execute(update(predictions).where(predictions.c.id.in_(ids)).values(status="canceled"))
    backwards = [(a, b) for a, b in itertools.pairwise(seen) if b > a]
    assert backwards == [], f"{len(backwards)} of {len(seen)} reads went back: {backwards[:5]}"
    assert seen[-1] < seen[0]  # it did move forward


@pytest.fixture(scope="module")
def replicas(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str, Path]]]:
    """The session's API and a second replica on the same platform: (url, log) each."""
    logs = tmp_path_factory.mktemp("replicas")
    second, second_url = start_api(stack.env, logs / "api-2.log")
    yield [(stack.api_url, stack.logs / "api.log"), (second_url, logs / "api-2.log")]
    second.stop()


def _servers(shipped: str, prefix: str, replicas: list[tuple[str, Path]], port: int) -> str:
    """The shipped config with the test's replicas for api-1 and api-2, listening on `port`."""
    for n, (url, _) in enumerate(replicas, start=1):
        shipped = shipped.replace(f"{prefix}api-{n}:8000", f"{prefix}{url.removeprefix('http://')}")
    return shipped.replace("bind :8080", f"bind 127.0.0.1:{port}").replace("listen 8080;", f"listen 127.0.0.1:{port};")


@contextlib.contextmanager
def proxy(kind: str, replicas: list[tuple[str, Path]], folder: Path) -> Iterator[str]:
    """Debian's haproxy or nginx in front of the replicas, with the shipped config (deploy/proxy/)."""
    port = free_port()
    shipped = ROOT / "deploy" / "proxy" / ("haproxy.cfg" if kind == "haproxy" else "nginx.conf")
    if kind == "haproxy":
        config = folder / "haproxy.cfg"
        text = _servers(shipped.read_text(), "", replicas, port)
        config.write_text(text.replace("global\n", f"global\n  stats socket {folder / 'haproxy.sock'}\n", 1))
        args = [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(config)]
    else:
        (folder / "klein.conf").write_text(_servers(shipped.read_text(), "", replicas, port))
        (folder / "nginx.conf").write_text(
            f"pid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'};\nevents {{}}\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {folder};\n  proxy_temp_path {folder};\n"
            f"  include {folder / 'klein.conf'};\n}}\n"
        )
        args = [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(folder / "nginx.conf"), "-g", "daemon off;"]
    log = folder / f"{kind}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{url}/healthz"), 30, kind, log)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _haproxy_servers(folder: Path) -> dict[str, str]:
    """Each backend server's state, from haproxy's stats socket (`show stat`)."""
    with socket.socket(socket.AF_UNIX) as control:
        control.connect(str(folder / "haproxy.sock"))
        control.sendall(b"show stat\n")
        answer = b"".join(iter(lambda: control.recv(65536), b"")).decode()
    rows = [line.split(",") for line in answer.splitlines() if line.startswith("klein_api,api-")]
    return {row[1]: row[17] for row in rows}


def _stream_requests(log: Path, prediction_id: str) -> int:
    lines = [orjson.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return sum(
        1
        for line in lines
        if line.get("event") == "request"
        and line.get("prediction_id") == prediction_id
        and str(line.get("route", "")).endswith("/stream")
    )


@pytest.mark.parametrize("kind", ["haproxy", "nginx"])
def test_two_replicas_behind_a_real_load_balancer_behave_as_one(
    kind: str, stack: Stack, replicas: list[tuple[str, Path]], tmp_path: Path
) -> None:
    tenant = make_tenant(stack.engine)
    with proxy(kind, replicas, tmp_path) as url:
        if kind == "haproxy":  # its checks send an allowed Host: both replicas up
            wait_until(lambda: set(_haproxy_servers(tmp_path).values()) == {"UP"}, 30, "both replicas up")
        fresh = {"apikey": tenant.key}  # a new connection per request: the balancer spreads them
        model = fresh | {"Model": "flux-klein-4b"}

        # Try-Sync through the proxy; the URLs we hand out carry the Host the client used.
        done = httpx.post(
            f"{url}/v1/predictions",
            headers=model | {"Try-Sync": "true"},
            json={"input": {"prompt": "a kite", "num_inference_steps": 2}},
            timeout=90,
        )
        assert done.status_code in (200, 201), done.text
        assert done.json()["get_url"].startswith(f"{url}/")

        # The same Idempotency-Key at once on both replicas: one prediction.
        keyed = model | {"Idempotency-Key": f"proxy-{kind}"}
        body = {"input": {"prompt": "same", "num_inference_steps": 2}}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(lambda _: httpx.post(f"{url}/v1/predictions", headers=keyed, json=body, timeout=60), range(4))
            )
        assert {a.status_code for a in answers} <= {200, 201} and len({a.json()["id"] for a in answers}) == 1

        # A stream dropped after its first step resumes on the other replica, missing and repeating nothing.
        slow = httpx.post(
            f"{url}/v1/predictions", headers=model, json={"input": {"prompt": "stream", "num_inference_steps": 6}}
        ).json()
        stream = f"{url}/v1/predictions/{slow['id']}/stream"
        first = _events(stream, fresh, stop_after="progress")
        rest = _events(stream, fresh | {"Last-Event-ID": first[-1].id})
        steps = [orjson.loads(e.data)["step"] for e in first + rest if e.event == "progress"]
        assert steps == [1, 2, 3, 4, 5, 6] and rest[-1].event == "done"

        # A replica logs a request when its response ends: the dropped stream's, once it sees the client gone.
        def counts() -> list[int]:
            return [_stream_requests(log, slow["id"]) for _, log in replicas]

        wait_until(lambda: sum(counts()) == 2, 30, "both streams' request log lines")
        assert counts() == [1, 1], "one on each replica"

        # Limits are the tenant's across replicas: its 6 requests a minute, however they are spread.
        limited = {"apikey": make_tenant(stack.engine, rate_limit_per_minute=6).key}
        statuses = [httpx.get(f"{url}/v1/keys", headers=limited).status_code for _ in range(10)]
        assert statuses == [200] * 6 + [429] * 4, statuses


def _events(url: str, headers: dict[str, str], stop_after: str | None = None) -> list[Any]:
    events = []
    with httpx.Client(timeout=60) as http, connect_sse(http, "GET", url, headers=headers) as source:
        for event in source.iter_sse():
            events.append(event)
            if event.event in ("done", stop_after):
                break
    return events
