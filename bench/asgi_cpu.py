"""The API's own CPU per request, without HTTP: `python -m bench.asgi_cpu [submit|status] [--seconds S]`.

bench.platform measures throughput over HTTP, where uvicorn, the kernel's loopback and the load generator
share the machine with what is measured. This drives the API's ASGI app and the floor's (bench/floors.py)
directly, in one process, from `--concurrency` callers at once, on a fresh database of the machine's
PostgreSQL and its Redis, alternating the two, and prints the process CPU time per request of each.
What neither side pays (HTTP parsing, socket writes) is left out, so the difference is the apps' own.
Nothing is asserted; tests/e2e/test_bench_platform.py runs it for a second so it never rots.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import uvloop

from bench.common import SUBMIT_BODY, Plan
from bench.platform import parse_args
from bench.stack import Stack

Scope = dict[str, Any]
App = Callable[..., Any]


def scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def call(app: App, request: Scope, body: bytes) -> tuple[int, bytes]:
    """One request through the ASGI app: its status and body."""
    sent = False
    status, chunks = 0, []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # no disconnect: the request is answered before
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            chunks.append(message.get("body", b""))

    await app(request, receive, send)
    return status, b"".join(chunks)


async def drive(app: App, make: Callable[[], tuple[Scope, bytes]], seconds: float, callers: int) -> dict[str, float]:
    """`callers` loops sending requests for `seconds`: requests, CPU µs per request, req/s, failures."""
    deadline = time.monotonic() + seconds
    count = failed = 0

    async def caller() -> None:
        nonlocal count, failed
        while time.monotonic() < deadline:
            status, _ = await call(app, *make())
            count += 1
            failed += status >= 300

    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*(caller() for _ in range(callers)))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    return {"requests": count, "cpu_us": cpu / max(count, 1) * 1e6, "rps": count / wall, "failed": failed}


async def measure(stack: Stack, path: str, seconds: float, rounds: int, callers: int) -> list[dict[str, Any]]:
    from api.app import create_app
    from bench import floors
    from core.settings import Settings

    ours, floor = create_app(Settings()), floors.create_app()
    body = SUBMIT_BODY.encode()
    key = [(b"apikey", stack.key.encode())]
    submit_headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"), *key]
    submit_headers += [(b"model", b"flux-klein-4b"), (b"content-length", str(len(body)).encode())]
    async with ours.router.lifespan_context(ours), floor.router.lifespan_context(floor):
        ids = []
        if path == "status":  # rows to read, made by the API itself
            for _ in range(100):
                _, answer = await call(ours, scope("POST", "/v1/predictions", submit_headers), body)
                ids.append(orjson.loads(answer)["id"])
        cycle = itertools.cycle(ids)

        def make_ours() -> tuple[Scope, bytes]:
            if path == "submit":
                return scope("POST", "/v1/predictions", list(submit_headers)), body
            return scope("GET", f"/v1/predictions/status/{next(cycle)}", [(b"host", b"127.0.0.1:8000"), *key]), b""

        def make_floor() -> tuple[Scope, bytes]:
            if path == "submit":
                return scope("POST", "/floor/predictions", list(submit_headers)), body
            return scope("GET", f"/floor/status/{next(cycle)}", [(b"host", b"127.0.0.1:8000")]), b""

        await drive(ours, make_ours, min(1.0, seconds), callers)  # warm-up: pools, prepared statements, caches
        await drive(floor, make_floor, min(1.0, seconds), callers)
        results = []
        for round_no in range(rounds):
            sides = [("ours", ours, make_ours), ("floor", floor, make_floor)]
            if round_no % 2:
                sides.reverse()
            measured: dict[str, Any] = {name: await drive(app, make, seconds, callers) for name, app, make in sides}
            measured["ratio"] = {"cpu": measured["floor"]["cpu_us"] / measured["ours"]["cpu_us"]}
            results.append(measured)
            print(
                f"{path} round {round_no + 1}: ours {measured['ours']['cpu_us']:.0f} µs/request "
                f"({measured['ours']['rps']:.0f}/s, {measured['ours']['failed']} failed), "
                f"floor {measured['floor']['cpu_us']:.0f} µs/request ({measured['floor']['rps']:.0f}/s); "
                f"floor/ours {measured['ratio']['cpu']:.2f}",
                flush=True,
            )
        return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", metavar="submit|status", help="default: both")
    p.add_argument("--seconds", type=float, default=4.0, help="per measured run")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours and the floor")
    p.add_argument("--concurrency", type=int, default=32, help="callers at once")
    p.add_argument("--json", type=Path, help="write the measurements here")
    args = p.parse_args(argv)
    if not set(args.paths) <= {"submit", "status"}:
        p.error(f"paths are submit and status, not {args.paths}")
    platform = parse_args(["--short"])  # the platform benchmark's PostgreSQL and Redis
    stack = Stack(Plan.make(platform), platform.pg_admin_url, platform.redis_url, Path(tempfile.mkdtemp()))
    try:
        stack.create_database()
        os.environ.update(
            {
                "KLEIN_DATABASE_URL": stack.database_url,
                "KLEIN_REDIS_URL": stack.redis_url,
                "KLEIN_QUEUE_NAME": stack.queue,
                "BENCH_FLOOR_TENANT_ID": stack.tenant_id,
                "BENCH_FLOOR_LIST": stack.floor_list,
            }
        )
        paths = args.paths or ["submit", "status"]
        results = {p: uvloop.run(measure(stack, p, args.seconds, args.rounds, args.concurrency)) for p in paths}
    finally:
        stack.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
