"""What a worker tells about the prediction it runs: its event stream (core/progress.py) and its logs."""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

import redis

from core import progress, queue
from core.settings import Settings

log = logging.getLogger(__name__)
MAX_LOG_LINES = 50


class Report:
    """One prediction's run. Each entry is one Redis round trip; a Redis that fails loses the entry (and is
    logged), never the prediction. `logs` is kept here too: it is stored with the result."""

    def __init__(self, client: redis.Redis, settings: Settings, prediction_id: str, queued_at: datetime) -> None:
        self.client = client
        self.settings = settings
        self.prediction_id = prediction_id
        self.logs: list[dict[str, str]] = [progress.log_line("queued", queued_at)]
        self._last_step_at = 0.0

    def claimed(self, worker_id: str, attempt: int, has_webhook: bool) -> None:
        """Also queues the `start` webhook's sending when the prediction has a webhook (it may not want it)."""
        line = self._line(f"claimed by worker {worker_id} (attempt {attempt})")
        status = {"status": "processing", "worker": worker_id, "attempt": attempt}
        self._send(("status", status), ("log", line), kick_webhooks=has_webhook)

    def step(self, step: int, total: int) -> None:
        """After denoising step `step` of `total`: reported unless the last report was too recent (the
        first and the last step always are)."""
        now = time.monotonic()
        if 1 < step < total and now - self._last_step_at < self.settings.progress_interval_s:
            return
        self._last_step_at = now
        percent = round(100 * step / total)
        line = self._line(f"step {step}/{total}")
        self._send(("progress", {"step": step, "total": total, "percent": percent}), ("log", line))

    def note(self, message: str) -> None:
        self._send(("log", self._line(message)))

    def _line(self, message: str) -> dict[str, str]:
        line = progress.log_line(message)
        if len(self.logs) < MAX_LOG_LINES:
            self.logs.append(line)
        return line

    def _send(self, *events: tuple[str, dict[str, Any]], kick_webhooks: bool = False) -> None:
        pipe = self.client.pipeline(transaction=False)
        for kind, data in events:
            progress.append(pipe, self.settings, self.prediction_id, kind, data)
        if kick_webhooks:
            queue.kick_webhooks(pipe, self.settings, self.prediction_id)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not report on %s: %s", self.prediction_id, exc)
