"""A worker process's `/metrics` on a port of its own: the GPU worker's series (worker/metrics.py) on
`KLEIN_WORKER_METRICS_PORT`, the webhook worker's (worker/webhook_metrics.py) on `KLEIN_WEBHOOK_METRICS_PORT`.
Each process imports only its own module, so the default registry holds only its series. Each Celery worker here
is one process (solo or threads pool): no multiprocess mode.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import start_http_server

log = logging.getLogger(__name__)


def serve(port: int, setting: str, host: str = "0.0.0.0") -> None:
    """Expose the default registry on `host`:`port` (port 0: not at all). A port already taken ends the process
    (exit status EX_CONFIG): carrying on would leave Prometheus scraping whatever else answers there."""
    if not port:
        return
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.critical(
            "metrics port %d (%s) cannot be bound: %s; set %s to a free port, or 0 for none",
            port,
            setting,
            exc.strerror or exc,
            setting,
        )
        raise SystemExit(os.EX_CONFIG) from exc
