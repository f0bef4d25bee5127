"""The lease a worker holds on the predictions it runs: the heartbeat thread that renews it (and announces the
worker: live, busy or idle, draining: core/workers.py), each prediction's `Lease` with its reason to stop, and
the stop of a batch's pipeline call."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy import Engine

from core import lifecycle, workers
from core.deadlines import DEADLINE_EXCEEDED
from core.settings import Settings
from worker import metrics
from worker.database import DB_ERRORS

log = logging.getLogger(__name__)


class Heartbeat:
    """One thread for the worker's lifetime renews the lease of the prediction running now, and each
    prediction's `Lease` says when to stop it. (A thread per prediction cost each one 0.8 ms to start.)

    Renewals come every `min(lease_s / 3, 2 s)` from the claim, often enough to keep the lease and to
    notice a cancel within about two seconds; stops are checked between denoising steps. `leases` is the
    engine of the claim (autocommit, not waiting for the disk); the thread ends when `stopping` is set.
    `draining` is set once an operator drained the worker (its announcement's answer).
    """

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        worker_id: str,
        leases: Engine,
        stopping: threading.Event,
        node: str = "",
    ) -> None:
        self.settings = settings
        self.redis = client
        self.worker_id = worker_id
        self.node = node  # its Celery node name, for the drain's cancel_consumer
        self.draining = threading.Event()
        self.leases = leases
        self.stopping = stopping
        self.every_s = min(settings.lease_s / 3, 2.0)
        self._current: list[Lease] = []  # the leases of the batch running now
        self._changed = threading.Condition()
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()

    @contextlib.contextmanager
    def hold(self, prediction_ids: list[str]) -> Iterator[list[Lease]]:
        leases = [Lease(prediction_id, self.settings.task_time_limit_s) for prediction_id in prediction_ids]
        with self._changed:
            self._current = leases
            self._changed.notify()
        metrics.BUSY.set(len(leases))
        try:
            yield leases
        finally:
            metrics.BUSY.set(0)
            with self._changed:
                self._current = []

    def _beat(self) -> None:
        announced_at = 0.0
        while not self.stopping.is_set():
            if time.monotonic() - announced_at >= self.every_s:  # alive, for the fleet's counts and queue ETAs
                announced_at = time.monotonic()
                self._announce()
            with self._changed:
                leases = self._current
                if not leases:
                    self._changed.wait(self.every_s)
                    continue
                wait = leases[0].renewed_at + self.every_s - time.monotonic()
                if wait > 0:
                    self._changed.wait(wait)
                    continue
            # A renewal racing a prediction's finish finds it no longer processing: it changes nothing.
            renew = lifecycle.renew([lease.prediction_id for lease in leases], self.worker_id, self.settings.lease_s)
            renewed_at = time.monotonic()
            try:
                with self.leases.connect() as conn:
                    kept = set(conn.execute(renew).scalars())
            except DB_ERRORS:
                log.warning("heartbeat of %d predictions missed (database unavailable)", len(leases))
                kept = None
            for lease in leases:
                lease.renewed_at = renewed_at
                if kept is not None:
                    lease.lost = lease.prediction_id not in kept

    def _announce(self) -> None:
        try:
            draining = workers.announce(self.redis, self.settings, self.worker_id, self.node, bool(self._current))
        except redis.RedisError:
            log.warning("could not announce worker %s as live", self.worker_id)
            return
        if draining and not self.draining.is_set():
            log.info("draining: taking no new predictions, finishing those in hand")
            self.draining.set()
            metrics.DRAINING.set(1)


@dataclass
class Lease:
    prediction_id: str
    time_limit_s: float
    started_at: float = field(default_factory=time.monotonic)
    renewed_at: float = field(default_factory=time.monotonic)  # the claim, then each renewal
    lost: bool = False  # the last renewal found the prediction no longer ours
    deadline: float = math.inf  # time.monotonic() of the prediction's deadline (core/deadlines.py), if it has one

    def keep_deadline(self, row: Mapping[str, Any]) -> None:
        """Stop at the claimed row's `deadline_at`: as far after the claim as the database's clock puts it after
        `started_at` (the claim's time), so this machine's clock may differ from the database's."""
        if row.get("deadline_at") is not None:
            self.deadline = self.started_at + (row["deadline_at"] - row["started_at"]).total_seconds()

    def stop_reason(self) -> str | None:
        if self.lost:
            return "canceled or taken over by another worker"
        if time.monotonic() >= self.deadline:
            return DEADLINE_EXCEEDED
        if time.monotonic() - self.started_at > self.time_limit_s:
            return f"timed out after {self.time_limit_s:g} s"
        return None


def all_stopped(leases: list[Lease]) -> Callable[[], str | None]:
    """The pipeline call's stop: when every prediction in it has a reason to stop (one that alone stops is
    dropped after the call), the first one's reason."""

    def reason() -> str | None:
        reasons = [lease.stop_reason() for lease in leases]
        return reasons[0] if all(reasons) else None

    return reason
