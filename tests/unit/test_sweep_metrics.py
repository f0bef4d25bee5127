"""The sweeper thread's loop (core.sweeper.run_forever) tells its observer each pass's outcome and lag, and the GPU
worker's observer (worker/sweep_metrics.py) turns them into its series. The sweeps here are stand-ins answering
fixed reports; a real pass's report is checked in tests/integration/test_queue.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

from prometheus_client import REGISTRY

from core.sweeper import SweepReport, run_forever
from worker import sweep_metrics


class ScriptedSweeper:
    """Answers its passes from a script (a report, None for a lock held elsewhere, an exception), then stops."""

    def __init__(self, script: list[Any], stop: threading.Event, slow_s: float = 0.0) -> None:
        self.settings = SimpleNamespace(sweep_interval_s=0.01)
        self.script = list(script)
        self.stop = stop
        self.slow_s = slow_s

    def sweep(self) -> SweepReport | None:
        step = self.script.pop(0)
        if not self.script:
            self.stop.set()
        time.sleep(self.slow_s)
        if isinstance(step, Exception):
            raise step
        return step


def test_each_pass_reaches_the_observer_with_its_outcome_and_lag() -> None:
    stop = threading.Event()
    seen: list[tuple[str, SweepReport | None, float]] = []
    report = SweepReport(requeued_lapsed=1)
    sweeper = ScriptedSweeper([report, None, RuntimeError("database down")], stop)
    run_forever(sweeper, stop, lambda *args: seen.append(args))  # type: ignore[arg-type]
    assert [(outcome, got) for outcome, got, _ in seen] == [("swept", report), ("skipped", None), ("failed", None)]
    assert all(0 <= lag < 5 for _, _, lag in seen)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_workers_series_count_what_each_pass_did() -> None:
    names = [
        ("klein_sweeper_passes_total", {"outcome": "swept"}),
        ("klein_sweeper_passes_total", {"outcome": "skipped"}),
        ("klein_sweeper_requeued_total", {"reason": "lease_lapsed"}),
        ("klein_sweeper_requeued_total", {"reason": "not_in_broker"}),
        ("klein_sweeper_leases_lapsed_total", {"outcome": "requeued"}),
        ("klein_sweeper_leases_lapsed_total", {"outcome": "failed"}),
        ("klein_retention_passes_total", {"outcome": "ok"}),
        ("klein_retention_passes_total", {"outcome": "failed"}),
        ("klein_retention_reaped_total", {"kind": "predictions"}),
        ("klein_retention_reaped_total", {"kind": "uploads"}),
    ]
    before = [sample(name, **labels) for name, labels in names]
    reaped = SweepReport(requeued_lapsed=2, failed_lapsed=1, requeued_lost=3, retention="ok", expired_predictions=7,
                         deleted_files=4)  # fmt: skip
    sweep_metrics.observe("swept", reaped, 0.25)
    assert sample("klein_sweeper_lag_seconds") == 0.25
    assert time.time() - sample("klein_retention_last_pass_timestamp_seconds") < 60
    sweep_metrics.observe("swept", SweepReport(retention="failed"), 0.0)
    sweep_metrics.observe("skipped", None, 1.5)
    assert sample("klein_sweeper_lag_seconds") == 1.5
    moved = [sample(name, **labels) - was for (name, labels), was in zip(names, before, strict=True)]
    assert moved == [2, 1, 2, 3, 2, 1, 1, 1, 7, 4]
    assert time.time() - sample("klein_sweeper_last_pass_timestamp_seconds") < 60
