"""What operators see of the image checker (worker/safety_audit.py): the audit line with the prediction's id, the
metrics by outcome (a tenant label only with KLEIN_METRICS_PER_TENANT), and the note in the tenant's logs."""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime

import pytest
import redis
from prometheus_client import REGISTRY

from core import safety
from core.settings import Settings
from tests.stack import REDIS_URL
from worker.batch import Item
from worker.report import Report
from worker.safety_audit import account


def item(tenant_id: str) -> Item:
    now, prediction_id = datetime.now(UTC), secrets.token_hex(8)
    row = {"id": prediction_id, "tenant_id": tenant_id, "created_at": now, "started_at": now}
    settings = Settings(queue_name=f"klein-test-audit-{secrets.token_hex(4)}")
    return Item(row, Report(redis.Redis.from_url(REDIS_URL), settings, prediction_id, now))


def count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_flagged_prediction_is_audited_counted_and_told(caplog: pytest.LogCaptureFixture) -> None:
    tenant = "tenant-" + secrets.token_hex(4)
    blurred = item(tenant)
    before = count("klein_worker_safety_predictions_total", outcome="blurred", tenant="")
    flagged_before = count("klein_worker_safety_flagged_outputs_total", tenant="")
    with caplog.at_level(logging.WARNING, logger="worker.safety_audit"):
        account(blurred, safety.checked("blur", "nsfw-model", [False, True], [0.1, 0.93]), per_tenant=False)
    assert count("klein_worker_safety_predictions_total", outcome="blurred", tenant="") == before + 1
    assert count("klein_worker_safety_flagged_outputs_total", tenant="") == flagged_before + 1
    (audit,) = [r.getMessage() for r in caplog.records if "safety audit" in r.getMessage()]
    assert blurred.row["id"] in audit and tenant in audit and "1 of 2 outputs flagged by nsfw-model" in audit
    assert blurred.report.logs[-1]["message"] == "safety check (nsfw-model): 1 of 2 outputs flagged; blurred"

    per_tenant = item(tenant)  # KLEIN_METRICS_PER_TENANT: the tenant's own series
    account(per_tenant, safety.checked("block", "nsfw-model", [False], [0.2]), per_tenant=True)
    assert count("klein_worker_safety_predictions_total", outcome="passed", tenant=tenant) == 1

    unchecked = item(tenant)
    account(unchecked, safety.unchecked("block", safety.NOT_CONFIGURED), per_tenant=False)
    assert unchecked.report.logs[-1]["message"].startswith("safety check: not run (no safety checker is configured")
