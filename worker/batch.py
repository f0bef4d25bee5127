"""Micro-batching: the predictions of one pipeline call. `Batcher` finds and claims the queued predictions that
can share a claimed one's call (`batch_size` > 1); each is an `Item`, finished, billed and failed on its own."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from core import lifecycle
from core.settings import Settings
from worker.database import DB_ERRORS, Database
from worker.report import Report

log = logging.getLogger(__name__)


def ms(seconds: float) -> int:
    """Seconds as a prediction's timings hold them: whole milliseconds."""
    return round(seconds * 1000)


@dataclass
class Item:
    """One prediction of a batch: its claimed row, what it reports, and how it ends."""

    row: dict[str, Any]
    report: Report
    timings: dict[str, int] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    error: BaseException | None = None
    safety: dict[str, Any] | None = None  # the image checker's record (core/safety.py), kept with the prediction

    def __post_init__(self) -> None:
        self.timings["queue_ms"] = ms((self.row["started_at"] - self.row["created_at"]).total_seconds())


class Batcher:
    """Claims the companions of a claimed prediction for this worker (statement built once, values bound per
    look)."""

    def __init__(self, settings: Settings, db: Database, worker_id: str) -> None:
        self.settings = settings
        self.db = db
        self.claim_companions = lifecycle.claim_companions(worker_id, settings.lease_s, settings.max_attempts)

    def companions(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Queued predictions claimed to share `row`'s pipeline call, up to `batch_size` images in all: the
        compatible ones first in the queue's order (lifecycle.batch_candidates), looked for now and once more
        after `batch_window_ms` if there is room left. A database error ends the look: the claim runs with
        what it has, and what is left stays queued."""
        settings, params = self.settings, row["params"]
        room = settings.batch_size - params["num_outputs"]
        if room <= 0 or params["reference_keys"]:
            return []
        deadline = time.monotonic() + settings.batch_window_ms / 1000
        taken: list[dict[str, Any]] = []
        while True:
            try:
                claimed = self.db.run(functools.partial(self._take, row=row, room=room), durable=False)
            except DB_ERRORS:
                log.warning("could not look for predictions to batch with %s", row["id"], exc_info=True)
                return taken
            taken += claimed
            room -= sum(r["params"]["num_outputs"] for r in claimed)
            wait = deadline - time.monotonic()
            if room <= 0 or wait <= 0:
                return taken
            time.sleep(wait)
            deadline = 0.0  # looked again after the window: done then

    def _take(self, conn: Connection, row: Mapping[str, Any], room: int) -> list[dict[str, Any]]:
        """One look: the first candidates whose images fit in `room`, claimed if still queued."""
        batch_work = row.get("batch_id") is not None
        look = lifecycle.batch_candidates(
            row["model"], row["params"], row["id"], self.settings.max_attempts, room, batch_work
        )
        ids, images = [], 0
        for candidate in conn.execute(look):
            if images + candidate.num_outputs <= room:
                ids.append(candidate.id)
                images += candidate.num_outputs
        if not ids:
            return []
        return [dict(r) for r in conn.execute(self.claim_companions, {"ids": ids}).mappings()]
