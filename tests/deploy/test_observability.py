"""Monitoring files: every metric the dashboard and the alert rules name is one our processes export, each process
exports only its own series and each rule's job exports what it matches, platform gauges are aggregated over API
replicas with max/min, the Operator's copies match their schemas (`cloudcoil-models-prometheus-operator`, made
strict) and the rules, and every scrape target is where the processes listen."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from functools import cache
from typing import Any

import jsonschema
import pytest
import yaml

from core.settings import Settings
from tests.deploy.test_deploy_manifests import (
    ROOT,
    _errors,
    _strict,
    compose,
    container,
    k8s,
    keda_validator,
)

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "klein-serve.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
MONITORING = ROOT / "deploy" / "k8s" / "monitoring"
QUEUE_AGE = "queue-age/worker-scaledobject-queue-age.yaml"
PROMETHEUS_MADE = {"up"}  # series Prometheus makes itself
GPU_SERIES = {  # worker.gpu.GpuCollector's, registered as the worker starts; the first four only where NVML answers
    "klein_gpu_memory_used_bytes",
    "klein_gpu_memory_total_bytes",
    "klein_gpu_utilization_ratio",
    "klein_gpu_temperature_celsius",
    "klein_gpu_collector_state",
    "klein_gpu_collector_errors_total",
}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


# Each Prometheus job (deploy/prometheus/prometheus.yml; the Kubernetes monitors' jobLabel) and the module its
# process starts from.
JOBS = {"klein-api": "api.app", "klein-worker": "worker.app", "klein-webhooks": "worker.webhooks"}
_LISTING = """
import importlib, sys
from prometheus_client import REGISTRY
importlib.import_module(sys.argv[1])
for family in REGISTRY.collect():
    print(family.name, family.type)
"""


@cache
def exported_by(job: str) -> frozenset[str]:
    """The klein_ sample names the process behind `job` would export: its start module imported in a fresh
    interpreter (nothing started), its default registry listed; the GPU series where NVML answers."""
    listing = subprocess.run(
        [sys.executable, "-c", _LISTING, JOBS[job]], cwd=ROOT, capture_output=True, text=True, timeout=180, check=True
    ).stdout
    names = set(GPU_SERIES) if job == "klein-worker" else set()
    for line in listing.splitlines():
        name, kind = line.split()
        names |= {name + suffix for suffix in SUFFIXES.get(kind, ("",))}
    return frozenset(name for name in names if name.startswith("klein_"))


def exported() -> set[str]:
    """The sample names of every metric the API, the workers and the webhook worker export."""
    return set().union(*(exported_by(job) for job in JOBS))


def named_in(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in re.findall(r"\b(klein_[a-z0-9_]+|up)\b(?!\s*[=!~]~?\s*\")", expr)}


def dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def rule_expressions() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_every_metric_on_the_dashboard_and_in_the_rules_is_exported() -> None:
    ours = exported()
    assert {"klein_http_requests_total", "klein_worker_stage_seconds_bucket", "klein_queue_oldest_age_seconds"} <= ours
    for source, expressions in (("dashboard", dashboard_expressions()), ("rules", rule_expressions())):
        used = named_in(expressions) - PROMETHEUS_MADE
        assert used, source
        assert used <= ours, f"{source} names metrics nobody exports: {sorted(used - ours)}"


def test_the_checker_catches_a_misspelt_metric() -> None:
    assert named_in(["sum(rate(klein_worker_predictions_totl[5m]))"]) - exported() == {"klein_worker_predictions_totl"}


def test_the_dashboard_covers_what_operators_watch() -> None:
    text = " ".join(dashboard_expressions())
    for metric in (
        "klein_worker_predictions_total",  # throughput, failures by reason
        "klein_queue_depth",
        "klein_queue_oldest_age_seconds",
        "klein_worker_stage_seconds_bucket",  # latency percentiles by stage
        "klein_gpu_memory_used_bytes",
        "klein_gpu_utilization_ratio",
        "klein_tenant_images_24h",  # per-tenant usage
    ):
        assert metric in text, metric
    datasources = {t["datasource"]["uid"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]}
    provisioned = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasources == {source["uid"] for source in provisioned["datasources"]}


def test_the_alerts_cover_the_failures_the_issue_names() -> None:
    alerts = {
        rule["alert"]: rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    }
    assert "klein_live_workers" in alerts["KleinNoLiveWorker"]
    assert "klein_queue_oldest_age_seconds" in alerts["KleinQueueTooOld"]
    assert "klein_gpu_memory_used_bytes" in alerts["KleinGpuMemoryNearFull"]
    assert "klein_webhook_oldest_pending_age_seconds" in alerts["KleinWebhookReceiverBacklog"]
    assert 'status=~"5.."' in alerts["KleinApiErrors"] and "failed" in alerts["KleinPredictionsFailing"]


@cache
def operator_validator(kind: str) -> jsonschema.protocols.Validator:
    models = importlib.import_module("cloudcoil.models.prometheus_operator.v1")
    schema = _strict(getattr(models, kind).model_json_schema(by_alias=True))
    # Not check_schema(): the CRD's Go patterns (`(?i)` mid-pattern) are no Python regex; none applies here.
    return jsonschema.validators.validator_for(schema)(schema)


def monitoring(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((MONITORING / name).read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize("name", ["servicemonitor.yaml", "podmonitor.yaml", "prometheusrule.yaml"])
def test_operator_resources_match_their_crd_schemas(name: str) -> None:
    doc = monitoring(name)
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert _errors(operator_validator(doc["kind"]), doc) == []
    broken = doc | {"spec": {**doc["spec"], "bogus": 1}}
    assert _errors(operator_validator(doc["kind"]), broken), "the strict schema refuses unknown fields"


def test_the_operator_rules_are_the_compose_rules() -> None:
    assert monitoring("prometheusrule.yaml")["spec"] == yaml.safe_load(ALERTS.read_text())
    kustomization = monitoring("kustomization.yaml")
    assert sorted(kustomization["resources"]) == ["podmonitor.yaml", "prometheusrule.yaml", "servicemonitor.yaml"]


def test_the_queue_age_scaled_object_matches_the_keda_schema_and_queries_our_metric() -> None:
    scaled = monitoring(QUEUE_AGE)
    assert _errors(keda_validator(), scaled) == []
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and named_in([trigger["metadata"]["query"]]) <= exported()


def scrape_config() -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert isinstance(config, dict)
    return config


def test_scrape_targets_are_where_the_processes_listen() -> None:
    defaults = Settings()
    services = compose()["services"]
    jobs = {job["job_name"]: job for job in scrape_config()["scrape_configs"]}
    assert set(jobs) == set(JOBS)
    assert jobs["klein-api"]["static_configs"][0]["targets"] == ["api:8000"]
    assert jobs["klein-webhooks"]["static_configs"][0]["targets"] == [f"webhooks:{defaults.webhook_metrics_port}"]
    (workers,) = jobs["klein-worker"]["dns_sd_configs"]
    assert (workers["type"], workers["port"]) == ("A", defaults.worker_metrics_port)
    mounted = {volume.split(":")[1] for volume in services["prometheus"]["volumes"] if volume.startswith("./")}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= mounted
    assert scrape_config()["rule_files"] == ["/etc/prometheus/alerts.yml"]
    for service in ("prometheus", "alertmanager", "grafana"):
        assert services[service]["profiles"] == ["observability"]
    ports = {
        name: {p["name"]: p["containerPort"] for p in container(k8s("Deployment", name)).get("ports", [])}
        for name in ("klein-worker", "klein-webhooks")
    }
    assert ports == {
        "klein-worker": {"metrics": defaults.worker_metrics_port},
        "klein-webhooks": {"metrics": defaults.webhook_metrics_port},
    }


def test_prometheus_sends_the_apis_metrics_token_where_it_is_set() -> None:
    """/metrics wants KLEIN_METRICS_TOKEN (compose and Kubernetes set it): each scrape config of the API sends the
    same value as a bearer token, from where the API reads it."""
    spec = compose()
    api_env, prometheus = spec["services"]["api"]["environment"], spec["services"]["prometheus"]
    assert api_env["KLEIN_METRICS_TOKEN"] == spec["configs"]["metrics-token"]["content"]
    (mounted,) = [c["target"] for c in prometheus["configs"] if c["source"] == "metrics-token"]
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    api_job = next(job for job in config["scrape_configs"] if job["job_name"] == "klein-api")
    assert api_job["authorization"] == {"type": "Bearer", "credentials_file": mounted}

    secret = k8s("Secret", "klein-secrets")
    assert "KLEIN_METRICS_TOKEN" in secret["stringData"]
    assert {"secretRef": {"name": "klein-secrets"}} in container(k8s("Deployment", "klein-api"))["envFrom"]
    (endpoint,) = monitoring("servicemonitor.yaml")["spec"]["endpoints"]
    credentials = {"name": "klein-secrets", "key": "KLEIN_METRICS_TOKEN"}
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": credentials}


def keda_query() -> str:
    query = monitoring(QUEUE_AGE)["spec"]["triggers"][0]["metadata"]["query"]
    assert isinstance(query, str)
    return query


def test_each_process_exports_only_its_own_series() -> None:
    """The webhook worker once exported the GPU worker's pipeline state (`loading` forever), paging
    KleinWorkerNotReady 15 minutes after each start."""
    api, worker, webhooks = (exported_by(job) for job in ("klein-api", "klein-worker", "klein-webhooks"))
    assert {"klein_http_requests_total", "klein_queue_depth", "klein_submits_total"} <= api
    assert {"klein_worker_pipeline_state", "klein_worker_info", "klein_worker_predictions_total"} <= worker
    assert {"klein_webhook_attempts_total", "klein_webhook_worker_info"} <= webhooks
    assert {"klein_build_info"} <= api & worker & webhooks
    assert {"klein_sweeper_passes_total", "klein_retention_reaped_total"} <= worker - api - webhooks
    assert not {n for n in webhooks if n.startswith(("klein_worker_", "klein_gpu_", "klein_http_"))}
    assert not {n for n in worker - GPU_SERIES if n.startswith(("klein_webhook_", "klein_http_", "klein_gpu_"))}
    assert not {n for n in api if n.startswith(("klein_worker_", "klein_gpu_", "klein_webhook_attempt"))}


def selectors(expr: str) -> list[tuple[str, str | None]]:
    """Each klein_ series an expression selects, with the job its matcher names (None: no job matcher)."""
    found = []
    for match in re.finditer(r"\b(klein_[a-z0-9_]+)\b(?!\s*[=!~]~?\s*\")(\s*\{[^}]*\})?", expr):
        job = re.search(r'\bjob\s*=\s*"([^"]*)"', match.group(2) or "")
        found.append((match.group(1), job.group(1) if job else None))
    return found


def test_each_rule_about_one_kind_of_process_names_the_job_that_exports_its_series() -> None:
    for expr in [*rule_expressions(), keda_query()]:
        for name, job in selectors(expr):
            assert job in JOBS, f"{name} in {expr!r} has no job matcher naming one of {sorted(JOBS)}"
            assert name in exported_by(job), f"{name} in {expr!r}: job {job} does not export it"


def test_the_job_checker_catches_a_series_under_the_wrong_job() -> None:
    assert selectors('klein_worker_pipeline_state{job="klein-webhooks", x="1"} == 0') == [
        ("klein_worker_pipeline_state", "klein-webhooks")
    ]
    assert "klein_worker_pipeline_state" not in exported_by("klein-webhooks")
    assert selectors("max(klein_live_workers) == 0") == [("klein_live_workers", None)]


AGGREGATORS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
               "quantile", "limitk", "limit_ratio"}  # fmt: skip


def platform_gauges() -> set[str]:
    module = importlib.import_module("api.routes.metrics")
    return {gauge.describe()[0].name for gauge in module.PLATFORM_GAUGES}


def innermost_aggregations(expr: str) -> list[tuple[str, str | None]]:
    """Each klein_ series an expression names, with the aggregation operator closest around it (None: none)."""
    tokens = re.findall(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]|[A-Za-z_:][A-Za-z0-9_:]*|\(|\)|[^\sA-Za-z_(){}\["]+', expr)
    stack: list[str | None] = []  # what each open parenthesis belongs to: an aggregation's name, else None
    grouping_of: list[str | None] = []  # the aggregation a by/without (...) belongs to
    previous, pending, found = "", None, []
    for token in tokens:
        if token == "(":
            if previous in ("by", "without"):
                stack.append("grouping")
                grouping_of.append(pending)
            else:
                stack.append(previous if previous in AGGREGATORS else pending if previous == ")" else None)
            pending = None
        elif token == ")":
            closed = stack.pop() if stack else None
            pending = grouping_of.pop() if closed == "grouping" and grouping_of else None
        elif token in ("by", "without"):
            pending = previous if previous in AGGREGATORS else None
        elif token.startswith("klein_"):
            aggregations = [frame for frame in stack if frame not in (None, "grouping")]
            found.append((token, aggregations[-1] if aggregations else None))
        previous = token
    return found


def test_platform_gauges_are_aggregated_over_api_replicas_with_max_or_min() -> None:
    """Every API replica reads the same queue, workers, webhooks and tenants: summing over replicas multiplies."""
    gauges = platform_gauges()
    assert {"klein_queue_depth", "klein_live_workers", "klein_tenant_in_flight"} <= gauges
    for expr in [*dashboard_expressions(), *rule_expressions(), keda_query()]:
        for name, aggregation in innermost_aggregations(expr):
            if name in gauges:
                assert aggregation in ("max", "min"), f"{name} in {expr!r} is aggregated by {aggregation}"


def test_the_aggregation_checker_sees_through_grouping_and_nesting() -> None:
    assert innermost_aggregations("sum by (priority) (klein_queue_depth)") == [("klein_queue_depth", "sum")]
    assert innermost_aggregations('topk(10, max by (tenant) (klein_tenant_in_flight{job="a"}))') == [
        ("klein_tenant_in_flight", "max")
    ]
    assert innermost_aggregations("klein_tenant_images_24h") == [("klein_tenant_images_24h", None)]
    assert innermost_aggregations("max(sum(klein_live_workers) by (instance))") == [("klein_live_workers", "sum")]
    assert innermost_aggregations("sum(rate(klein_x_total[5m])) / max(klein_y)") == [
        ("klein_x_total", "sum"),
        ("klein_y", "max"),
    ]
