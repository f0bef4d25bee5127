"""The sweeper's series (core/sweeper.py), exported by the GPU worker whose thread ran each pass: one sweeper at a
time holds the platform's lock, so a platform-wide figure is the sum over workers (counters) or the max
(timestamps), e.g. `time() - max(klein_sweeper_last_pass_timestamp_seconds)`: how long since any sweeper swept."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge

from core.sweeper import SweepReport

PASSES = Counter(
    "klein_sweeper_passes", "Sweeper passes of this worker: swept, skipped (another held the lock), failed", ["outcome"]
)
LAG = Gauge("klein_sweeper_lag_seconds", "How late this worker's last sweeper pass started against its schedule")
LAST_PASS = Gauge("klein_sweeper_last_pass_timestamp_seconds", "When this worker's sweeper last swept (Unix time)")
REQUEUED = Counter(
    "klein_sweeper_requeued",
    "Predictions the sweeper queued again: lease_lapsed (their worker was lost), not_in_broker (Redis lost them)",
    ["reason"],
)
LAPSED = Counter(
    "klein_sweeper_leases_lapsed",
    "Leases found lapsed (a worker lost mid-run), by what became of the prediction: requeued, failed (attempts spent)",
    ["outcome"],
)
DEADLINE_CANCELED = Counter(
    "klein_sweeper_deadline_canceled",
    "Queued predictions the sweeper canceled because their deadline passed before a worker started them",
)
RECONCILED = Counter("klein_sweeper_counters_reconciled", "Tenants' in-flight counters set to their rows' count")
RETENTION_PASSES = Counter(
    "klein_retention_passes", "Retention passes (data expiry) by outcome: ok, failed", ["outcome"]
)
RETENTION_LAST_PASS = Gauge(
    "klein_retention_last_pass_timestamp_seconds", "When this worker's last retention pass succeeded (Unix time)"
)
REAPED = Counter(
    "klein_retention_reaped",
    "What retention removed: predictions (outputs deleted, row kept as expired), uploads, loras",
    ["kind"],
)
for _outcome in ("swept", "skipped", "failed"):
    PASSES.labels(_outcome)
for _reason in ("lease_lapsed", "not_in_broker"):
    REQUEUED.labels(_reason)
for _outcome in ("requeued", "failed"):
    LAPSED.labels(_outcome)
for _outcome in ("ok", "failed"):
    RETENTION_PASSES.labels(_outcome)
for _kind in ("predictions", "uploads", "loras"):
    REAPED.labels(_kind)


def observe(outcome: str, report: SweepReport | None, lag_s: float) -> None:
    """core.sweeper.run_forever's observer: one pass's outcome, report and lag."""
    PASSES.labels(outcome).inc()
    LAG.set(max(lag_s, 0.0))
    if report is None:
        return
    LAST_PASS.set(time.time())
    REQUEUED.labels("lease_lapsed").inc(report.requeued_lapsed)
    REQUEUED.labels("not_in_broker").inc(report.requeued_lost)
    LAPSED.labels("requeued").inc(report.requeued_lapsed)
    LAPSED.labels("failed").inc(report.failed_lapsed)
    DEADLINE_CANCELED.inc(report.deadline_canceled)
    RECONCILED.inc(report.counters_reconciled)
    if report.retention:
        RETENTION_PASSES.labels(report.retention).inc()
    if report.retention == "ok":
        RETENTION_LAST_PASS.set(time.time())
        REAPED.labels("predictions").inc(report.expired_predictions)
        REAPED.labels("uploads").inc(report.deleted_files)
        REAPED.labels("loras").inc(report.deleted_loras)
