"""How Prometheus finds every process and alerts someone: compose's Prometheus scrapes every GPU worker service and
sends alerts to its Alertmanager (promtool accepts the config); the Kubernetes monitors, rendered by kustomize,
select every pool under the jobs the rules match and carry kube-prometheus-stack's selector label; each pool's
queue-age autoscaler watches its own model's queue."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.test_deploy_manifests import ROOT, _errors, compose, keda_validator, kustomize
from tests.deploy.test_observability import ALERTS, JOBS, MONITORING, rule_expressions, scrape_config


def test_compose_prometheus_scrapes_every_gpu_worker_service_and_alerts_through_alertmanager() -> None:
    """Every service running the GPU worker (worker, worker-gpu1…7, worker-base) is a klein-worker target, none
    sets another metrics port, and Prometheus sends its alerts to the Alertmanager service, whose receiver is the
    operator's URL."""
    services = compose()["services"]
    gpu_workers = {name for name, spec in services.items() if spec.get("image") == services["worker"]["image"]}
    assert {"worker", "worker-gpu7", "worker-base"} <= gpu_workers
    for name in gpu_workers:
        assert "KLEIN_WORKER_METRICS_PORT" not in services[name].get("environment", {}), name
    (workers,) = next(j for j in scrape_config()["scrape_configs"] if j["job_name"] == "klein-worker")["dns_sd_configs"]
    assert sorted(workers["names"]) == sorted(gpu_workers)

    (alertmanagers,) = scrape_config()["alerting"]["alertmanagers"]
    assert alertmanagers["static_configs"][0]["targets"] == ["alertmanager:9093"]
    alertmanager = services["alertmanager"]
    assert alertmanager["image"].startswith("prom/alertmanager:")
    assert services["prometheus"]["depends_on"] == {"alertmanager": {"condition": "service_started"}}
    mounted = dict(volume.split(":")[:2] for volume in alertmanager["volumes"])
    assert mounted["./deploy/prometheus/alertmanager.yml"] == "/etc/alertmanager/alertmanager.yml"
    routing = yaml.safe_load((ROOT / "deploy/prometheus/alertmanager.yml").read_text())
    (receiver,) = routing["receivers"]
    assert routing["route"]["receiver"] == receiver["name"]
    (webhook,) = receiver["webhook_configs"]
    (url_file,) = [c["target"] for c in alertmanager["configs"] if c["source"] == "alert-webhook-url"]
    assert webhook["url_file"] == url_file
    assert "KLEIN_ALERT_WEBHOOK_URL" in compose_text(), "the receiver's URL is the operator's setting"


def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


def test_promtool_accepts_the_compose_prometheus_config(tmp_path: Path) -> None:
    """Debian's `prometheus` package (promtool) checks the scrape config and the rules it loads, with the files the
    containers mount placed here."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's `prometheus` package (the test command does)"
    config = (ROOT / "deploy/prometheus/prometheus.yml").read_text().replace("/etc/prometheus/", f"{tmp_path}/")
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    (tmp_path / "metrics-token").write_text("token\n")
    checked = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()


def rendered(folder: str) -> list[dict[str, Any]]:
    return kustomize(ROOT / "deploy" / "k8s" / folder if folder else ROOT / "deploy" / "k8s")


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions with In/NotIn/Exists/DoesNotExist) on labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if not {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def test_kubernetes_monitors_select_every_pool_under_the_jobs_the_rules_match() -> None:
    """Rendered as `kubectl apply -k` would: the PodMonitor selects both GPU worker pools and the webhook workers,
    and its jobLabel gives them the jobs the rules name (so KleinTargetDown sees a lost worker); the ServiceMonitor
    likewise for the API; the monitors and rules carry kube-prometheus-stack's default selector label."""
    monitors = {doc["kind"]: doc for doc in rendered("monitoring")}
    pods = {
        doc["metadata"]["name"]: doc["spec"]["template"]["metadata"]["labels"]
        for folder in ("", "base-model")
        for doc in rendered(folder)
        if doc["kind"] == "Deployment"
    }
    pod_monitor, service_monitor = monitors["PodMonitor"], monitors["ServiceMonitor"]
    job_label = pod_monitor["spec"]["jobLabel"]
    scraped = {
        name: labels[job_label] for name, labels in pods.items() if _selects(pod_monitor["spec"]["selector"], labels)
    }
    assert scraped == {
        "klein-worker": "klein-worker",
        "klein-worker-base": "klein-worker",
        "klein-webhooks": "klein-webhooks",
    }
    (api_service,) = [doc for doc in rendered("") if doc["kind"] == "Service"]
    assert _selects(service_monitor["spec"]["selector"], api_service["metadata"]["labels"])
    assert api_service["metadata"]["labels"][service_monitor["spec"]["jobLabel"]] == "klein-api"
    assert {*scraped.values(), "klein-api"} == set(JOBS)
    rules = " ".join(rule_expressions())
    assert 'up{job=~"klein-.*"}' in rules
    for doc in monitors.values():
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack", doc["kind"]
    assert "release: kube-prometheus-stack" in (MONITORING / "kustomization.yaml").read_text()


def test_each_pools_queue_age_autoscaler_watches_its_own_models_queue() -> None:
    (default,) = rendered("monitoring/queue-age")
    (base,) = rendered("base-model/queue-age")
    for scaled, deployment, model in (
        (default, "klein-worker", "flux-klein-4b"),
        (base, "klein-worker-base", "flux-klein-4b-base"),
    ):
        assert scaled["spec"]["scaleTargetRef"]["name"] == deployment
        (trigger,) = scaled["spec"]["triggers"]
        assert f'model="{model}"' in trigger["metadata"]["query"]
        assert _errors(keda_validator(), scaled) == []
    assert base["metadata"]["name"] != default["metadata"]["name"]
