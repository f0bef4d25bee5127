"""The webhook worker's own Prometheus series (served by worker/exposition.py); the GPU worker's are
worker/metrics.py, which this process never imports."""

from __future__ import annotations

import socket

from prometheus_client import Counter, Histogram, Info

from core import build

WEBHOOK_ATTEMPTS = Counter("klein_webhook_attempts", "Webhook sends by outcome", ["outcome"])
# The sender's own faults, no receiver involved: a poll or a task that raised (its database, its queue, a bug).
# Together with klein_webhook_attempts_total it tells "our sender is failing" from "a receiver is down"
# (KleinWebhookSenderFailing, docs/operations.md).
WEBHOOK_SENDER_ERRORS = Counter(
    "klein_webhook_sender_errors", "Webhook polls and tasks that raised, by stage", ["stage"]
)
for _stage in ("poll", "deliver"):  # both series from the start (0): a rate over them exists before an error
    WEBHOOK_SENDER_ERRORS.labels(_stage)
WEBHOOK_SECONDS = Histogram(
    "klein_webhook_attempt_seconds",
    "A webhook send, from connecting to the answer's first bytes",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20),
)
# Which webhook worker answers on this target: `klein_webhook_worker_info{hostname=…} 1`, joined by instance.
WEBHOOK_WORKER_INFO = Info("klein_webhook_worker", "The webhook worker behind this target")
BUILD_INFO = build.BUILD_INFO  # klein_build_info, as in every process


def identify() -> None:
    WEBHOOK_WORKER_INFO.info({"hostname": socket.gethostname()})
