"""The GPU worker's Prometheus series, served on `KLEIN_WORKER_METRICS_PORT` (worker/exposition.py); the webhook
worker's are worker/webhook_metrics.py, which this process never imports.

Every series of a worker carries the model it serves (`model`, added at exposition: worker/exposition.py) and is
told apart by Prometheus' `instance` label (its scrape target); which worker and host stand behind a target is
`klein_worker_info{worker, model, hostname} 1`.

GPU memory, utilisation and temperature of the worker's own GPUs are worker/gpu.py's; the sweeper's series (any
GPU worker may run a pass) are worker/sweep_metrics.py's.
"""

from __future__ import annotations

import socket
from typing import get_args

from prometheus_client import Counter, Enum, Gauge, Histogram, Info

from core import build
from models.klein import NAMED_SIZES, AspectRatio, size_for_aspect_ratio

STAGES = ("queue", "inference", "encode", "upload", "total")
# Seconds: from a tiny pipeline's milliseconds to a 4-megapixel image on a slow GPU.
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)

PREDICTIONS = Counter(
    "klein_worker_predictions", "Predictions this worker ended, by outcome and failure reason", ["outcome", "reason"]
)
IMAGES = Counter("klein_worker_images", "Images of the predictions this worker completed (num_outputs each)")
STAGE_SECONDS = Histogram(
    "klein_worker_stage_seconds",
    "Time per stage of a prediction (queue: created to claimed; total: created to stored), by output size",
    ["stage", "resolution"],
    buckets=STAGE_BUCKETS,
)
BATCH_PREDICTIONS = Histogram(
    "klein_worker_batch_predictions",
    "Predictions sharing one pipeline call, for calls of more than one (micro-batching, KLEIN_BATCH_SIZE)",
    buckets=(2, 3, 4, 6, 8, 12, 16),
)
# The image checker (worker/safety.py, docs/safety.md): predictions by what the check did (passed, flagged,
# blurred, blocked; unchecked: no checker, or turned off by the request) and flagged outputs. The model is the
# worker's (klein_worker_info); `tenant` is "" unless KLEIN_METRICS_PER_TENANT (a series per tenant).
SAFETY_PREDICTIONS = Counter(
    "klein_worker_safety_predictions", "Predictions by what the safety check did", ["outcome", "tenant"]
)
SAFETY_FLAGGED_OUTPUTS = Counter(
    "klein_worker_safety_flagged_outputs", "Outputs the safety checker flagged", ["tenant"]
)
MODEL_LOAD_SECONDS = Gauge("klein_worker_model_load_seconds", "Loading the pipeline's weights at start")
MODEL_WARMUP_SECONDS = Gauge("klein_worker_model_warmup_seconds", "Warming the pipeline up at start")
PIPELINE_STATE = Enum("klein_worker_pipeline_state", "The pipeline's state", states=["loading", "warming", "ready"])
BUSY = Gauge("klein_worker_busy", "Predictions this worker is running now (0: idle)")
DRAINING = Gauge("klein_worker_draining", "1 once an operator drained this worker: it takes no new predictions")
WORKER_INFO = Info("klein_worker", "The worker behind this target: its id (as in the logs), model and host")
BUILD_INFO = build.BUILD_INFO  # klein_build_info, as in every process

# The sizes clients pick by name (aspect ratios) are labels; any other is "other", so the labels stay few.
_KNOWN_SIZES = {f"{w}x{h}" for w, h in NAMED_SIZES.values()} | {
    "{}x{}".format(*size_for_aspect_ratio(ratio)) for ratio in get_args(AspectRatio)
}


def resolution(width: int, height: int) -> str:
    size = f"{width}x{height}"
    return size if size in _KNOWN_SIZES else "other"


def record_run(timings: dict[str, int], width: int, height: int) -> None:
    label = resolution(width, height)
    for stage in STAGES:
        if f"{stage}_ms" in timings:
            STAGE_SECONDS.labels(stage, label).observe(timings[f"{stage}_ms"] / 1000)


def identify(worker_id: str, model_id: str) -> None:
    WORKER_INFO.info({"worker": worker_id, "model": model_id, "hostname": socket.gethostname()})
