"""What the image checker found and did, told (docs/safety.md): to the tenant in its prediction's logs, to
operators in the worker's log (the audit line) and on the metrics. Apart from worker/safety.py so that the
checker itself imports nothing of the worker's plumbing (bench/gpu.py runs it on machines without it)."""

from __future__ import annotations

import logging
from typing import Any

from worker import metrics
from worker.batch import Item

log = logging.getLogger(__name__)


def account(item: Item, record: dict[str, Any], per_tenant: bool) -> None:
    """Tell what the check found and did: the tenant in its prediction's logs, operators in the worker's log
    (the audit line, with the prediction's id) and on the metrics (per tenant only with KLEIN_METRICS_PER_TENANT)."""
    tenant = item.row["tenant_id"] if per_tenant else ""
    if not record["checked"]:
        item.report.note(f"safety check: not run ({record['reason']})")
        metrics.SAFETY_PREDICTIONS.labels("unchecked", tenant).inc()
        return
    flagged, policy = sum(record["flagged"]), record["policy"]
    done = {"block": "blocked: nothing stored", "blur": "blurred", "flag": "flagged, stored as made"}[policy]
    outcome = "passed" if not flagged else {"block": "blocked", "blur": "blurred", "flag": "flagged"}[policy]
    item.report.note(
        f"safety check ({record['model']}): {flagged} of {len(record['flagged'])} outputs flagged"
        + (f"; {done}" if flagged else "")
    )
    metrics.SAFETY_PREDICTIONS.labels(outcome, tenant).inc()
    if flagged:
        metrics.SAFETY_FLAGGED_OUTPUTS.labels(tenant).inc(flagged)
        log.warning(
            "safety audit: prediction %s of tenant %s: %d of %d outputs flagged by %s (scores %s); policy %s",
            item.row["id"],
            item.row["tenant_id"],
            flagged,
            len(record["flagged"]),
            record["model"],
            record["scores"],
            policy,
        )
