"""Issue 29, item 2, on the real stack: a request that will be refused costs no download and leaves nothing
stored. A LoRA that does not fit the model is refused as soon as its header is in; a tenant at its in-flight cap
is refused before any LoRA or reference URL is fetched, in every dialect; a tenant's unexpired uploads are
bounded by KLEIN_MAX_TENANT_UPLOAD_BYTES."""

from __future__ import annotations

import contextlib
import json
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import redis
from sqlalchemy import func, select, update

from core import quota
from core.storage import make_s3_client
from core.tables import files
from ops.embedded import start_api
from tests.conftest import Stack, make_tenant
from tests.e2e.test_lora import INPUT, open_temporary_files, tiny_lora
from tests.images import TEST_HOST, picture

MIB = 2**20
CHUNK = 256 * 2**10


@dataclass
class Served:
    """What the test's file server was asked for and sent."""

    gets: list[str] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)  # path → bytes written before it finished or was hung up on
    finished: threading.Event = field(default_factory=threading.Event)


@contextlib.contextmanager
def counting_server(routes: dict[str, tuple[bytes, int]]) -> Iterator[tuple[str, Served]]:
    """path → (first bytes, then that many zero bytes), written in steps of CHUNK and counted."""
    served = Served()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.gets.append(self.path)
            head, zeros = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(head) + zeros))
            self.end_headers()
            sent = 0
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the API hung up
                self.wfile.write(head)
                sent = len(head)
                while sent < len(head) + zeros:
                    step = min(CHUNK, len(head) + zeros - sent)
                    self.wfile.write(bytes(step))
                    sent += step
            served.sent[self.path] = sent
            served.finished.set()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer((TEST_HOST, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{TEST_HOST}:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()


def misfit_header(mib: int) -> bytes:
    """The safetensors header of a well-formed LoRA of `mib` MiB of F32 zeros for a layer no model has."""
    width = mib * MIB // 2 // 4 // 8  # rank 8: A (8 × width) and B (width × 8) take mib MiB together
    half = 8 * width * 4
    text = json.dumps(
        {
            "big.lora_A.weight": {"dtype": "F32", "shape": [8, width], "data_offsets": [0, half]},
            "big.lora_B.weight": {"dtype": "F32", "shape": [width, 8], "data_offsets": [half, 2 * half]},
        }
    ).encode()
    return struct.pack("<Q", len(text)) + text


def test_a_lora_that_does_not_fit_is_refused_once_its_header_is_in(stack: Stack) -> None:
    """A LoRA declaring 64 MiB for a layer the model lacks was read whole into the spool (a temporary file),
    hashed and scanned before the fit was checked; now the fetch stops at the header."""
    api, url = start_api(stack.env, stack.logs / "api-lora-misfit.log")
    assert api.process is not None
    try:
        with (
            counting_server({"/misfit.safetensors": (misfit_header(64), 64 * MIB)}) as (files_url, served),
            httpx.Client(base_url=url, headers={"apikey": make_tenant(stack.engine).key}, timeout=120) as client,
        ):
            body = {"input": INPUT | {"loras": [{"path": f"{files_url}/misfit.safetensors"}]}}
            refused = client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json=body)
            assert refused.status_code == 422, refused.text
            error = refused.json()["error"]
            assert "input.loras[0].path: this LoRA does not fit flux-klein-4b: big: no such layer" in error
            assert served.finished.wait(30), "the file server is still writing"
        sent = served.sent["/misfit.safetensors"]
        assert sent < 16 * MIB, f"{sent / MIB:.0f} MiB of the 64 MiB misfit were served before its refusal"
        assert open_temporary_files(api.process.pid) == []
    finally:
        api.stop()


def test_a_tenant_at_its_in_flight_cap_is_refused_before_any_url_is_fetched(stack: Stack) -> None:
    """Each dialect fetched the LoRAs and reference images a request named (up to 3 × 256 MiB of LoRAs), then
    answered 429; now the cap is checked first, and the slot stays as it was."""
    key = make_tenant(stack.engine, max_in_flight=1)
    slots = quota.in_flight_key(stack.settings.queue_name, key.tenant_id)
    lora_bytes, image = tiny_lora(5), picture()
    routes = {"/style.safetensors": (lora_bytes, 0), "/ref.png": (image, 0)}
    with (
        counting_server(routes) as (files_url, served),
        httpx.Client(base_url=stack.api_url, headers={"apikey": key.key}, timeout=120) as client,
    ):
        slow = {"input": {"prompt": "a lighthouse", "num_inference_steps": 50}}
        held = client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json=slow)
        assert held.status_code == 201, held.text
        lora = [{"path": f"{files_url}/style.safetensors"}]
        with_ref = {"prompt": "x", "images": [f"{files_url}/ref.png"]}
        model = "black-forest-labs/flux-2-klein-4b"
        attempts = {
            "pruna": ("/v1/predictions", {"Model": "flux-klein-4b"}, {"input": INPUT | {"loras": lora}}),
            "replicate, versioned": ("/v1/predictions", {}, {"version": model, "input": with_ref}),
            "replicate": (f"/v1/models/{model}/predictions", {}, {"input": with_ref}),
            "wavespeed": (f"/api/v3/{model}/text-to-image-lora", {}, {"prompt": "x", "loras": lora}),
            "generate": ("/v1/generate", {}, {"prompt": "x", "model": "flux-klein-4b", "loras": lora}),
            "openai": ("/v1/images/generations", {}, with_ref | {"model": "flux-klein-4b"}),
        }
        for dialect, (path, headers, body) in attempts.items():
            refused = client.post(path, headers=headers, json=body)
            assert refused.status_code == 429, (dialect, refused.text)
            assert "in flight" in refused.text, (dialect, refused.text)
        assert served.gets == [], f"fetched for refused requests: {served.gets}"
        with redis.Redis.from_url(stack.settings.redis_url) as broker:
            assert int(broker.get(slots) or 0) == 1  # the held prediction's; the refusals took none
        client.post(f"/v1/predictions/{held.json()['id']}/cancel")


def test_a_tenants_unexpired_uploads_are_bounded_and_a_refused_upload_stores_nothing(stack: Stack) -> None:
    """Uploads were stored for KLEIN_UPLOAD_TTL_S and counted nowhere: 20 of 30 MiB were all accepted."""
    image = picture()
    bound = 2 * len(image) + len(image) // 2  # two uploads fit, a third does not
    env = stack.env | {"KLEIN_MAX_TENANT_UPLOAD_BYTES": str(bound)}
    api, url = start_api(env, stack.logs / "api-upload-bound.log")
    key = make_tenant(stack.engine)
    s3 = make_s3_client(stack.settings)

    def stored() -> tuple[set[str], set[str]]:
        with stack.engine.connect() as conn:
            rows = set(conn.execute(select(files.c.key).where(files.c.tenant_id == key.tenant_id)).scalars())
        listed = s3.list_objects_v2(Bucket=stack.settings.s3_bucket, Prefix=f"{key.tenant_id}/files/")
        return rows, {item["Key"] for item in listed.get("Contents", [])}

    try:
        with httpx.Client(base_url=url, headers={"apikey": key.key}, timeout=60) as client:
            upload = {"content": ("ref.png", image, "image/png")}
            first, second = (client.post("/v1/files", files=upload) for _ in range(2))
            assert (first.status_code, second.status_code) == (201, 201), (first.text, second.text)
            before = stored()
            refused = client.post("/v1/files", files=upload)
            assert refused.status_code == 413, refused.text
            assert f"unexpired uploads would exceed {bound} bytes ({2 * len(image)} held)" in refused.json()["error"]
            assert stored() == before and len(before[0]) == len(before[1]) == 2
            with stack.engine.begin() as conn:  # the first upload expires: its room comes back
                conn.execute(update(files).where(files.c.id == first.json()["id"]).values(expires_at=func.now()))
            assert client.post("/v1/files", files=upload).status_code == 201
    finally:
        api.stop()
