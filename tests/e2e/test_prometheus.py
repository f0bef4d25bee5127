"""A real Prometheus (Debian's) scraping the real stack with the shipped scrape config and alert rules: after
traffic in every dialect, a webhook and a failure, every dashboard expression has data (except those a healthy
stack without a GPU rightly leaves empty), every rule evaluates cleanly and none fires; only the failure rate
and the backlog of receivers earlier tests of the session took down may be pending."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select

from core.tables import webhook_deliveries
from core.tenants import IssuedKey
from core.webhooks import receiver
from ops.embedded import Service, free_port, start_api, start_webhook_worker, wait_until
from tests.conftest import Stack
from tests.e2e.test_cross_dialect import MAKERS
from tests.e2e.test_worker import poison_prediction, wait_for
from tests.receiver import Receiver

ROOT = Path(__file__).resolve().parents[2]
SCRAPE_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
RULES = ROOT / "deploy/prometheus/alerts.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/klein-serve.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
TOKEN = "scrape-" + "s" * 24

JOBS = ("klein-api", "klein-worker", "klein-webhooks")
# With data while work is in flight (checked then), none once it is done.
WHILE_BUSY = ("klein_tenant_in_flight", "klein_worker_busy")
# Empty on a healthy stack without a GPU, and rightly so: no GPU series here, no 5xx answered.
RIGHTLY_EMPTY = ("klein_gpu_", 'status=~"5.."')


@pytest.fixture(scope="module")
def scraped(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The API (metrics token, per-tenant gauges), the session's GPU worker and a webhook worker, each scraped
    every second by a Prometheus running the shipped config and rules; yields {job: target}."""
    workdir = tmp_path_factory.mktemp("prometheus")
    env = stack.env | {
        "KLEIN_METRICS_TOKEN": TOKEN,
        "KLEIN_METRICS_PER_TENANT": "true",
        "KLEIN_METRICS_REFRESH_S": "1",
        "KLEIN_WEBHOOK_METRICS_PORT": str(free_port()),
        "KLEIN_WEBHOOK_POLL_INTERVAL_S": "0.1",
    }
    api, api_url = start_api(env, workdir / "api.log")
    webhooks: Service | None = None
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        webhooks = start_webhook_worker(env, workdir / "webhooks.log", "webhooks-prometheus")
        targets = {  # JOBS
            "klein-api": api_url.removeprefix("http://"),
            "klein-worker": f"127.0.0.1:{stack.env['KLEIN_WORKER_METRICS_PORT']}",
            "klein-webhooks": f"127.0.0.1:{env['KLEIN_WEBHOOK_METRICS_PORT']}",
        }
        (workdir / "metrics-token").write_text(TOKEN)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(_adapted(targets, workdir)))
        port = free_port()
        log = workdir / "prometheus.log"
        with open(log, "wb") as out:
            prometheus = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(f"{url}/-/ready"), 60, "Prometheus", log)
        yield {"url": url, "api": api_url} | targets
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        if webhooks is not None:
            webhooks.stop()
        api.stop()


def _adapted(targets: dict[str, str], workdir: Path) -> dict[str, Any]:
    """The shipped scrape config with the test's targets, token file and rules, every second, no Alertmanager."""
    config: dict[str, Any] = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    config.pop("alerting", None)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(targets), f"the shipped jobs {sorted(jobs)} are the rules' {sorted(targets)}"
    for name, job in jobs.items():
        job.pop("dns_sd_configs", None)  # compose finds its workers by Docker's DNS: here, the test's one
        job["static_configs"] = [{"targets": [targets[name]]}]
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(workdir / "metrics-token")
    return config


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return list(answer["data"]["result"])


def _dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_a_real_prometheus_sees_every_panel_and_no_alert_on_a_healthy_stack(
    stack: Stack, tenant: IssuedKey, scraped: dict[str, str]
) -> None:
    url = scraped["url"]
    started = datetime.now(UTC)
    client = httpx.Client(base_url=scraped["api"], headers={"apikey": tenant.key}, timeout=180)

    def all_up() -> bool:
        active = httpx.get(f"{url}/api/v1/targets").json()["data"]["activeTargets"]
        return len(active) == 3 and all(t["health"] == "up" for t in active)

    wait_until(all_up, 60, "every target up", None)

    slow = {"prompt": "long", "num_inference_steps": 30}
    held = client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json={"input": slow}).json()["id"]
    busy = [e for e in _dashboard_expressions() if any(mark in e for mark in WHILE_BUSY)]
    wait_until(lambda: all(_query(url, e) for e in busy), 60, "the panels of work in flight while there is some")
    for dialect, make in MAKERS.items():  # traffic in every dialect
        assert wait_for(stack, make(client))["status"] == "completed", dialect
    assert wait_for(stack, held)["status"] == "completed"
    assert wait_for(stack, poison_prediction(stack, tenant))["status"] == "failed"
    receiver = Receiver().start()
    try:
        body = {"input": {"prompt": "hooked", "aspect_ratio": "1:1"}, "webhook": receiver.url}
        answer = client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json=body)
        assert answer.status_code == 201, answer.text
        receiver.wait_for(1, 120)
    finally:
        receiver.stop()
    traffic_done = time.time()

    def scraped_after_traffic() -> bool:
        active = httpx.get(f"{url}/api/v1/targets").json()["data"]["activeTargets"]
        return all(_after(t["lastScrape"], traffic_done + 2) for t in active)

    wait_until(scraped_after_traffic, 60, "scrapes after the traffic", None)

    expressions = [e for e in _dashboard_expressions() if not any(mark in e for mark in WHILE_BUSY)]
    empty = [e for e in expressions if not _query(url, e)]
    assert sorted(e for e in empty if not any(mark in e for mark in RIGHTLY_EMPTY)) == [], "panels without data"
    assert [e for e in expressions if any(m in e for m in RIGHTLY_EMPTY) and _query(url, e)] == []

    # Prometheus' own scrapes are no API traffic; every process says what build it runs.
    assert _query(url, 'klein_http_requests_total{route=~"/metrics|/healthz.*|/readyz"}') == []
    assert {r["metric"]["job"] for r in _query(url, "klein_build_info")} == set(JOBS)

    def rules_evaluated_after_traffic() -> bool:
        groups = httpx.get(f"{url}/api/v1/rules").json()["data"]["groups"]
        return all(_after(g["lastEvaluation"], traffic_done + 2) for g in groups)

    wait_until(rules_evaluated_after_traffic, 60, "rule evaluations after the traffic", None)
    groups = httpx.get(f"{url}/api/v1/rules").json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    # Nothing fires; the one failure the test made (of about ten predictions) only sets the failure-rate
    # rule pending, as it should. Receivers that earlier tests of this session took down on purpose may have
    # waited 15 minutes by now: their backlog alert is right, and names only them.
    assert [r["name"] for r in rules if r["state"] == "firing"] == []
    assert {r["name"] for r in rules if r["state"] == "pending"} <= {"KleinPredictionsFailing", BACKLOG}
    backlogged = {a["labels"]["receiver"] for r in rules if r["name"] == BACKLOG for a in r.get("alerts", [])}
    assert backlogged <= _left_waiting(stack, started), "a backlog alert for a receiver that takes its events"


BACKLOG = "KleinWebhookReceiverBacklog"


def _left_waiting(stack: Stack, before: datetime) -> set[str]:
    """The receivers (as the backlog metric labels them) still owed events made before `before`; "other" too
    when there are any, since the metric may fold them into it."""
    deliveries = webhook_deliveries.c
    waiting = select(receiver(deliveries.url)).where(
        deliveries.status.in_(("pending", "sending")), deliveries.created_at < before
    )
    with stack.engine.connect() as conn:
        hosts = {str(host) for host in conn.execute(waiting).scalars()}
    return hosts | ({"other"} if hosts else set())


def _after(stamp: str, moment: float) -> bool:
    """Whether a Prometheus RFC 3339 timestamp ("2026-12-07T21:40:01.123456789Z") lies after `moment` (epoch s)."""
    whole, _, fraction = stamp.removesuffix("Z").partition(".")
    parsed = datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp() + float(f"0.{fraction or 0}")
    return parsed > moment
