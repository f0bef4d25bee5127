"""Events out, on the real stack: signed webhooks sent by the real webhook worker to a real receiver, their
retries, log and replays; progress, queue position and logs in the views; the Server-Sent Event stream."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from httpx_sse import ServerSentEvent, connect_sse
from sqlalchemy import select, update
from standardwebhooks import Webhook, WebhookVerificationError

from api.services import live
from core import lifecycle
from core.ids import new_id
from core.settings import Settings
from core.tables import predictions, webhook_deliveries
from core.tenants import IssuedKey
from ops.embedded import Service, start_webhook_worker
from tests.conftest import Stack
from tests.receiver import Receiver

PROMPT = "a lighthouse on a cliff at dusk"
INPUT = {"prompt": PROMPT, "aspect_ratio": "1:1", "num_inference_steps": 4}
WEBHOOK_ENV = {
    "KLEIN_WEBHOOK_TIMEOUT_S": "2",
    "KLEIN_WEBHOOK_RETRY_BASE_S": "0.4",
    "KLEIN_WEBHOOK_POLL_INTERVAL_S": "0.1",
}


def _start_webhooks(stack: Stack, name: str, **env: str) -> Service:
    return start_webhook_worker(stack.env | WEBHOOK_ENV | env, stack.logs / f"{name}.log", name)


@pytest.fixture(scope="module")
def webhook_worker(stack: Stack) -> Iterator[Service]:
    worker = _start_webhooks(stack, "webhooks")
    yield worker
    worker.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


def submit(client: httpx.Client, webhook: str, events: list[str] | None = None, **input: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"input": INPUT | input, "webhook": webhook}
    if events is not None:
        body["webhook_events_filter"] = events
    answer = client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()


def secret_of(client: httpx.Client) -> str:
    key: str = client.get("/v1/webhooks/default/secret").json()["key"]
    assert key.startswith("whsec_")
    return key


def deliveries(client: httpx.Client, **filters: str) -> list[dict[str, Any]]:
    answer = client.get("/v1/webhooks/deliveries", params=filters)
    assert answer.status_code == 200, answer.text
    data: list[dict[str, Any]] = answer.json()["data"]
    return data


def wait_until_final(client: httpx.Client, prediction_id: str, timeout_s: float = 180) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = deliveries(client, prediction_id=prediction_id)
        if found and all(d["status"] in ("delivered", "failed", "gone") for d in found):
            return found
        time.sleep(0.1)
    raise AssertionError(f"deliveries not final after {timeout_s} s: {found}")


# These two run first, each with a webhook worker of its own, before the module's shared one starts
# (pytest runs a module's tests in order; the fixture starts at its first use).


def test_a_killed_webhook_worker_loses_nothing(stack: Stack, client: httpx.Client) -> None:
    receiver = Receiver(answers=lambda n: (200, 30.0 if n == 0 else 0.0, {})).start()
    doomed = _start_webhooks(stack, "webhooks-doomed")
    try:
        prediction = submit(client, receiver.url)
        receiver.wait_for(1)
        assert doomed.process is not None
        os.kill(doomed.process.pid, signal.SIGKILL)  # mid-delivery: the receiver has not answered
        doomed.process.wait()
        survivor = _start_webhooks(stack, "webhooks-survivor")
        try:
            got = receiver.wait_for(2, timeout_s=120)
            (final,) = wait_until_final(client, prediction["id"])
        finally:
            survivor.stop()
    finally:
        doomed.stop()
        receiver.stop()
    assert got[0].headers["webhook-id"] == got[1].headers["webhook-id"] == final["id"]
    assert final["status"] == "delivered" and final["attempt_count"] == 2


def test_a_receiver_that_turns_private_is_refused_at_send(
    stack: Stack, client: httpx.Client, receiver: Receiver
) -> None:
    """Allowed at submit; at send the worker's guard (here without the test host on its allowlist, as when
    DNS now answers a private address) refuses it, records why, and retries later."""
    strict = _start_webhooks(stack, "webhooks-strict", KLEIN_FETCH_ALLOWLIST="[]")
    try:
        prediction = submit(client, receiver.url)
        deadline = time.monotonic() + 90
        while not (found := deliveries(client, prediction_id=prediction["id"])) or not found[0]["attempts"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        strict.stop()
    assert "non-public address" in found[0]["attempts"][0]["error"]
    assert receiver.received == []


def test_events_are_signed_ordered_and_the_status_views_shape(
    client: httpx.Client, webhook_worker: Service, receiver: Receiver
) -> None:
    secret = secret_of(client)
    prediction = submit(client, receiver.url, ["start", "output", "completed"])
    got = receiver.wait_for(3)
    time.sleep(0.3)
    assert len(receiver.received) == 3, "each event once"
    payloads = [Webhook(secret).verify(r.body, r.headers) for r in got]  # raises unless signed by our secret
    assert [p["status"] for p in payloads] == ["processing", "succeeded", "succeeded"]
    assert len({r.headers["webhook-id"] for r in got}) == 3
    status = client.get(f"/v1/predictions/status/{prediction['id']}").json()
    assert payloads[-1] == status, "the completed payload is the status endpoint's view"
    assert payloads[0]["completed_at"] is None and "generation_url" not in payloads[0], "the state at the event"
    logged = wait_until_final(client, prediction["id"])
    assert sorted(d["event"] for d in logged) == ["completed", "output", "start"]
    assert {d["id"] for d in logged} == {r.headers["webhook-id"] for r in got}
    for delivery in logged:
        assert delivery["status"] == "delivered"
        (attempt,) = delivery["attempts"]
        assert attempt["status_code"] == 200 and attempt["response_head"] == "ok" and attempt["latency_ms"] >= 0
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 44).verify(got[0].body, got[0].headers)


def test_the_default_filter_is_completed_and_each_dialect_posts_its_own_view(
    stack: Stack, tenant: IssuedKey, webhook_worker: Service, receiver: Receiver
) -> None:
    with httpx.Client(base_url=stack.api_url, headers={"apikey": tenant.key}, timeout=180) as http:
        secret = secret_of(http)
        pruna = submit(http, receiver.url)
        receiver.wait_for(1)
        ws = http.post(
            "/api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image",
            params={"webhook": receiver.url},
            json={"prompt": PROMPT, "size": "256*256"},
        )
        assert ws.status_code == 200, ws.text
        receiver.wait_for(2)
        own_secret = "my-own-webhook-secret"
        png = http.post(
            "/v1/generate",
            json={
                "prompt": PROMPT,
                "aspect_ratio": "square",
                "webhook_url": receiver.url,
                "webhook_secret": own_secret,
            },
        )
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        receiver.wait_for(3)
        openai = http.post(
            "/v1/images/generations", json={"prompt": PROMPT, "size": "256x256", "webhook_url": receiver.url}
        )
        assert openai.status_code == 200, openai.text
        got = receiver.wait_for(4)
    first, second, third, fourth = got
    assert Webhook(secret).verify(first.body, first.headers)["id"] == pruna["id"]
    data = Webhook(secret).verify(second.body, second.headers)
    assert data["id"] == ws.json()["data"]["id"] and data["status"] == "completed" and data["outputs"]
    assert httpx.get(data["outputs"][0]).status_code == 200, "WaveSpeed's outputs open without a key"
    generated = Webhook(own_secret.encode()).verify(third.body, third.headers)
    assert generated["id"] == png.headers["x-prediction-id"] and generated["images"]
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(third.body, third.headers)  # the client's own secret, not the tenant's
    images = Webhook(secret).verify(fourth.body, fourth.headers)
    assert images["id"] == openai.json()["id"] and httpx.get(images["data"][0]["url"]).status_code == 200
    stored = http_get_input(stack, png.headers["x-prediction-id"])
    assert "webhook_secret" not in stored and own_secret not in orjson.dumps(stored).decode()


def http_get_input(stack: Stack, prediction_id: str) -> dict[str, Any]:
    with stack.engine.connect() as conn:
        row = conn.execute(select(predictions.c.input).where(predictions.c.id == prediction_id)).one()
    return dict(row.input)


def test_a_receiver_down_then_up_gets_the_event_once_with_the_same_id(
    client: httpx.Client, webhook_worker: Service
) -> None:
    receiver = Receiver()
    receiver.port = _free_port_on_test_host()
    prediction = submit(client, receiver.url)
    deadline = time.monotonic() + 90
    while not any(d["attempts"] for d in deliveries(client, prediction_id=prediction["id"])):
        assert time.monotonic() < deadline, "no attempt was made"
        time.sleep(0.1)
    (delivery,) = deliveries(client, prediction_id=prediction["id"])
    assert delivery["status"] in ("pending", "sending")
    assert delivery["attempts"][0]["status_code"] is None and delivery["attempts"][0]["error"]
    receiver.start()
    try:
        (got,) = receiver.wait_for(1)
        (final,) = wait_until_final(client, prediction["id"])
        time.sleep(0.5)
        assert len(receiver.received) == 1
    finally:
        receiver.stop()
    assert final["status"] == "delivered" and got.headers["webhook-id"] == final["id"] == delivery["id"]
    assert [a["status_code"] for a in final["attempts"]][-1] == 200 and len(final["attempts"]) >= 2


def test_failures_back_off_exponentially_then_410_stops(client: httpx.Client, webhook_worker: Service) -> None:
    receiver = Receiver(answers=lambda n: (500, 0.0, {}) if n < 3 else (200, 0.0, {})).start()
    try:
        prediction = submit(client, receiver.url)
        got = receiver.wait_for(4, timeout_s=120)
    finally:
        receiver.stop()
    assert len({r.headers["webhook-id"] for r in got}) == 1, "every attempt carries the event's id"
    gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
    base = float(WEBHOOK_ENV["KLEIN_WEBHOOK_RETRY_BASE_S"])
    for n, gap in enumerate(gaps):  # 0.4, 1.2, 3.6 s, each ±20 %, plus up to a poll interval and a round trip
        expected = base * 3**n
        assert 0.8 * expected - 0.05 <= gap <= 1.2 * expected + 0.5, (n, gap, gaps)
    (final,) = wait_until_final(client, prediction["id"])
    assert [a["status_code"] for a in final["attempts"]] == [500, 500, 500, 200]

    gone = Receiver(answers=lambda n: (410, 0.0, {})).start()
    try:
        prediction = submit(client, gone.url)
        gone.wait_for(1)
        (final,) = wait_until_final(client, prediction["id"])
        time.sleep(1.0)
        assert len(gone.received) == 1 and final["status"] == "gone"
    finally:
        gone.stop()


def test_redirects_are_not_followed_and_replay_resends_the_same_event(
    stack: Stack, client: httpx.Client, webhook_worker: Service, receiver: Receiver
) -> None:
    elsewhere = Receiver(answers=lambda n: (307, 0.0, {"location": receiver.url}) if n < 2 else (200, 0.0, {}))
    elsewhere.start()
    try:
        prediction = submit(client, elsewhere.url)
        elsewhere.wait_for(3, timeout_s=90)
        (final,) = wait_until_final(client, prediction["id"])
    finally:
        elsewhere.stop()
    assert [a["status_code"] for a in final["attempts"]] == [307, 307, 200]
    assert receiver.received == [], "the redirect's target was never called"

    again = Receiver().start()
    try:
        with stack.engine.begin() as conn:  # as if the tenant had moved its endpoint
            conn.execute(update(webhook_deliveries).where(webhook_deliveries.c.id == final["id"]).values(url=again.url))
        replayed = client.post(f"/v1/webhooks/deliveries/{final['id']}/replay")
        assert replayed.status_code == 202
        (got,) = again.wait_for(1)
        assert got.headers["webhook-id"] == final["id"]
    finally:
        again.stop()
    assert client.post("/v1/webhooks/deliveries/msg_nope/replay").status_code == 404


def test_rotation_signs_with_both_secrets_during_the_overlap(
    client: httpx.Client, webhook_worker: Service, receiver: Receiver
) -> None:
    old = secret_of(client)
    rotated = client.post("/v1/webhooks/default/secret/rotate").json()
    new = rotated["key"]
    assert new != old and rotated["previous_key"] == old and rotated["previous_key_retires_at"]
    submit(client, receiver.url)
    (got,) = receiver.wait_for(1)
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(got.body, got.headers)
    Webhook(new).verify(got.body, got.headers)

    latest = client.post("/v1/webhooks/default/secret/rotate", params={"overlap_s": 0}).json()
    assert "previous_key" not in latest
    submit(client, receiver.url)
    second = receiver.wait_for(2)[1]
    Webhook(latest["key"]).verify(second.body, second.headers)
    for retired in (old, new):
        with pytest.raises(WebhookVerificationError):
            Webhook(retired).verify(second.body, second.headers)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/hook", "http://169.254.169.254/latest", "http://[::ffff:10.0.0.1]/", "ftp://x/y"]
)
def test_private_receivers_are_refused_at_submit_in_each_dialects_shape(
    stack: Stack, client: httpx.Client, url: str
) -> None:
    pruna = client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json={"input": INPUT, "webhook": url})
    assert pruna.status_code == 422 and "webhook" in pruna.json()["error"]
    ws = client.post(
        "/api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image", params={"webhook": url}, json={"prompt": PROMPT}
    )
    assert ws.status_code == 422 and ws.json()["code"] == 422 and "webhook" in ws.json()["message"]
    generate = client.post("/v1/generate", json={"prompt": PROMPT, "webhook_url": url})
    assert generate.status_code == 422 and "webhook_url" in generate.json()["detail"]
    openai = client.post("/v1/images/generations", json={"prompt": PROMPT, "webhook_url": url})
    assert openai.status_code == 422 and "webhook_url" in openai.json()["error"]["message"]


def test_bad_webhook_fields_are_422(client: httpx.Client, receiver: Receiver) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"webhook": receiver.url, "webhook_events_filter": ["logs"]}, "webhook_events_filter"),
        ({"webhook": receiver.url, "webhook_events_filter": "completed"}, "webhook_events_filter"),
        ({"webhook": 7}, "webhook"),
        ({"webhook": "http://" + "a" * 3000 + ".com/"}, "webhook"),
    ]
    for body, field in cases:
        answer = client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json={"input": INPUT, **body})
        assert answer.status_code == 422 and field in answer.json()["error"], answer.text
    short = client.post("/v1/generate", json={"prompt": PROMPT, "webhook_url": receiver.url, "webhook_secret": "x"})
    assert short.status_code == 422 and "webhook_secret" in short.json()["detail"]


def _read(stream_url: str, client: httpx.Client, headers: dict[str, str], stop_after: str | None = None) -> list[Any]:
    events: list[ServerSentEvent] = []
    with connect_sse(client, "GET", stream_url, headers=headers) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for event in source.iter_sse():
            events.append(event)
            if event.event == "done" or event.event == stop_after:
                break
    return events


def test_the_event_stream_shows_queued_progress_done_and_resumes(client: httpx.Client) -> None:
    prediction = submit(client, webhook="", num_inference_steps=6)
    url = f"/v1/predictions/{prediction['id']}/stream"
    whole: list[ServerSentEvent] = []
    reader = threading.Thread(target=lambda: whole.extend(_read(url, client, {})))
    reader.start()
    dropped = _read(url, client, {}, stop_after="progress")  # the connection drops after the first step
    resumed = _read(url, client, {"Last-Event-ID": dropped[-1].id})
    reader.join(60)

    kinds = [e.event for e in whole]
    assert kinds[0] == "status" and orjson.loads(whole[0].data)["status"] in ("starting", "processing")
    steps = [orjson.loads(e.data)["step"] for e in whole if e.event == "progress"]
    assert steps == [1, 2, 3, 4, 5, 6], "every step, in order"
    assert kinds[-2:] == ["output", "done"] and orjson.loads(whole[-1].data)["status"] == "succeeded"
    claimed = next(orjson.loads(e.data) for e in whole if e.event == "status" and e.id)
    assert claimed["status"] == "processing" and claimed["worker"]
    messages = [orjson.loads(e.data)["message"] for e in whole if e.event == "log"]
    assert messages[0].startswith("claimed by worker") and messages[-1] == "completed"
    assert any(m.startswith("encoded") for m in messages) and any(m.startswith("uploaded") for m in messages)
    output = orjson.loads(whole[-2].data)["urls"][0]
    assert httpx.get(output).status_code == 200

    entries = [(e.id, e.event, e.data) for e in whole if e.id]
    seen = [(e.id, e.event, e.data) for e in dropped + resumed if e.id]
    assert seen == entries, "the resumed stream misses nothing and repeats nothing"
    assert [e.event for e in resumed][-2:] == ["output", "done"]

    done = orjson.loads(whole[-1].data)
    assert done["logs"][0]["message"] == "queued"
    assert any(line["message"] == "step 6/6" for line in done["logs"])


def test_stream_errors(client: httpx.Client, stack: Stack, tenant: IssuedKey) -> None:
    assert client.get("/v1/predictions/nope/stream").status_code == 404
    prediction = submit(client, webhook="")
    bad = client.get(f"/v1/predictions/{prediction['id']}/stream", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 422
    with httpx.Client(base_url=stack.api_url) as anonymous:
        assert anonymous.get(f"/v1/predictions/{prediction['id']}/stream").status_code == 401


def test_queue_position_counts_what_runs_first_and_eta_uses_the_fleets_pace(
    stack: Stack, client: httpx.Client, tenant: IssuedKey, settings: Settings
) -> None:
    first = submit(client, webhook="")  # one run at least, for the pace
    deadline = time.monotonic() + 120
    while client.get(f"/v1/predictions/status/{first['id']}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(live.VIEW_TTL_S)  # the shared view of the fleet's pace, from before that run, has expired
    ids = {name: new_id() for name in ("early", "late", "urgent")}
    params = {"prompt": PROMPT, "width": 256, "height": 256, "num_inference_steps": 4, "guidance_scale": 1.0}
    for name, priority in (("early", 6), ("late", 6), ("urgent", 0)):
        with stack.engine.begin() as conn:  # stored, not enqueued: they wait for the test's reads
            conn.execute(
                lifecycle.create(
                    prediction_id=ids[name],
                    tenant_id=tenant.tenant_id,
                    api_key_id=tenant.key_id,
                    model="flux-klein-4b",
                    input={"prompt": PROMPT, "model": "wavespeed-ai/flux-2-klein-4b/text-to-image"},
                    params=params | {"seed": 1, "output_format": "png", "output_quality": 90},
                ).values(priority=priority)
            )
    try:
        views = {name: client.get(f"/v1/predictions/status/{i}").json() for name, i in ids.items()}
        assert views["late"]["queue_position"] == views["early"]["queue_position"] + 1
        assert views["urgent"]["queue_position"] < views["early"]["queue_position"]
        assert views["early"]["eta_s"] is not None and views["early"]["eta_s"] > 0
        assert views["late"]["eta_s"] >= views["early"]["eta_s"]
        assert views["early"]["logs"][0]["message"] == "queued"
        ws = client.get(f"/api/v3/predictions/{ids['late']}/result").json()["data"]
        assert ws["queue_position"] == views["late"]["queue_position"]
    finally:
        with stack.engine.begin() as conn:
            conn.execute(update(predictions).where(predictions.c.id.in_(ids.values())).values(status="canceled"))


def _free_port_on_test_host() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port: int = probe.getsockname()[1]
        return port
