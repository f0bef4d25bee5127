"""What an operator sees, on the real stack: the API's and a worker's /metrics (parsed as Prometheus parses
them) moving as predictions run and fail, multiprocess mode, and the JSON log lines with their bound fields."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from platform import python_version
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core import lifecycle
from core.ids import new_id
from core.tenants import IssuedKey
from models.klein import KleinInput
from ops.embedded import Service, free_port, start_api, wait_until, worker_service
from tests.conftest import Stack, make_tenant
from tests.e2e.test_worker import poison_prediction, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@pytest.fixture(scope="module")
def logged_api(stack: Stack) -> Iterator[str]:
    """An API of its own, logging as `klein up` starts it with JSON logs (the access log on by default): its
    whole log, start-up included, is read."""
    api, url = start_api(stack.env | {"KLEIN_LOG_FORMAT": "json"}, stack.logs / "api-access.log")
    yield url
    api.stop()


def test_api_metrics_move_as_predictions_run_and_are_refused(stack: Stack, client: httpx.Client) -> None:
    before = scrape(f"{stack.api_url}/metrics")
    accepted = client.post(
        "/v1/predictions", headers={"Model": "flux-klein-4b", "Try-Sync": "true"}, json={"input": {"prompt": "m"}}
    )
    assert accepted.status_code == 200
    invalid = client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json={"input": {"prompt": ""}})
    assert invalid.status_code == 422
    limited = make_tenant(stack.engine, rate_limit_per_minute=1)
    with httpx.Client(base_url=stack.api_url, headers={"apikey": limited.key, "Model": "flux-klein-4b"}) as other:
        answers = [other.post("/v1/predictions", json={"input": {"prompt": "r"}}).status_code for _ in range(2)]
    assert answers == [201, 429]
    client.get(f"/v1/predictions/status/{accepted.json()['id']}")
    after = scrape(f"{stack.api_url}/metrics")

    route = {"route": "/v1/predictions", "method": "POST", "dialect": "pruna"}
    assert value(after, "klein_http_requests_total", **route, status="200") == (
        value(before, "klein_http_requests_total", **route, status="200") + 1
    )
    moved = {
        reason: value(after, "klein_submits_total", dialect="pruna", outcome="refused", reason=reason)
        - value(before, "klein_submits_total", dialect="pruna", outcome="refused", reason=reason)
        for reason in ("invalid", "rate_limited")
    }
    assert moved == {"invalid": 1, "rate_limited": 1}
    assert value(after, "klein_submits_total", dialect="pruna", outcome="accepted", reason="") >= 2
    latency = "klein_http_request_seconds_count"
    assert value(after, latency, **route) >= value(before, latency, **route) + 3
    status_route = {"route": "/v1/predictions/status/{prediction_id}", "method": "GET", "dialect": "pruna"}
    assert value(after, "klein_http_requests_total", **status_route, status="200") >= 1, "templates, not raw paths"
    assert not any(accepted.json()["id"] in str(labels) for _, labels in after)
    for priority in ("0", "3", "6", "8", "9"):  # per served model: the session's one
        assert ("klein_queue_depth", (("model", "flux-klein-4b"), ("priority", priority))) in after
        assert ("klein_queue_oldest_age_seconds", (("model", "flux-klein-4b"), ("priority", priority))) in after
    assert value(after, "klein_live_workers", model="flux-klein-4b") >= 1
    assert ("klein_draining_workers", (("model", "flux-klein-4b"),)) in after
    assert not [name for name, labels in after if name.startswith(("klein_queue_", "klein_live_")) and not labels]
    assert {"klein_sync_waiters", "klein_event_streams", "klein_webhook_backlog"} <= names(after)
    answered = {"dialect": "pruna", "outcome": "answered"}
    assert value(after, "klein_sync_waits_total", **answered) == value(before, "klein_sync_waits_total", **answered) + 1
    assert not any(name.startswith("klein_tenant_in_flight") for name in names(after)), "per tenant: off"


def test_scrapes_and_probes_are_no_requests_a_cancel_is_counted_and_the_build_is_told(
    stack: Stack, tenant: IssuedKey, client: httpx.Client
) -> None:
    before = scrape(f"{stack.api_url}/metrics")
    for probe in ("/healthz", "/readyz"):
        assert httpx.get(f"{stack.api_url}{probe}").status_code == 200
    queued = queued_prediction(stack, tenant)  # never enqueued: no worker takes it before the cancel
    assert client.post(f"/v1/predictions/{queued}/cancel").json()["status"] == "canceled"
    after = scrape(f"{stack.api_url}/metrics")
    routes = {dict(labels).get("route") for name, labels in after if name.startswith("klein_http_request")}
    assert "/v1/predictions/{prediction_id}/cancel" in routes
    assert not routes & {"/metrics", "/healthz", "/readyz"}, "Prometheus' scrapes and the probes are no traffic"
    canceled = {"dialect": "pruna", "stage": "queued"}
    moved = value(after, "klein_predictions_canceled_total", **canceled)
    assert moved == value(before, "klein_predictions_canceled_total", **canceled) + 1
    (build,) = [dict(labels) for name, labels in after if name == "klein_build_info"]
    revision = stack.env.get("KLEIN_REVISION", "").strip() or "unknown"  # an image's build argument; none here
    assert build == {"version": metadata.version("klein-serve"), "revision": revision, "python": python_version()}


def queued_prediction(stack: Stack, tenant: IssuedKey) -> str:
    prediction_id = new_id()
    params = KleinInput(prompt="waits").to_params(5).model_dump()
    with stack.engine.begin() as conn:
        conn.execute(
            lifecycle.create(
                prediction_id=prediction_id,
                tenant_id=tenant.tenant_id,
                api_key_id=tenant.key_id,
                model="flux-klein-4b",
                input={"prompt": "waits"},
                params=params,
            )
        )
    return prediction_id


def test_wavespeed_and_replicate_model_path_submits_are_counted_with_their_dialect(
    stack: Stack, client: httpx.Client
) -> None:
    before = scrape(f"{stack.api_url}/metrics")
    wavespeed = client.post(
        "/api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image", json={"prompt": "counted", "size": "512*512"}
    )
    assert wavespeed.status_code == 200, wavespeed.text
    replicate = client.post(
        "/v1/models/black-forest-labs/flux-2-klein-4b/predictions",
        json={"input": {"prompt": "counted", "aspect_ratio": "1:1"}},
    )
    assert replicate.status_code == 201, replicate.text
    after = scrape(f"{stack.api_url}/metrics")
    for dialect in ("wavespeed", "replicate"):
        labels = {"dialect": dialect, "outcome": "accepted", "reason": ""}
        assert value(after, "klein_submits_total", **labels) == value(before, "klein_submits_total", **labels) + 1


def test_worker_metrics_count_outcomes_and_stages_and_show_no_gpu_here(
    stack: Stack, tenant: IssuedKey, client: httpx.Client
) -> None:
    worker = f"http://127.0.0.1:{stack.env['KLEIN_WORKER_METRICS_PORT']}/metrics"
    before = scrape(worker)
    done = client.post(
        "/v1/predictions",
        headers={"Model": "flux-klein-4b", "Try-Sync": "true"},
        json={"input": {"prompt": "stages", "aspect_ratio": "16:9"}},
    )
    assert done.json()["status"] == "succeeded"
    after_one = scrape(worker)
    two = client.post(
        "/v1/models/black-forest-labs/flux-2-klein-4b/predictions",
        headers={"Prefer": "wait"},
        json={"input": {"prompt": "two", "aspect_ratio": "1:1", "output_megapixels": "0.25", "num_outputs": 2}},
    )
    assert two.json()["status"] == "succeeded" and len(two.json()["output"]) == 2
    after_two = scrape(worker)
    assert wait_for(stack, poison_prediction(stack, tenant))["status"] == "failed"
    after = scrape(worker)

    model = {"model": "flux-klein-4b"}  # on each of the worker's series

    def moved(name: str, **labels: str) -> float:
        labels |= model
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("klein_worker_predictions_total", outcome="completed", reason="") >= 2
    # Counted apart: the 2-output prediction adds 1 prediction and 2 images. Another test's leftover 1-output
    # prediction may complete meanwhile on this worker, adding one of each: the difference is what holds.
    completed_labels = {"outcome": "completed", "reason": ""} | model
    completed = value(after_two, "klein_worker_predictions_total", **completed_labels) - value(
        after_one, "klein_worker_predictions_total", **completed_labels
    )
    images = value(after_two, "klein_worker_images_total", **model) - value(
        after_one, "klein_worker_images_total", **model
    )
    assert completed >= 1 and images - completed == 1, (completed, images)
    assert moved("klein_worker_predictions_total", outcome="failed", reason="internal") == 1
    for stage in ("queue", "inference", "encode", "upload", "total"):
        assert moved("klein_worker_stage_seconds_count", stage=stage, resolution="1360x768") >= 1, stage
    assert value(after, "klein_worker_pipeline_state", klein_worker_pipeline_state="ready", **model) == 1
    assert value(after, "klein_worker_model_load_seconds", **model) > 0
    gpu_series = {name for name in names(after) if name.startswith("klein_gpu_")}
    assert gpu_series == {"klein_gpu_collector_state", "klein_gpu_collector_errors_total"}, "no GPU here: absent"
    assert value(after, "klein_gpu_collector_state", state="absent", **model) == 1, "told from a broken collector"
    assert value(after, "klein_gpu_collector_errors_total", **model) == 0

    def swept() -> float:  # the sweeper thread's passes (its first comes one KLEIN_SWEEP_INTERVAL_S after start)
        samples = scrape(worker)
        return sum(
            value(samples, "klein_sweeper_passes_total", outcome=o, **model) for o in ("swept", "skipped", "failed")
        )

    wait_until(lambda: swept() >= 1, 60, "a sweeper pass")
    (build,) = [dict(labels) for name, labels in after if name == "klein_build_info"]
    assert build["version"] == metadata.version("klein-serve")
    (labels,) = [dict(labels) for name, labels in after if name == "klein_worker_info"]
    assert labels["model"] == "flux-klein-4b" and labels["hostname"] == socket.gethostname()
    assert labels["worker"].startswith(f"{socket.gethostname()}:")  # as its log lines name it
    assert not any(name.startswith(("klein_webhook_", "klein_http_")) for name in names(after))
    unlabelled = {name for name, labels in after if dict(labels).get("model") != "flux-klein-4b"}
    assert not unlabelled, f"every worker series carries its model: {sorted(unlabelled)}"
    # Idle between predictions (once any other test's leftover has run).
    wait_until(lambda: value(scrape(worker), "klein_worker_busy", **model) == 0, 120, "the worker idle")
    assert value(after, "klein_worker_draining", **model) == 0


@pytest.mark.parametrize(
    ("app", "setting"), [("worker.app", "KLEIN_WORKER_METRICS_PORT"), ("worker.webhooks", "KLEIN_WEBHOOK_METRICS_PORT")]
)
def test_a_worker_whose_metrics_port_is_taken_exits_naming_the_port_and_the_setting(
    settings_env: dict[str, str], tmp_path: Path, app: str, setting: str
) -> None:
    """Carrying on would leave Prometheus scraping whatever else answers on that port as if it were this worker."""
    log = tmp_path / "worker.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        queue = f"{settings_env['KLEIN_QUEUE_NAME']}.port-taken"  # nothing is sent there
        worker = worker_service(settings_env | {setting: str(port)}, log, "port-taken", app, queue).start()
        try:
            wait_until(lambda: not worker.alive(), 120, "the worker's exit", log)
        finally:
            worker.stop()
    assert worker.returncode == os.EX_CONFIG
    text = log.read_text()
    assert f"metrics port {port} ({setting}) cannot be bound" in text, text[-2000:]


def test_several_api_processes_answer_one_sum(stack: Stack, tenant: IssuedKey, tmp_path: Path) -> None:
    """prometheus-client's multiprocess mode: whichever process answers the scrape counts them all."""
    port = free_port()
    env = stack.env | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    args = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--port", str(port), "--workers", "2"]
    api = Service(args, env, stack.logs / "api-multiprocess.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), 60, "API", stack.logs / "api-multiprocess.log")
        with httpx.Client(base_url=url, headers={"apikey": tenant.key}) as http:
            for _ in range(40):  # new connections: the kernel spreads them over both processes
                http.get("/v1/keys", headers={"connection": "close"})
        route = {"route": "/v1/keys", "method": "GET", "dialect": "account", "status": "200"}
        counts = {value(scrape(f"{url}/metrics"), "klein_http_requests_total", **route) for _ in range(6)}
    finally:
        api.stop()
    assert counts == {40.0}, counts


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_log_lines_are_json_with_the_bound_fields_and_no_secrets(
    stack: Stack, tenant: IssuedKey, logged_api: str
) -> None:
    """Every line of the API's and the GPU worker's logs (start-up included: no banner, no progress bar) is a JSON
    object; one line per request with its fields (probes only at debug level); the worker's one line per
    prediction under the submit's request id, and a failed prediction's says so (Celery's "succeeded" is not
    logged)."""
    prompt = "a secret prompt about a lighthouse"
    poisoned = poison_prediction(stack, tenant)  # fails in the pipeline, while the task itself returns normally
    with httpx.Client(base_url=logged_api, headers={"apikey": tenant.key}, timeout=180) as http:
        answer = http.post(
            "/v1/predictions",
            headers={"Model": "flux-klein-4b", "Try-Sync": "true", "X-Request-ID": "req-ops-1"},
            json={"input": {"prompt": prompt}},
        )
        assert answer.headers["x-request-id"] == "req-ops-1"
        made = http.get("/healthz").headers["x-request-id"]
        assert len(made) == 32, "one is made when none is given"
        bad = http.get("/healthz", headers={"X-Request-ID": "a b;c"}).headers["x-request-id"]
        assert bad != "a b;c" and len(bad) == 32
        signed = answer.json()["generation_url"]
        http.get(signed)
    prediction_id = answer.json()["id"]
    assert wait_for(stack, poisoned)["status"] == "failed"
    api_lines = _json_lines(stack.logs / "api-access.log")
    (request,) = [line for line in api_lines if line.get("request_id") == "req-ops-1" and line["event"] == "request"]
    assert request["tenant_id"] == tenant.tenant_id and request["prediction_id"] == prediction_id
    assert request["dialect"] == "pruna" and request["route"] == "/v1/predictions" and request["status"] == 200
    assert request["method"] == "POST" and request["level"] == "info" and request["duration_ms"] > 0
    assert not [line for line in api_lines if line.get("route") == "/healthz"], "probes only at debug level"

    def finished(pid: str) -> list[dict[str, object]]:
        return [
            line
            for line in _json_lines(stack.logs / "worker.log")
            if line.get("logger") == "klein.prediction" and line.get("prediction_id") == pid
        ]

    deadline = time.monotonic() + 10
    while not (finished(prediction_id) and finished(poisoned)):
        assert time.monotonic() < deadline, "no worker line for the predictions"
        time.sleep(0.2)
    (done,) = finished(prediction_id)
    assert done["event"] == "prediction completed" and done["outcome"] == "completed" and done["level"] == "info"
    assert done["request_id"] == "req-ops-1" and done["tenant_id"] == tenant.tenant_id
    assert (done["model"], done["size"], done["steps"], done["num_outputs"]) == ("flux-klein-4b", "1024x1024", 4, 1)
    assert {"queue_ms", "inference_ms", "encode_ms", "upload_ms", "total_ms"} <= set(done)
    (failed,) = finished(poisoned)
    assert failed["event"] == "prediction failed" and failed["outcome"] == "failed" and failed["level"] == "warning"
    assert failed["reason"] == "internal" and failed["size"] == "8x8"
    worker_log = (stack.logs / "worker.log").read_text()
    assert "succeeded" not in worker_log, "Celery's line per task is left to DEBUG: the worker's own says how it ended"
    everything = (stack.logs / "api-access.log").read_text() + (stack.logs / "worker.log").read_text()
    assert tenant.key not in everything and tenant.key[:12] not in everything
    assert prompt not in everything, "prompts only at debug level"


def test_secrets_are_masked_whoever_logs_them(tmp_path: Path) -> None:
    """core/logs.py's redaction on a real configured logger, in a process of its own."""
    script = tmp_path / "log.py"
    script.write_text(
        "import logging\nfrom core import logs\nlogs.configure('json')\n"
        "logging.getLogger('uvicorn.error').info('GET /x?expires=1&signature=%s 200', 'ab' * 32)\n"
        "logging.getLogger('x').warning('key kl_%s and secret whsec_%s', 'Q' * 40, 'Zm9v' * 10)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=Path.cwd(), check=True)
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert "ab" * 32 not in done.stderr and "Q" * 40 not in done.stderr and "Zm9v" * 10 not in done.stderr
    assert lines[0]["logger"] == "uvicorn.error" and "signature=…" in lines[0]["event"]


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the log, each of which must be a JSON object."""
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        try:
            lines.append(json.loads(text))
        except ValueError:
            raise AssertionError(f"{path.name}:{number} is not JSON: {text[:300]!r}") from None
    return lines


def test_metrics_want_the_token_and_many_scrapes_read_the_platform_once_per_interval(
    stack: Stack, tmp_path: Path
) -> None:
    """KLEIN_METRICS_TOKEN as Prometheus sends it (`Authorization: Bearer`), and the gauges' SQL and Redis reads
    shared: 60 scrapes, 40 of them at once, within one KLEIN_METRICS_REFRESH_S make one read."""
    token = "metrics-" + "t" * 24
    env = stack.env | {"KLEIN_METRICS_TOKEN": token, "KLEIN_METRICS_REFRESH_S": "300"}
    api, url = start_api(env, tmp_path / "api-metrics.log")
    try:
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}x"}).status_code == 401
        bearer = {"Authorization": f"Bearer {token}"}
        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(lambda _: httpx.get(f"{url}/metrics", headers=bearer, timeout=30), range(40)))
        assert {answer.status_code for answer in answers} == {200}
        for _ in range(19):
            httpx.get(f"{url}/metrics", headers=bearer)
        last = httpx.get(f"{url}/metrics", headers=bearer)
    finally:
        api.stop()
    samples = {
        sample.name: sample.value for family in text_string_to_metric_families(last.text) for sample in family.samples
    }
    assert samples.get("klein_metrics_refreshes_total") == 1, "one read of PostgreSQL and Redis for 60 scrapes"
    assert "klein_live_workers" in samples and "klein_queue_depth" in samples
