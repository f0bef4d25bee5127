"""Security review items, each with a test: isolation on every read path, secrets out of logs, link expiry."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx

from core import signing
from core.ids import new_id
from core.settings import Settings
from core.tenants import IssuedKey
from ops.embedded import start_api
from tests.conftest import ADMIN_KEY, Stack, make_tenant
from tests.images import picture


def test_every_read_path_is_tenant_scoped(stack: Stack, client: httpx.Client, tenant: IssuedKey) -> None:
    done = client.post(
        "/v1/predictions", headers={"Model": "flux-klein-4b", "Try-Sync": "true"}, json={"input": {"prompt": "mine"}}
    ).json()
    assert done["status"] == "succeeded"
    upload = client.post("/v1/files", files={"content": ("a.png", picture(), "image/png")}).json()
    other = make_tenant(stack.engine)
    with httpx.Client(base_url=stack.api_url, headers={"apikey": other.key}) as intruder:
        for path in (
            f"/v1/predictions/status/{done['id']}",
            done["generation_url"].removeprefix(stack.api_url),
            f"/v1/files/{upload['id']}",
            f"/api/v3/predictions/{done['id']}/result",
        ):
            assert intruder.get(path).status_code == 404, path
        assert intruder.post(f"/v1/predictions/{done['id']}/cancel").status_code == 404
        assert intruder.get("/v1/usage").json()["total"]["predictions"] == 0
        assert {k["id"] for k in intruder.get("/v1/keys").json()["data"]} == {other.key_id}
    assert client.get("/v1/usage").json()["total"]["predictions"] == 1


def test_keys_never_reach_the_logs(stack: Stack, tenant: IssuedKey) -> None:
    httpx.get(f"{stack.api_url}/v1/keys", headers={"apikey": tenant.key})
    httpx.get(f"{stack.api_url}/v1/keys", headers={"apikey": tenant.key + "-wrong"})
    httpx.post(f"{stack.api_url}/v1/keys", headers={"apikey": tenant.key}, json={"name": "x"})
    time.sleep(0.5)
    for log in stack.logs.glob("*.log"):
        text = log.read_text()
        assert tenant.key not in text and tenant.key[10:] not in text, log


def test_errors_carry_no_stack_traces(stack: Stack, client: httpx.Client) -> None:
    answers = [
        client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, content=b"{", timeout=10),
        client.get("/v1/predictions/status/" + "x" * 500),
        client.post("/v1/images/generations", json={"prompt": 1}),
        client.post("/api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image", content=b"\xff\xfe"),
        client.post("/v1/generate", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data; boundary=x"}),
    ]
    for answer in answers:
        assert answer.status_code < 500, answer.text
        assert "Traceback" not in answer.text and 'File "' not in answer.text


def test_signed_links_expire_and_bind_to_their_file() -> None:
    settings = Settings(url_signing_key="k" * 32, signed_url_ttl_s=60)
    url = signing.sign(settings, "https://h/v1/predictions/delivery/p/output.jpg", "p", "output.jpg")
    expires, signature = (part.split("=")[1] for part in url.split("?")[1].split("&"))
    assert signing.verify(settings, "p", "output.jpg", int(expires), signature)
    assert not signing.verify(settings, "p", "output_1.jpg", int(expires), signature)
    assert not signing.verify(settings, "q", "output.jpg", int(expires), signature)
    assert not signing.verify(settings, "p", "output.jpg", int(time.time()) - 1, signature)
    other_key = Settings(url_signing_key="z" * 32)
    assert not signing.verify(other_key, "p", "output.jpg", int(expires), signature)


def test_concurrent_try_sync_waits_are_capped_per_tenant(stack: Stack, tenant: IssuedKey) -> None:
    api, url = start_api(stack.env | {"KLEIN_MAX_SYNC_WAITS_PER_TENANT": "1"}, stack.logs / "api-waits.log")
    try:
        headers = {"apikey": tenant.key, "Model": "flux-klein-4b", "Try-Sync": "true"}

        async def timed(http: httpx.AsyncClient) -> tuple[int, float]:
            started = time.monotonic()
            answer = await http.post(f"{url}/v1/predictions", headers=headers, json={"input": {"prompt": "w"}})
            return answer.status_code, time.monotonic() - started

        async def three() -> list[tuple[int, float]]:
            async with httpx.AsyncClient(timeout=180) as http:
                return list(await asyncio.gather(*(timed(http) for _ in range(3))))

        answers = asyncio.run(three())
        # An image takes most of a second here: whoever answered 201 within half a second did not wait.
        at_once = [seconds for status, seconds in answers if status == 201 and seconds < 0.5]
        assert len(at_once) == 2, answers
    finally:
        api.stop()


def test_an_empty_admin_key_disables_the_admin_api_rather_than_opening_it() -> None:
    assert Settings(admin_api_key="", url_signing_key=" ").admin_api_key is None
    assert Settings(admin_api_key="", url_signing_key=" ").url_signing_key is None


def test_prediction_ids_carry_130_random_bits_as_26_base32_letters() -> None:
    ids = [new_id() for _ in range(32_000)]
    assert len(set(ids)) == len(ids)
    assert {len(i) for i in ids} == {26}
    letters = Counter("".join(ids))
    assert set(letters) == set("abcdefghijklmnopqrstuvwxyz234567")
    expected = 26 * len(ids) / 32  # 26,000 of each letter; a standard deviation is about 158
    assert all(abs(count - expected) < 1_000 for count in letters.values())


def _admin_guesses(client: httpx.Client, url: str, count: int, forwarded_for: str | None = None) -> list[int]:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    return [client.get(url, headers=headers | {"X-Admin-Key": f"guess-{i}"}).status_code for i in range(count)]


def test_the_right_admin_key_works_after_wrong_ones_from_the_same_address(stack: Stack) -> None:
    """From 127.0.0.3 (another client address on loopback): after the allowed failures its wrong keys get 429,
    but the right key is checked first and always let in, so a guesser cannot lock the operators out."""
    limit = stack.settings.admin_failures_per_minute
    url = f"{stack.api_url}/admin/v1/tenants"
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3")) as shared:
        assert _admin_guesses(shared, url, limit + 2) == [401] * limit + [429] * 2
        throttled = shared.get(url, headers={"X-Admin-Key": "one-more-guess"})
        assert throttled.status_code == 429 and 1 <= int(throttled.headers["retry-after"]) <= 60
        assert shared.get(url, headers={"X-Admin-Key": ADMIN_KEY}).status_code == 200
        assert shared.get(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
        assert shared.get(url, headers={"X-Admin-Key": "and-another"}).status_code == 429  # still counted
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.7")) as elsewhere:
        assert elsewhere.get(url, headers={"X-Admin-Key": "first-guess"}).status_code == 401  # per address


def test_forwarded_client_addresses_are_believed_only_from_a_trusted_proxy(stack: Stack, tmp_path: Path) -> None:
    """An API whose uvicorn trusts proxy headers from 127.0.0.5 only (FORWARDED_ALLOW_IPS, docs/operations.md).
    A peer elsewhere that makes up an X-Forwarded-For per guess is still counted as itself; through the proxy,
    each forwarded client address is counted on its own."""
    api, api_url = start_api(stack.env | {"FORWARDED_ALLOW_IPS": "127.0.0.5"}, tmp_path / "api.log")
    limit = stack.settings.admin_failures_per_minute
    url = f"{api_url}/admin/v1/tenants"
    try:
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.6")) as untrusted:
            spoofed = [
                untrusted.get(url, headers={"X-Admin-Key": f"g{i}", "X-Forwarded-For": f"198.51.100.{i}"}).status_code
                for i in range(limit + 2)
            ]
            assert spoofed == [401] * limit + [429] * 2
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.5")) as proxy:
            assert _admin_guesses(proxy, url, limit + 1, forwarded_for="203.0.113.10") == [401] * limit + [429]
            assert _admin_guesses(proxy, url, 1, forwarded_for="203.0.113.11") == [401]  # another client
            assert _admin_guesses(proxy, url, 1, forwarded_for="127.0.0.6") == [429]  # the one above, forwarded
            assert _admin_guesses(proxy, url, 1) == [401]  # the proxy itself was not counted for its clients
    finally:
        api.stop()
