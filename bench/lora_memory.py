"""The API's memory while it reads LoRAs by URL: gzip bombs behind a valid safetensors header, and a large
legitimate LoRA. One API process per source tree given (default: this one), each sampled with psutil every
few milliseconds; the files are served from 127.0.0.2, the one private address the API may fetch here.

    python -m bench.lora_memory [--tree PATH ...] [--bomb-mib 255] [--large-mib 64]

To compare with another commit: `git archive <commit> | tar -x -C /tmp/old`, then `--tree /tmp/old --tree .`
(the trees share this stack's database, so their migrations must match).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from ops.embedded import free_port

HOST = "127.0.0.2"  # the address the API's fetch allowlist lets through (KLEIN_FETCH_ALLOWLIST)
MIB = 2**20


def safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    """Tensors as float32 in safetensors' framing, back to back in the order given."""
    arrays = {name: np.ascontiguousarray(array, "<f4") for name, array in tensors.items()}
    header, offset = {}, 0
    for name, array in arrays.items():
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(array.tobytes() for array in arrays.values())


def small_lora() -> bytes:
    """A rank-2 LoRA of one 32-wide layer: 512 bytes of weights."""
    return safetensors({"layer.lora_A.weight": np.ones((2, 32)), "layer.lora_B.weight": np.ones((32, 2))})


def gzip_bomb(mib: int) -> bytes:
    """A valid small LoRA followed by `mib` MiB of zeros, as gzip: a few hundred KB on the wire."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(small_lora())]
    zeros = bytes(MIB)
    parts += [packer.compress(zeros) for _ in range(mib)]
    return b"".join([*parts, packer.flush()])


def large_lora(mib: int, seed: int) -> bytes:
    """A well-formed LoRA of `mib` MiB of finite float32 weights: rank-256 pairs of 4096-wide layers."""
    generator = np.random.default_rng(seed)
    tensors = {}
    for layer in range(max(1, mib // 8)):  # 2 × 256 × 4096 float32 = 8 MiB a layer
        tensors[f"layer{layer}.lora_A.weight"] = generator.standard_normal((256, 4096), np.float32)
        tensors[f"layer{layer}.lora_B.weight"] = generator.standard_normal((4096, 256), np.float32)
    return safetensors(tensors)


@contextmanager
def file_server(files: dict[str, tuple[str | None, bytes]]) -> Iterator[str]:
    """path → (Content-Encoding or None, body), served on HOST; its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in files:
                self.send_error(404)
                return
            encoding, body = files[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if encoding:
                self.send_header("Content-Encoding", encoding)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the API refused it and hung up
                self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer((HOST, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Peak:
    """A process's resident memory before and at its highest while `watch` ran."""

    before: int = 0
    peak: int = 0

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.before) / MIB


@contextmanager
def watch(pid: int, every_s: float = 0.002) -> Iterator[Peak]:
    """Sample the process's RSS every `every_s` until the block ends."""
    process = psutil.Process(pid)
    peak = Peak(before=process.memory_info().rss)
    peak.peak = peak.before
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            peak.peak = max(peak.peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
        peak.peak = max(peak.peak, process.memory_info().rss)


def prediction(api_url: str, key: str, paths: list[str]) -> httpx.Response:
    body = {"input": {"prompt": "a lighthouse", "loras": [{"path": path} for path in paths]}}
    headers = {"apikey": key, "Model": "flux-klein-4b"}
    return httpx.post(f"{api_url}/v1/predictions", headers=headers, json=body, timeout=300)


def at_once(count: int, call: Callable[[], httpx.Response]) -> list[httpx.Response]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: call(), range(count)))


@contextmanager
def api_from(tree: Path, env: dict[str, str], log: Path) -> Iterator[tuple[int, str]]:
    """An API process running the code in `tree`: its pid and URL, once ready."""
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--port", str(port)]
    with open(log, "ab") as handle:
        process = subprocess.Popen(
            [*args, "--host", "127.0.0.1", "--log-level", "warning"],
            cwd=tree,
            env=env | {"PYTHONPATH": str(tree)},
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API from {tree} did not start:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield process.pid, url
    finally:
        process.terminate()
        process.wait(20)


def measure(tree: Path, stack: Any, files: str, seed: int) -> dict[str, Any]:
    """Each scenario's RSS growth (MiB) and answers, each against a fresh API process from `tree`."""
    env = stack.env | {"KLEIN_FETCH_ALLOWLIST": json.dumps([f"{HOST}/32"])}
    bombs = [f"{files}/bomb-{i}.safetensors" for i in range(3)]
    large = [f"{files}/large-{seed}.safetensors"]  # one per tree: stored anew, not found in storage
    scenarios: dict[str, Callable[[str, str], list[httpx.Response]]] = {
        "one request, 3 bomb LoRAs": lambda url, key: [prediction(url, key, bombs)],
        "three such requests at once": lambda url, key: at_once(3, lambda: prediction(url, key, bombs)),
        "one request, a legitimate large LoRA": lambda url, key: [prediction(url, key, large)],
    }
    results: dict[str, Any] = {}
    for index, (name, run) in enumerate(scenarios.items()):
        key = stack.key()
        with api_from(tree, env, stack.root / f"api-{seed}-{index}.log") as (pid, url):
            warm = prediction(url, key, [f"{files}/small.safetensors"])  # imports, pools and caches in place
            assert warm.status_code == 201, warm.text
            with watch(pid) as peak:
                answers = run(url, key)
        results[name] = {
            "growth_mib": round(peak.growth_mib, 1),
            "peak_mib": round(peak.peak / MIB, 1),
            "answers": sorted({f"{a.status_code} {a.text[:160]}" for a in answers}),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, action="append", help="a source tree whose API to measure (repeatable)")
    parser.add_argument("--bomb-mib", type=int, default=255)
    parser.add_argument("--large-mib", type=int, default=64)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in (args.tree or [Path.cwd()])]
    from bench.tiny_stack import tiny_stack

    bomb = gzip_bomb(args.bomb_mib)
    served: dict[str, tuple[str | None, bytes]] = {"/small.safetensors": (None, small_lora())}
    served |= {f"/bomb-{i}.safetensors": ("gzip", bomb) for i in range(3)}
    served |= {f"/large-{seed}.safetensors": (None, large_lora(args.large_mib, seed)) for seed in range(len(trees))}
    print(f"bomb: {len(bomb)} bytes of gzip, {args.bomb_mib} MiB decoded; large LoRA: {args.large_mib} MiB")
    report = {}
    with tiny_stack("loramem") as stack, file_server(served) as files:
        for seed, tree in enumerate(trees):
            report[str(tree)] = measure(tree, stack, files, seed)
            print(json.dumps({str(tree): report[str(tree)]}, indent=1), flush=True)
    names = list(next(iter(report.values())))
    print("\n| scenario | " + " | ".join(f"API RSS growth, {Path(t).name} (MiB)" for t in report) + " |")
    print("| --- |" + " --- |" * len(report))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{report[t][name]['growth_mib']:,}" for t in report) + " |")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
