"""LoRA adapters per request on the real stack: built in code for the tiny pipeline (diffusers' layout, random
weights), uploaded or fetched, checked, stored, cached by the worker and applied with diffusers' adapter API."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import struct
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from bench.lora_memory import file_server, gzip_bomb, large_lora, watch
from core.storage import make_s3_client
from core.tenants import IssuedKey
from ops.embedded import start_api
from tests.conftest import Stack, make_tenant
from tests.images import image_server

# Not from the result cache (docs/cache.md): each render here is generated.
INPUT = {"prompt": "a lighthouse", "seed": 7, "aspect_ratio": "1:1", "output_format": "png", "cache": False}


def tiny_lora(seed: int, rank: int = 2, width: int = 32, modules: tuple[str, ...] | None = None) -> bytes:
    """A LoRA for the tiny transformer (its attention projections), diffusers' key layout, random A and B."""
    generator = torch.Generator().manual_seed(seed)
    names = modules or tuple(f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0"))
    tensors = {}
    for name in names:
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, width, generator=generator)
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(width, rank, generator=generator)
    return save_safetensors(tensors)


A = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
B = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
ALPHA = "transformer.transformer_blocks.0.attn.to_q.alpha"
ONES = np.ones(128, dtype="<f4").tobytes()  # A (2 × 32) then B (32 × 2), F32


def safetensors(header: dict[str, Any] | str, body: bytes = ONES) -> bytes:
    """A file in safetensors' framing whatever its header says: the header's length, its JSON, the data."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + body


def entry(dtype: str = "F32", shape: Any = (2, 32), offsets: Any = (0, 256)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, "data_offsets": offsets}


GOOD = {A: entry(), B: entry(shape=(32, 2), offsets=[256, 512])}
BF16_INF = np.full(128, 0x7F80, dtype="<u2").tobytes()  # +Inf as bfloat16
# (case, file, what the 422 must say): each a header that lies or a file that is not what its header says.
MALFORMED: list[tuple[str, bytes, str]] = [
    ("an entry that is a number", safetensors({A: 5, B: GOOD[B]}), f"tensor {A}: expected an object"),
    ("three data offsets", safetensors({A: entry(offsets=[0, 128, 256]), B: GOOD[B]}), "data_offsets must be two"),
    ("a null shape", safetensors({A: entry(shape=None), B: GOOD[B]}), "shape must be a list of non-negative"),
    ("a string shape", safetensors({A: entry(shape="2x32"), B: GOOD[B]}), "shape must be a list of non-negative"),
    ("a bool in a shape", safetensors({A: entry(shape=[True, 32]), B: GOOD[B]}), "shape must be a list"),
    ("a float in a shape", safetensors({A: entry(shape=[2.0, 32]), B: GOOD[B]}), "shape must be a list"),
    ("an unknown dtype", safetensors({A: entry(dtype="I64"), B: GOOD[B]}), "dtype 'I64' is not one of"),
    ("offsets not dtype × shape", safetensors({A: entry(offsets=[0, 128]), B: GOOD[B]}), "hold 128 bytes"),
    ("overlapping", safetensors({A: entry(), B: entry(shape=(32, 2), offsets=[128, 384])}), "overlaps the tensor"),
    ("a gap", safetensors({A: entry(), B: entry(shape=(32, 2), offsets=[320, 576])}, ONES + bytes(64)), "a gap"),
    ("out of the file", safetensors(GOOD, ONES[:300]), "lie outside the file"),
    ("trailing padding", safetensors(GOOD, ONES + bytes(4096)), "4096 bytes after its last tensor"),
    ("an empty alpha", safetensors(GOOD | {ALPHA: entry(shape=(0,), offsets=[512, 512])}), "an alpha is one number"),
    ("a NaN weight", safetensors(GOOD, ONES[:-4] + np.float32("nan").tobytes()), f"tensor {B} holds Inf or NaN"),
    (
        "Inf in bfloat16",
        safetensors({A: entry("BF16", offsets=[0, 128]), B: entry("BF16", (32, 2), [128, 256])}, BF16_INF),
        "holds Inf or NaN",
    ),
    ("a tensor named twice", safetensors(json.dumps(GOOD)[:-1] + f', "{A}": {json.dumps(GOOD[A])}}}'), "twice"),
    ("metadata not strings", safetensors(GOOD | {"__metadata__": {"rank": 2}}), "__metadata__ must map"),
    ("a 2 MiB header", safetensors(GOOD | {"__metadata__": {"x": "x" * 2**21}}), "at most 1048576 are read"),
    ("JSON nested 100,000 deep", safetensors('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"), "header is not JSON"),
]


@pytest.fixture(scope="module")
def files() -> Iterator[str]:
    malformed = {f"/malformed-{i}.safetensors": data for i, (_, data, _) in enumerate(MALFORMED)}
    with image_server("http://127.0.0.1/", {"/style.safetensors": tiny_lora(1)} | malformed) as url:
        yield url


def upload(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/v1/files", files={"content": ("adapter.safetensors", data)})


def render(client: httpx.Client, loras: list[dict[str, Any]] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    body = {"input": INPUT | ({"loras": loras} if loras is not None else {})}
    answer = client.post("/v1/predictions", headers={"Model": "flux-klein-4b", "Try-Sync": "true"}, json=body)
    assert answer.status_code == 200 and answer.json()["status"] == "succeeded", answer.text
    png = client.get(answer.json()["generation_url"]).content
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16), answer.json()


def test_loras_change_the_image_by_their_scale_combine_and_leave_the_base_model_exact(
    stack: Stack, client: httpx.Client, files: str
) -> None:
    before, _ = render(client)  # the base model, before this test's LoRAs
    style = upload(client, tiny_lora(1)).json()["url"]
    other = upload(client, tiny_lora(2)).json()["url"]

    distances = []
    for scale in (0.5, 1.0, 2.0):
        image, _ = render(client, [{"path": style, "scale": scale}])
        distances.append(float(np.abs(image - before).mean()))
    assert 0 < distances[0] < distances[1] < distances[2], distances  # monotonic in the scale, same seed

    alone, _ = render(client, [{"path": other, "scale": 1.0}])
    both, answer = render(client, [{"path": style, "scale": 1.0}, {"path": other, "scale": 1.0}])
    assert np.abs(both - alone).mean() > 0 and np.abs(both - before).mean() > 0
    style_sha = hashlib.sha256(tiny_lora(1)).hexdigest()[:12]
    assert f"LoRA {style_sha} from memory" in worker_log(stack, answer["id"])  # cached since its first use

    fetched, answer = render(client, [{"path": f"{files}/style.safetensors", "scale": 1.0}])  # same bytes by URL
    assert f"LoRA {style_sha} from memory" in worker_log(stack, answer["id"])
    after, _ = render(client)  # no LoRA: every adapter unloaded, the base model exactly
    assert np.array_equal(after, before)
    assert distances[1] == float(np.abs(fetched - before).mean())


def worker_log(stack: Stack, prediction_id: str) -> list[str]:
    """What the worker logged about one prediction: the operators' channel (the tenant sees `logs` only)."""
    lines = (json.loads(text) for text in (stack.logs / "worker.log").read_text().splitlines() if text[:1] == "{")
    return [line["event"].rsplit(" in ", 1)[0] for line in lines if line.get("prediction_id") == prediction_id]


def tenant_view(answer: dict[str, Any], lora_sha: str) -> dict[str, Any]:
    """A finished prediction as its tenant reads it, without what differs by nature (ids, times, sizes, seeds)."""
    generic = re.compile(r"\d+")
    return {
        "fields": sorted(answer),
        "timings": sorted(answer["timings"]),
        "logs": [generic.sub("#", line["message"].replace(lora_sha, "<lora>")) for line in answer["logs"]],
    }


def test_a_lora_another_tenant_just_ran_is_stored_and_loaded_as_this_tenants_own(
    stack: Stack, client: httpx.Client, tenant: IssuedKey
) -> None:
    """Issue 29, item 9: the stored objects, the worker's caches and its loaded adapters were shared by all
    tenants, so the time to submit a LoRA (no upload) and to apply it (from memory, adapters already loaded) told
    a tenant whether another had used it. After tenant B ran LoRA X, tenant A's X is stored under A's own prefix
    and its worker loads it from storage, as a LoRA nobody ran; what A reads is the same for both."""
    shared, fresh = tiny_lora(11), tiny_lora(12)
    neighbour = make_tenant(stack.engine)
    with httpx.Client(base_url=stack.api_url, headers={"apikey": neighbour.key}, timeout=60) as other:
        render(other, [{"path": upload(other, shared).json()["url"], "scale": 1.0}])  # B's X: in the worker's memory
    views, sources = [], []
    for data in (shared, fresh):
        sha = hashlib.sha256(data).hexdigest()[:12]
        _, answer = render(client, [{"path": upload(client, data).json()["url"], "scale": 1.0}])
        views.append(tenant_view(answer, sha))
        sources += [line for line in worker_log(stack, answer["id"]) if line.startswith(f"LoRA {sha} from")]
    assert views[0] == views[1], views
    assert sources == [f"LoRA {hashlib.sha256(shared).hexdigest()[:12]} from storage",
                       f"LoRA {hashlib.sha256(fresh).hexdigest()[:12]} from storage"]  # fmt: skip
    s3, sha256 = make_s3_client(stack.settings), hashlib.sha256(shared).hexdigest()
    for owner in (tenant, neighbour):  # two copies, each under its tenant's prefix
        key = f"loras/{owner.tenant_id}/{sha256}.safetensors"
        assert s3.get_object(Bucket=stack.settings.s3_bucket, Key=key)["Body"].read() == shared


def test_a_lora_that_does_not_fit_or_is_no_safetensors_is_refused_with_422(client: httpx.Client) -> None:
    cases = {
        "wrong width": tiny_lora(3, width=48),
        "unknown layer": tiny_lora(3, modules=("transformer_blocks.0.attn.to_nothing",)),
    }
    for case, data in cases.items():
        url = upload(client, data).json()["url"]
        answer = client.post(
            "/v1/predictions", headers={"Model": "flux-klein-4b"}, json={"input": INPUT | {"loras": [{"path": url}]}}
        )
        assert answer.status_code == 422, (case, answer.text)
        assert "input.loras[0].path: this LoRA does not fit flux-klein-4b" in answer.json()["error"], case
    pickled = pickle.dumps({"transformer.x.lora_A.weight": [[1.0]]})
    refused = upload(client, pickled)  # neither an image nor safetensors
    assert refused.status_code == 422, refused.text
    path = "/api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image"
    wrong_endpoint = client.post(path, json={"prompt": "x", "loras": [{"path": "https://example.com/a.safetensors"}]})
    assert wrong_endpoint.status_code == 422 and "use text-to-image-lora" in wrong_endpoint.text
    too_many = [{"path": "https://example.com/a.safetensors"}] * 4
    answer = client.post(
        "/v1/predictions", headers={"Model": "flux-klein-4b"}, json={"input": INPUT | {"loras": too_many}}
    )
    assert answer.status_code == 422 and "at most 3 LoRAs" in answer.json()["error"]


def test_the_wavespeed_lora_endpoint_applies_it(client: httpx.Client) -> None:
    url = upload(client, tiny_lora(4)).json()["url"]
    body = {"prompt": "a lighthouse", "size": "256*256", "seed": 3, "enable_sync_mode": True, "output_format": "png"}
    path = "/api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image"
    plain = client.post(path, json=body).json()["data"]
    styled = client.post(f"{path}-lora", json=body | {"loras": [{"path": url, "scale": 1.5}]}).json()["data"]
    assert plain["status"] == styled["status"] == "completed", (plain, styled)
    assert client.get(plain["outputs"][0]).content != client.get(styled["outputs"][0]).content


def test_a_worker_with_a_lora_loaded_takes_the_next_predictions_wanting_it_ahead(
    stack: Stack, client: httpx.Client
) -> None:
    """lifecycle.next_with_loras on the real worker: queued behind the first, the others run before their own
    messages come up, and say so."""
    url = upload(client, tiny_lora(5)).json()["url"]
    body = {"input": INPUT | {"loras": [{"path": url, "scale": 1.0}]}}
    ids = [client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json=body).json()["id"] for _ in range(3)]
    done = []
    for pid in ids:
        while (answer := client.get(f"/v1/predictions/status/{pid}").json())["status"] not in ("succeeded", "failed"):
            time.sleep(0.1)
        done.append(answer)
    assert all(d["status"] == "succeeded" for d in done), done
    ahead = [d["id"] for d in done if any("taken ahead of the queue" in line["message"] for line in d["logs"])]
    assert ahead and ids[0] not in ahead, [[line["message"] for line in d["logs"]] for d in done]


def test_a_malformed_lora_is_a_422_naming_the_problem_uploaded_or_by_url(client: httpx.Client, files: str) -> None:
    """Every case through the real API twice: uploaded to /v1/files, and named by URL in a prediction."""
    assert upload(client, safetensors(GOOD)).status_code == 201  # the well-formed file the cases start from
    for i, (case, data, says) in enumerate(MALFORMED):
        uploaded = upload(client, data)
        assert uploaded.status_code == 422, (case, uploaded.status_code, uploaded.text[:300])
        assert says in uploaded.json()["error"], (case, uploaded.json())
        body = {"input": INPUT | {"loras": [{"path": f"{files}/malformed-{i}.safetensors"}]}}
        named = client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json=body)
        assert named.status_code == 422, (case, named.status_code, named.text[:300])
        assert "input.loras[0].path: " in named.json()["error"] and says in named.json()["error"], (case, named.text)
    lying = {"loras": [{"path": f"{files}/malformed-1.safetensors"}]}  # in the other dialects' own shapes
    wavespeed = client.post("/api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image-lora", json={"prompt": "x"} | lying)
    assert wavespeed.status_code == 422 and "data_offsets must be two" in wavespeed.json()["message"], wavespeed.text
    generate = client.post("/v1/generate", json={"prompt": "x"} | lying)
    assert generate.status_code == 422 and "loras[0].path: tensor" in generate.json()["detail"], generate.text


def test_a_lora_is_streamed_a_bomb_stops_where_its_header_says_the_file_ends(stack: Stack) -> None:
    """Issue 29: each LoRA was held whole in the API (up to 256 MiB decoded) before it was checked: three valid
    headers followed by 255 MiB of zeros, 260 KB of gzip each, grew the API by 770 MiB. Now the fetch stops as
    soon as a file passes the size its header declares, and a legitimate file larger than the spool's 1 MiB goes
    through a temporary file and is stored in parts (storage has its exact bytes); no temporary file stays open."""
    served = {"KLEIN_SERVED_MODELS": '["flux-klein-4b", "flux-klein-4b-base"]'}  # no worker publishes the base's
    api, url = start_api(stack.env | served, stack.logs / "api-lora-stream.log")  # layers: it takes any LoRA
    assert api.process is not None
    large, owner = large_lora(24, seed=29), make_tenant(stack.engine)
    paths = {"/bomb.safetensors": ("gzip", gzip_bomb(255)), "/large.safetensors": (None, large)}
    try:
        with (
            file_server(paths | {"/small.safetensors": (None, safetensors(GOOD, ONES + bytes(8)))}) as files,
            httpx.Client(base_url=url, headers={"apikey": owner.key}, timeout=120) as client,
        ):
            lying = {"input": INPUT | {"loras": [{"path": f"{files}/small.safetensors"}]}}
            warm = client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json=lying)
            assert warm.status_code == 422 and "8 bytes after its last tensor" in warm.text, warm.text
            bombs = {"input": INPUT | {"loras": [{"path": f"{files}/bomb.safetensors"}] * 3}}
            with watch(api.process.pid) as peak:  # the base: the bombs' layer fits no published model
                refused = client.post("/v1/predictions", headers={"Model": "flux-klein-4b-base"}, json=bombs)
            assert refused.status_code == 422, refused.text
            assert peak.growth_mib < 64, f"the API grew by {peak.growth_mib:.0f} MiB reading the bombs"
            assert "bytes after its last tensor (its header declares 692 bytes" in refused.json()["error"]

            body = {"input": INPUT | {"loras": [{"path": f"{files}/large.safetensors"}]}}
            accepted = client.post("/v1/predictions", headers={"Model": "flux-klein-4b-base"}, json=body)
            assert accepted.status_code == 201, accepted.text
            client.post(f"/v1/predictions/{accepted.json()['id']}/cancel")
        key = f"loras/{owner.tenant_id}/{hashlib.sha256(large).hexdigest()}.safetensors"
        stored = make_s3_client(stack.settings).get_object(Bucket=stack.settings.s3_bucket, Key=key)["Body"].read()
        assert stored == large
        assert open_temporary_files(api.process.pid) == []
    finally:
        api.stop()


def open_temporary_files(pid: int) -> list[str]:
    """The unnamed temporary files a process holds open (each reads `/tmp/#123 (deleted)`)."""
    where, held = os.path.realpath(tempfile.gettempdir()) + "/", []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed in between
            held.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return [path for path in held if path.startswith(where) and path.endswith(" (deleted)")]
