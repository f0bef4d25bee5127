"""`GET /v1/predictions` (the playground's history) and the console's queue and failures, on the real stack;
the pages' own headers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from core.tenants import IssuedKey
from tests.conftest import ADMIN_KEY, Stack, make_tenant
from tests.e2e.test_worker import poison_prediction, wait_for


def submit(client: httpx.Client, prompt: str, sync: bool = False) -> str:
    headers = {"Model": "flux-klein-4b"} | ({"Try-Sync": "true"} if sync else {})
    answer = client.post("/v1/predictions", headers=headers, json={"input": {"prompt": prompt}})
    assert answer.status_code in (200, 201), answer.text
    prediction_id: str = answer.json()["id"]
    return prediction_id


def test_the_list_is_newest_first_paged_filtered_and_the_tenants_own(stack: Stack, client: httpx.Client) -> None:
    ids = [submit(client, f"history {i}", sync=True) for i in range(5)]
    other = make_tenant(stack.engine)
    with httpx.Client(base_url=stack.api_url, headers={"apikey": other.key}, timeout=180) as stranger:
        submit(stranger, "not yours", sync=True)
        assert stranger.get("/v1/predictions").json()["results"][0]["input"]["prompt"] == "not yours"

    seen: list[str] = []
    cursor = None
    while True:
        page = client.get("/v1/predictions", params={"limit": 2} | ({"cursor": cursor} if cursor else {})).json()
        assert len(page["results"]) <= 2
        seen += [result["id"] for result in page["results"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == list(reversed(ids)), "newest first, every one once, none of another tenant's"

    newest = client.get("/v1/predictions", params={"limit": 1}).json()["results"][0]
    assert newest["status"] == "succeeded" and newest["logs"][0]["message"] == "queued"
    assert newest["urls"]["get"].endswith(f"/v1/predictions/status/{newest['id']}")
    assert newest["urls"]["stream"].endswith(f"/v1/predictions/{newest['id']}/stream")
    (thumbnail,) = newest["urls"]["outputs"]
    assert httpx.get(thumbnail).status_code == 200, "signed: opens without a key"

    assert client.get("/v1/predictions", params={"status": "failed"}).json()["results"] == []
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert client.get("/v1/predictions", params={"created_after": later}).json()["results"] == []
    for bad in ({"cursor": "bm9wZQ"}, {"status": "done"}, {"limit": 0}, {"created_after": "2026-12-03T00:00:00"}):
        assert client.get("/v1/predictions", params=bad).status_code == 422, bad


def test_the_console_sees_the_queue_and_recent_failures(stack: Stack, tenant: IssuedKey) -> None:
    failed = wait_for(stack, poison_prediction(stack, tenant))
    assert failed["status"] == "failed"
    admin = {"X-Admin-Key": ADMIN_KEY}
    queue = httpx.get(f"{stack.api_url}/admin/v1/queue", headers=admin).json()
    assert set(queue["depth"]) == {"0", "3", "6", "8", "9"} and queue["live_workers"] >= 1
    assert set(queue) >= {"oldest_age_s", "webhook_backlog"}
    failures = httpx.get(f"{stack.api_url}/admin/v1/failures", headers=admin, params={"limit": 5}).json()["data"]
    assert failures[0]["id"] == failed["id"] and failures[0]["error"] == failed["error"]
    assert failures[0]["tenant_id"] == tenant.tenant_id
    assert httpx.get(f"{stack.api_url}/admin/v1/queue", headers={"apikey": tenant.key}).status_code == 401


def test_the_pages_are_served_with_a_strict_policy(stack: Stack) -> None:
    for path in ("/", "/console"):
        page = httpx.get(f"{stack.api_url}{path}")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{stack.api_url}/static/../core/settings.py").status_code == 404
