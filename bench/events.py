"""Events out, measured: `python -m bench.events [--streams 2000] [--webhooks 200]`.

1. Streams per API process: `--streams` predictions are queued (no GPU worker runs, so they wait) and one
   Server-Sent Event stream is opened on each, against one API process. Printed: the API's Redis and
   PostgreSQL connections and its RSS before and with every stream open (RSS per stream), its CPU while they
   idle, and how long until every stream has its `done` once all are canceled.
2. Webhook latency: with the tiny pipeline's worker and the webhook worker running, `--webhooks` predictions
   with a webhook; from each one's `completed_at` to its arrival at a real receiver (p50/p99), beside the
   baseline of a client polling the status every second (the same predictions, polled meanwhile).

Everything runs on a throwaway stack of its own (bench/tiny_stack.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import orjson
import psutil
from httpx_sse import aconnect_sse

from bench.common import fmt, log, process_cpu, tcp_peers
from bench.tiny_stack import tiny_stack

RECEIVER_HOST = "127.0.0.2"
INPUT = {"prompt": "a lighthouse at dusk", "aspect_ratio": "1:1", "num_inference_steps": 4}


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


async def hold_streams(api_url: str, key: str, ids: list[str], opened: asyncio.Event, done: list[float]) -> None:
    limits = httpx.Limits(max_connections=len(ids) + 10, max_keepalive_connections=0)
    timeout = httpx.Timeout(600, connect=60)
    async with httpx.AsyncClient(base_url=api_url, headers={"apikey": key}, limits=limits, timeout=timeout) as http:
        started = 0

        async def one(prediction_id: str) -> None:
            nonlocal started
            async with aconnect_sse(http, "GET", f"/v1/predictions/{prediction_id}/stream") as source:
                events = source.aiter_sse()
                first = await events.__anext__()
                assert first.event == "status", first
                started += 1
                if started == len(ids):
                    opened.set()
                async for event in events:
                    if event.event == "done":
                        done.append(time.monotonic())
                        return

        await asyncio.gather(*(one(i) for i in ids))


def measure_streams(api_url: str, api_pid: int, key: str, ids: list[str]) -> dict[str, float]:
    base_rss, base_redis, base_pg = rss_mb(api_pid), len(tcp_peers(api_pid, 6379)), len(tcp_peers(api_pid, 5432))
    done: list[float] = []
    result: dict[str, float] = {}
    loop = asyncio.new_event_loop()
    opened_event = asyncio.Event()  # set in the loop's thread, read here (a plain flag)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(hold_streams(api_url, key, ids, opened_event, done))

    holder = threading.Thread(target=run)
    started = time.monotonic()
    holder.start()
    while not opened_event.is_set():
        time.sleep(0.2)
        if time.monotonic() - started > 600:
            raise SystemExit("streams did not all open within 600 s")
    result["open_s"] = time.monotonic() - started
    time.sleep(2)
    result |= {
        "rss_idle_mb": base_rss,
        "rss_open_mb": rss_mb(api_pid),
        "redis_idle": base_redis,
        "redis_open": len(tcp_peers(api_pid, 6379)),
        "pg_idle": base_pg,
        "pg_open": len(tcp_peers(api_pid, 5432)),
    }
    cpu = process_cpu([api_pid])
    time.sleep(10)
    result["idle_cpu_pct"] = (process_cpu([api_pid]) - cpu) / 10 * 100
    canceled_at = time.monotonic()
    with httpx.Client(base_url=api_url, headers={"apikey": key}, timeout=60) as http:
        for prediction_id in ids:
            http.post(f"/v1/predictions/{prediction_id}/cancel").raise_for_status()
    result["cancel_s"] = time.monotonic() - canceled_at
    holder.join(300)
    result["all_done_s"] = (max(done) if done else float("nan")) - canceled_at
    result["done"] = len(done)
    return result


class Arrivals:
    def __init__(self) -> None:
        self.at: dict[str, datetime] = {}
        server = ThreadingHTTPServer((RECEIVER_HOST, 0), self._handler())
        server.daemon_threads = True
        self.url = f"http://{RECEIVER_HOST}:{server.server_address[1]}/hook"
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        arrivals = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                arrivals.at[orjson.loads(body)["id"]] = datetime.now(UTC)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        return Handler


def measure_webhooks(api_url: str, key: str, count: int) -> dict[str, float]:
    arrivals = Arrivals()
    polled: dict[str, datetime] = {}
    completed: dict[str, datetime] = {}
    with httpx.Client(base_url=api_url, headers={"apikey": key, "Model": "flux-klein-4b"}, timeout=60) as http:
        ids = []
        for _ in range(count):
            answer = http.post("/v1/predictions", json={"input": INPUT, "webhook": arrivals.url})
            answer.raise_for_status()
            ids.append(answer.json()["id"])
            time.sleep(0.05)
        deadline = time.monotonic() + 600
        while len(polled) < count and time.monotonic() < deadline:  # the baseline: a poll every second
            tick = time.monotonic()
            for prediction_id in ids:
                if prediction_id in polled:
                    continue
                body = http.get(f"/v1/predictions/status/{prediction_id}").json()
                if body["status"] == "succeeded":
                    polled[prediction_id] = datetime.now(UTC)
                    completed[prediction_id] = datetime.fromisoformat(body["completed_at"])
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    time.sleep(2)
    webhook_ms = [(arrivals.at[i] - completed[i]).total_seconds() * 1000 for i in completed if i in arrivals.at]
    poll_ms = [(polled[i] - completed[i]).total_seconds() * 1000 for i in completed]
    return {
        "delivered": len(webhook_ms),
        "webhook_p50_ms": statistics.median(webhook_ms),
        "webhook_p99_ms": statistics.quantiles(webhook_ms, n=100)[98],
        "poll_p50_ms": statistics.median(poll_ms),
        "poll_p99_ms": statistics.quantiles(poll_ms, n=100)[98],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--webhooks", type=int, default=200)
    args = parser.parse_args()
    receiver = {"KLEIN_URL_SIGNING_KEY": secrets.token_hex(16), "KLEIN_FETCH_ALLOWLIST": f'["{RECEIVER_HOST}/32"]'}
    with tiny_stack("events", KLEIN_MAX_STREAMS_PER_TENANT="100000", **receiver) as stack:
        api_url = stack.api()
        assert stack.api_pid is not None
        key = stack.key(rate_limit_per_minute=1_000_000, max_in_flight=100_000)
        log(f"queueing {args.streams} predictions (no GPU worker yet) and opening a stream on each")
        with httpx.Client(base_url=api_url, headers={"apikey": key, "Model": "flux-klein-4b"}) as http:
            ids = [http.post("/v1/predictions", json={"input": INPUT}).json()["id"] for _ in range(args.streams)]
        streams = measure_streams(api_url, stack.api_pid, key, ids)
        per_stream_kb = (streams["rss_open_mb"] - streams["rss_idle_mb"]) * 1024 / args.streams
        log("starting the tiny pipeline's worker and the webhook worker")
        stack.worker("events-worker")
        stack.webhook_worker()
        hooks = measure_webhooks(api_url, key, args.webhooks)
    cores = os.cpu_count()
    print(f"\nEvents, one API process, this machine ({cores} cores); client, API and services share it.\n")
    print(f"{'':44}{'idle':>12}{f'{args.streams} streams':>16}")
    print(f"{'API connections to Redis':44}{streams['redis_idle']:>12.0f}{streams['redis_open']:>16.0f}")
    print(f"{'API connections to PostgreSQL':44}{streams['pg_idle']:>12.0f}{streams['pg_open']:>16.0f}")
    print(f"{'API RSS (MB)':44}{fmt(streams['rss_idle_mb']):>12}{fmt(streams['rss_open_mb']):>16}")
    print(f"{'RSS per open stream (KB)':44}{'':>12}{fmt(per_stream_kb):>16}")
    print(f"{'API CPU while they idle (% of a core)':44}{'':>12}{fmt(streams['idle_cpu_pct']):>16}")
    print(f"{'seconds to open them all':44}{'':>12}{fmt(streams['open_s']):>16}")
    print(
        f"{'canceled all (s) / every done seen (s)':44}{'':>12}"
        f"{fmt(streams['cancel_s']) + ' / ' + fmt(streams['all_done_s']):>16}  ({streams['done']:.0f} done)"
    )
    print(f"\nCompletion → client knows, {args.webhooks} predictions ({hooks['delivered']:.0f} webhooks arrived)\n")
    print(f"{'':44}{'poll every 1 s':>16}{'webhook':>12}")
    print(f"{'p50 (ms)':44}{fmt(hooks['poll_p50_ms']):>16}{fmt(hooks['webhook_p50_ms']):>12}")
    print(f"{'p99 (ms)':44}{fmt(hooks['poll_p99_ms']):>16}{fmt(hooks['webhook_p99_ms']):>12}")


if __name__ == "__main__":
    main()
