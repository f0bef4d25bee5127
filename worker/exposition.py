"""A worker process's `/metrics` on a port of its own: the GPU worker's series (worker/metrics.py) on
`KLEIN_WORKER_METRICS_PORT`, the webhook worker's (worker/webhook_metrics.py) on `KLEIN_WEBHOOK_METRICS_PORT`.
Each process imports only its own module, so the default registry holds only its series. Each Celery worker here
is one process (solo or threads pool): no multiprocess mode. `labels` go on every series served (the GPU worker's
`model`), so a query can group any of them by it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class Labelled(Collector):
    """The default registry's series, each with `labels` added (a series' own label of the same name wins)."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():  # built afresh at each collect: changing its samples changes no state
            family.samples = [sample._replace(labels=self.labels | sample.labels) for sample in family.samples]
            yield family


def serve(port: int, setting: str, host: str = "0.0.0.0", labels: dict[str, str] | None = None) -> None:
    """Expose the default registry on `host`:`port` (port 0: not at all). A port already taken ends the process
    (exit status EX_CONFIG): carrying on would leave Prometheus scraping whatever else answers there."""
    if not port:
        return
    registry = REGISTRY
    if labels:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Labelled(labels))
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.critical(
            "metrics port %d (%s) cannot be bound: %s; set %s to a free port, or 0 for none",
            port,
            setting,
            exc.strerror or exc,
            setting,
        )
        raise SystemExit(os.EX_CONFIG) from exc
