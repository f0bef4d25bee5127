"""The operator's actions on the real stack, through the admin API and the `klein` CLI: any tenant's prediction
looked up, canceled, deleted and requeued (it runs again on the real worker); a tenant suspended (403 in each
dialect's shape; reads and in-flight work go on) and resumed; the webhook delivery log across tenants, and
replays that a real receiver gets."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import delete, insert

from core import lifecycle, progress
from core.ids import new_id
from core.tables import webhook_deliveries
from core.tenants import IssuedKey
from models.klein import KleinInput
from ops.embedded import Service, start_webhook_worker
from tests.conftest import ADMIN_KEY, Stack, make_tenant
from tests.e2e.test_worker import row, wait_for
from tests.receiver import Receiver

MODEL = {"Model": "flux-klein-4b"}
FAST = {"num_inference_steps": 1}  # the tiny pipeline's quickest run


@pytest.fixture(scope="module")
def admin(stack: Stack) -> Iterator[httpx.Client]:
    headers = {"X-Admin-Key": ADMIN_KEY}
    with httpx.Client(base_url=f"{stack.api_url}/admin/v1", headers=headers, timeout=60) as client:
        yield client


def stored(stack: Stack, tenant: IssuedKey, prompt: str = "ops") -> str:
    """A queued row that no task names (the sweeper's business only after minutes): cancelable at leisure."""
    params = KleinInput(prompt=prompt, num_inference_steps=FAST["num_inference_steps"]).to_params(7).model_dump()
    pid = new_id()
    with stack.engine.begin() as conn:
        conn.execute(
            lifecycle.create(
                prediction_id=pid,
                tenant_id=tenant.tenant_id,
                api_key_id=tenant.key_id,
                model="flux-klein-4b",
                input={"prompt": prompt},
                params=params,
            )
        )
    return pid


def failed(stack: Stack, tenant: IssuedKey, prompt: str = "requeue me") -> str:
    """A prediction failed as one whose enqueue failed is (api/services/predictions.py): sound, never run."""
    pid = stored(stack, tenant, prompt)
    with stack.engine.begin() as conn:
        assert conn.execute(lifecycle.fail_unclaimed(pid, "could not be queued")).first() is not None
    return pid


def test_lookup_cancel_and_delete_any_tenants_prediction(stack: Stack, admin: httpx.Client) -> None:
    owner = make_tenant(stack.engine)
    queued = stored(stack, owner)
    found = admin.get(f"/predictions/{queued}")
    assert found.status_code == 200 and found.json()["tenant_id"] == owner.tenant_id
    assert found.json()["status"] == "created" and found.json()["params"]["seed"] == 7
    assert httpx.get(f"{stack.api_url}/admin/v1/predictions/{queued}").status_code == 401
    as_tenant = httpx.get(f"{stack.api_url}/admin/v1/predictions/{queued}", headers={"X-Admin-Key": owner.key})
    assert as_tenant.status_code == 401
    assert admin.get("/predictions/nope").status_code == 404

    canceled = admin.post(f"/predictions/{queued}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    with httpx.Client(base_url=stack.api_url, headers={"apikey": owner.key}, timeout=120) as client:
        assert client.get(f"/v1/predictions/status/{queued}").json()["status"] == "canceled"
    doomed = stored(stack, owner)  # unfinished: canceled first, then its objects deleted, as the tenant's DELETE
    assert admin.delete(f"/predictions/{doomed}").status_code == 204
    gone = row(stack, doomed)
    assert gone["status"] == "canceled" and gone["expired_at"] is not None
    assert admin.delete("/predictions/nope").status_code == 404


def test_a_requeued_failed_prediction_runs_again_on_the_worker(stack: Stack, admin: httpx.Client) -> None:
    owner, bystander = make_tenant(stack.engine), make_tenant(stack.engine)
    one = failed(stack, owner)
    events = redis.Redis.from_url(stack.settings.redis_url)
    old_run = events.xadd(progress.stream_key(stack.settings, one), {"log": '{"message": "the old run"}'})
    assert admin.post(f"/predictions/{one}/requeue").json() == {"requeued": [one]}
    assert events.xrange(progress.stream_key(stack.settings, one), old_run, old_run) == [], "the old run's events go"
    rerun = wait_for(stack, one)
    assert rerun["status"] == "completed" and rerun["error"] is None and len(rerun["outputs"]) == 1
    refused = admin.post(f"/predictions/{one}/requeue")
    assert refused.status_code == 409 and "completed" in refused.json()["error"]

    mine, theirs = [failed(stack, owner, f"set {i}") for i in range(2)], failed(stack, bystander)
    chosen = admin.post("/predictions/requeue", json={"tenant_id": owner.tenant_id, "limit": 1}).json()["requeued"]
    assert len(chosen) == 1 and chosen[0] in mine
    assert row(stack, chosen[0])["status"] in ("created", "processing", "completed")  # it runs as the one above
    assert {row(stack, pid)["status"] for pid in [*set(mine) - set(chosen), theirs]} == {"failed"}
    admin.post(f"/predictions/{chosen[0]}/cancel")  # a second run proves nothing more
    assert admin.post("/predictions/requeue", json={"limit": 5000}).status_code == 422, "bounded"


def test_a_suspended_tenant_submits_nothing_but_reads_and_finishes_its_work(stack: Stack, admin: httpx.Client) -> None:
    owner = make_tenant(stack.engine)
    client = httpx.Client(base_url=stack.api_url, headers={"apikey": owner.key}, timeout=120)
    before = {"input": {"prompt": "before", **FAST}}
    in_flight = client.post("/v1/predictions", headers=MODEL, json=before).json()["id"]
    suspended = admin.post(f"/tenants/{owner.tenant_id}/suspend")
    assert suspended.status_code == 200 and suspended.json()["suspended_at"] is not None

    ours = client.post("/v1/predictions", headers=MODEL, json={"input": {"prompt": "after"}})
    assert ours.status_code == 403 and "suspended" in ours.json()["error"]
    replicate = client.post(
        "/v1/models/black-forest-labs/flux-2-klein-4b/predictions", json={"input": {"prompt": "after"}}
    )
    assert replicate.status_code == 403 and replicate.headers["content-type"] == "application/problem+json"
    assert replicate.json()["title"] == "Forbidden" and "suspended" in replicate.json()["detail"]
    wavespeed = client.post("/api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image", json={"prompt": "after"})
    assert wavespeed.status_code == 403 and "suspended" in wavespeed.json()["message"], wavespeed.text
    assert wait_for(stack, in_flight)["status"] == "completed", "work in flight finishes"
    assert client.get(f"/v1/predictions/status/{in_flight}").json()["status"] == "succeeded"

    assert admin.post(f"/tenants/{owner.tenant_id}/resume").json()["suspended_at"] is None
    again = client.post("/v1/predictions", headers=MODEL, json={"input": {"prompt": "again"}})
    assert again.status_code == 201
    client.post(f"/v1/predictions/{again.json()['id']}/cancel")  # not worth a run
    client.close()


@pytest.fixture(scope="module")
def webhook_worker(stack: Stack) -> Iterator[Service]:
    """Its first non-2xx ends a delivery `failed` (no retry window): failures in a second, not in hours."""
    env = stack.env | {"KLEIN_WEBHOOK_RETRY_WINDOW_S": "0", "KLEIN_WEBHOOK_POLL_INTERVAL_S": "0.1"}
    worker = start_webhook_worker(env, stack.logs / "webhooks-ops.log", "webhooks-ops")
    yield worker
    worker.stop()


def final_deliveries(admin: httpx.Client, tenant_id: str, timeout_s: float = 120) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = admin.get("/webhooks/deliveries", params={"tenant_id": tenant_id}).json()["data"]
        if found and all(d["status"] in ("delivered", "failed", "gone") for d in found):
            return list(found)
        time.sleep(0.1)
    raise AssertionError(f"deliveries of {tenant_id} not final: {found}")


def test_webhook_deliveries_across_tenants_and_replays(
    stack: Stack, admin: httpx.Client, webhook_worker: Service
) -> None:
    down = Receiver(answers=lambda n: (503, 0.0, {}) if n == 0 else (200, 0.0, {})).start()
    up = Receiver().start()
    tenants = {"down": make_tenant(stack.engine), "up": make_tenant(stack.engine)}
    try:
        for name, receiver in (("down", down), ("up", up)):
            with httpx.Client(base_url=stack.api_url, headers={"apikey": tenants[name].key}) as client:
                body = {"input": {"prompt": name, **FAST}, "webhook": receiver.url}
                assert client.post("/v1/predictions", headers=MODEL, json=body).status_code == 201
        (lost,) = final_deliveries(admin, tenants["down"].tenant_id)
        (sent,) = final_deliveries(admin, tenants["up"].tenant_id)
        assert (lost["status"], sent["status"]) == ("failed", "delivered")
        assert lost["tenant_id"] == tenants["down"].tenant_id and lost["attempts"][0]["status_code"] == 503

        failures = {"tenant_id": tenants["down"].tenant_id, "status": "failed"}
        assert [d["id"] for d in admin.get("/webhooks/deliveries", params=failures).json()["data"]] == [lost["id"]]
        elsewhere = failures | {"tenant_id": tenants["up"].tenant_id}
        assert admin.get("/webhooks/deliveries", params=elsewhere).json()["data"] == []
        by_host = admin.get("/webhooks/deliveries", params={"receiver": "127.0.0.2", "limit": 100}).json()["data"]
        assert {lost["id"], sent["id"]} <= {d["id"] for d in by_host}
        assert httpx.get(f"{stack.api_url}/admin/v1/webhooks/deliveries").status_code == 401

        replayed = admin.post("/webhooks/deliveries/replay", json={"tenant_id": tenants["down"].tenant_id})
        assert replayed.status_code == 202 and replayed.json() == {"replayed": [lost["id"]]}
        again = down.wait_for(2)[1]
        assert again.headers["webhook-id"] == lost["id"]
        (now_sent,) = final_deliveries(admin, tenants["down"].tenant_id)
        assert now_sent["status"] == "delivered" and [a["status_code"] for a in now_sent["attempts"]] == [503, 200]

        assert admin.post(f"/webhooks/deliveries/{sent['id']}/replay").status_code == 202
        assert up.wait_for(2)[1].headers["webhook-id"] == sent["id"]
        assert admin.post("/webhooks/deliveries/msg_nope/replay").status_code == 404
    finally:
        down.stop()
        up.stop()


def test_the_backlog_is_shown_by_receiver_host(stack: Stack, admin: httpx.Client) -> None:
    """Deliveries waiting for a receiver (due in an hour: no sender touches them) count under its host."""
    owner = make_tenant(stack.engine)
    pid = stored(stack, owner)
    waiting = [
        {
            "id": f"msg_{new_id()}",
            "tenant_id": owner.tenant_id,
            "prediction_id": pid,
            "event": "completed",
            "url": f"https://user@Hooks.Slow.Example:8443/{n}?a=b",
            "snapshot": {},
            "next_attempt_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600)),
        }
        for n in range(2)
    ]
    with stack.engine.begin() as conn:
        conn.execute(insert(webhook_deliveries), waiting)
    try:
        receivers = {r["receiver"]: r for r in admin.get("/queue").json()["webhook_receivers"]}
        assert receivers["hooks.slow.example"]["backlog"] == 2 and "other" in receivers
        listed = admin.get("/webhooks/deliveries", params={"receiver": "hooks.slow.example"}).json()["data"]
        assert {d["id"] for d in listed} == {str(d["id"]) for d in waiting}
    finally:
        with stack.engine.begin() as conn:
            conn.execute(delete(webhook_deliveries).where(webhook_deliveries.c.prediction_id == pid))
        admin.post(f"/predictions/{pid}/cancel")


def test_the_cli_runs_the_operator_actions(stack: Stack) -> None:
    env = os.environ | {k: v for k, v in stack.env.items() if k.startswith("KLEIN_")}
    env["KLEIN_ADMIN_URL"] = stack.api_url

    def klein(*args: str, ok: bool = True) -> str:
        done = subprocess.run([sys.executable, "-m", "ops.cli", *args], env=env, capture_output=True, text=True)
        assert (done.returncode == 0) == ok, done.stdout + done.stderr
        return done.stdout + done.stderr

    owner = make_tenant(stack.engine)
    queued, broken = stored(stack, owner), failed(stack, owner)
    assert f'"id": "{queued}"' in klein("prediction", queued)
    assert '"status": "canceled"' in klein("cancel", queued)
    assert broken in klein("requeue", "--tenant", owner.tenant_id, "--limit", "10")
    assert row(stack, broken)["status"] != "failed"
    assert "409" in klein("requeue", broken, ok=False)
    assert '"suspended_at": null' not in klein("suspend", owner.tenant_id)
    with httpx.Client(base_url=stack.api_url, headers={"apikey": owner.key} | MODEL) as client:
        assert client.post("/v1/predictions", json={"input": {"prompt": "no"}}).status_code == 403
        assert '"suspended_at": null' in klein("resume", owner.tenant_id)
        accepted = client.post("/v1/predictions", json={"input": {"prompt": "yes"}})
        assert accepted.status_code == 201
        client.post(f"/v1/predictions/{accepted.json()['id']}/cancel")  # not worth a run
    assert klein("deliveries", "--tenant", owner.tenant_id).strip().startswith("{")
    assert "delete: done" in klein("delete", broken)
