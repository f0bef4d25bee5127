"""The platform benchmark's figures 2 (Try-Sync overhead) and 4 (waiting clients)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import (
    ROOT,
    SYNC_BODY,
    fmt,
    log,
    summarize,
    tcp_peers,
)
from bench.figures import BenchBase
from bench.loadgen import percentile, start_python


class WaitingFigures(BenchBase):
    """Figures 2 (Try-Sync overhead) and 4 (waiting clients)."""

    # -- 2 ---------------------------------------------------------------------------------------------------------

    def try_sync_alternating(self, samples: int, warmup: int) -> dict[str, Any]:
        """Ours and the Celery no-op in alternating blocks, the no-op first and last, so that the machine's
        drift moves both sides alike; each side's samples pooled."""
        blocks = max(1, min(2 * self.plan.rounds, samples // 10))
        per_noop = max(20, self.plan.noop_samples // (blocks + 1))
        noop = self.noop_latencies(per_noop)
        records: list[dict[str, Any]] = []
        for block in range(blocks):
            records += self.try_sync_records(samples // blocks + (block < samples % blocks), warmup)
            noop += self.noop_latencies(per_noop)
        return self.try_sync_summary(records) | {"noop": summarize(noop), "blocks": blocks}

    def try_sync_records(self, samples: int, warmup: int) -> list[dict[str, Any]]:
        spec = {
            "url": f"{self.stack.api_url}/v1/predictions",
            "method": "POST",
            "headers": self.headers() | {"Try-Sync": "true"},
            "body": SYNC_BODY,
            "connections": 1,
            "requests": samples + warmup,
            "record": True,
        }
        records: list[dict[str, Any]] = self.loadgen.run(spec, timeout=samples * 60 + 120)["records"][warmup:]
        return records

    @staticmethod
    def try_sync_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
        overhead: list[float] = []
        overhead_inf: list[float] = []
        client: list[float] = []
        parts: dict[str, list[float]] = {"api_ms": [], "queue_ms": [], "worker_bookkeeping_ms": []}
        work: dict[str, list[float]] = {"inference_ms": [], "encode_ms": [], "upload_ms": []}
        bad = 0
        for rec in records:
            body = rec.get("body")
            if rec.get("status") != 200 or not isinstance(body, dict) or body.get("status") != "succeeded":
                bad += 1
                continue
            t = body["timings"]
            pipeline = t.get("inference_ms", 0) + t.get("encode_ms", 0) + t.get("upload_ms", 0)
            client.append(rec["latency_ms"])
            overhead.append(rec["latency_ms"] - pipeline)
            overhead_inf.append(rec["latency_ms"] - t.get("inference_ms", 0))
            parts["api_ms"].append(rec["latency_ms"] - t.get("total_ms", 0))
            parts["queue_ms"].append(t.get("queue_ms", 0))
            parts["worker_bookkeeping_ms"].append(t.get("total_ms", 0) - t.get("queue_ms", 0) - pipeline)
            for k in work:
                work[k].append(t.get(k, 0))
        return {
            "samples": len(records),
            "failed": bad,
            "client": summarize(client),
            "overhead": summarize(overhead),
            "overhead_minus_inference_only": summarize(overhead_inf),
            "parts_p50_ms": {k: percentile(v, 50) for k, v in parts.items()},
            "work_p50_ms": {k: percentile(v, 50) for k, v in work.items()},
        }

    def noop_latencies(self, samples: int) -> list[float]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "noop.json"
            args = [sys.executable, "-m", "bench.noop", "--samples", str(samples), "--warmup", "20", "--out", str(out)]
            proc = subprocess.run(args, cwd=ROOT, env=self.stack.env, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"noop client failed: {proc.stderr[-2000:]}")
            latencies: list[float] = json.loads(out.read_text())["latencies_ms"]
            return latencies

    def figure_try_sync(self) -> None:
        plan, s = self.plan, self.stack
        log("2. Try-Sync overhead: client latency − (inference + encode + upload) vs a bare Celery no-op round trip")
        log("  each variant in alternating blocks with the no-op, which runs first and last")
        s.reset()
        s.open_gate()  # stub workers run freely here
        noop_worker = s.start_noop_worker()
        variants: dict[str, dict[str, Any]] = {}
        if plan.sync_real_samples:
            for stub in list(s.stubs):
                s.stop_worker(stub)
            worker = s.start_real_worker()
            variants["tiny pipeline 1 MP, real worker"] = self.try_sync_alternating(plan.sync_real_samples, 2)
            s.stop_worker(worker)
        s.ensure_stubs(1)
        variants["stub pipeline, real worker task"] = self.try_sync_alternating(plan.sync_stub_samples, 5)
        s.stop_worker(noop_worker)
        self.results["2_try_sync"] = {"variants": variants}
        for name, v in variants.items():
            o, floor = v["overhead"], v["noop"]
            log(
                f"  {name}: overhead p50 {o['p50_ms']:.1f} ms p99 {o['p99_ms']:.1f} ms in {v['blocks']} block(s); "
                f"no-op p50 {floor['p50_ms']:.2f} ms p99 {floor['p99_ms']:.2f} ms (n={floor['n']}); "
                f"parts p50 {v['parts_p50_ms']}; work p50 {v['work_p50_ms']}; failed {v['failed']}"
            )
            ratio = o["p50_ms"] / floor["p50_ms"]
            self.row(
                f"2. Try-Sync overhead, {name} (ms, n={v['samples']})",
                f"p50 {fmt(o['p50_ms'])} / p99 {fmt(o['p99_ms'])}",
                f"p50 {fmt(floor['p50_ms'], 2)} / p99 {fmt(floor['p99_ms'], 2)} (Celery no-op, n={floor['n']})",
                f"{ratio:.1f}",
                "p50 ≤ 2",
                self.verdict(ratio <= 2, v["failed"] == 0),
            )

    # -- 4 ---------------------------------------------------------------------------------------------------------

    def figure_waiters(self) -> None:
        plan = self.plan
        log(f"4. waiting clients: {plan.waiters_small} and {plan.waiters} Try-Sync requests held by a fresh API")
        runs = {n: self.hold_and_drain(n) for n in (plan.waiters_small, plan.waiters)}
        self.results["4_waiters"] = {str(n): v for n, v in runs.items()}
        big, small = runs[plan.waiters], runs[plan.waiters_small]
        refused = {k: v for k, v in big["outcomes"].items() if k != "200 succeeded"}
        self.row(
            f"4. Waiting clients answered correctly (of {plan.waiters:,})",
            f"{big['answered_ok']:,} in {fmt(big['drain_s'])} s after release ({plan.drain_workers} stub workers)"
            + (f"; others: {', '.join(f'{n} × {k}' for k, n in refused.items())}" if refused else ""),
            "—",
            f"{big['answered_ok'] / plan.waiters:.3f}",
            "all",
            self.verdict(big["answered_ok"] == plan.waiters),
        )

        def held(run: dict[str, Any]) -> str:
            n, wanted = run["client_connections_held"], run["waiters"]
            return "" if n >= wanted else f"; only {n:,} held"

        # Per client actually held; with fewer than half held the figure says little.
        enough = big["client_connections_held"] >= plan.waiters / 2
        per_waiter = big["rss_growth_kb_per_held_waiter"]
        self.row(
            "4. API memory per waiting client (KB)",
            f"{fmt(per_waiter)} (RSS {fmt(big['rss_mb']['base'])} → {fmt(big['rss_mb']['held'])} MB held, "
            f"{fmt(big['rss_mb']['after'])} MB after{held(big)})",
            f"{fmt(small['rss_growth_kb_per_held_waiter'])} at {plan.waiters_small:,} waiters{held(small)}",
            "—",
            "< 100",
            self.verdict(per_waiter < 100, enough),
        )
        held_big, held_small = big["redis_connections"]["held"], small["redis_connections"]["held"]
        self.row(
            "4. API Redis connections while holding waiters",
            f"{held_big} at {plan.waiters:,} (idle {big['redis_connections']['base']}, "
            f"peak {big['redis_connections']['peak']}{held(big)})",
            f"{held_small} at {plan.waiters_small:,} (peak {small['redis_connections']['peak']}{held(small)})",
            f"{held_big / max(held_small, 1):.1f}",
            "independent of waiters",
            # Independent: under one more connection per 100 more waiters, and never one per waiter.
            self.verdict(
                held_big - held_small <= 0.01 * (plan.waiters - plan.waiters_small) and held_big < plan.waiters_small,
                enough and small["client_connections_held"] >= plan.waiters_small / 2,
            ),
        )

    def hold_and_drain(self, waiters: int) -> dict[str, Any]:
        s, plan = self.stack, self.plan
        s.reset()
        r = s.redis_client()
        r.set(s.gate, 1)
        # The per-tenant cap on Try-Sync waits (a fairness policy) would answer most of one tenant's W at
        # once: lifted here, as the figure measures what one API process can hold.
        api, url = s.start_api(KLEIN_TRY_SYNC_TIMEOUT_S="600", KLEIN_MAX_SYNC_WAITS_PER_TENANT=str(2 * waiters))
        assert api.process is not None
        pid = api.process.pid
        redis_port = int(s.redis_url.rsplit(":", 1)[1].split("/")[0])
        client: subprocess.Popen[bytes] | None = None
        try:
            workers = s.ensure_stubs(plan.drain_workers)
            with httpx.Client(base_url=url, headers=self.headers() | {"Try-Sync": "true"}, timeout=60) as http:
                for _ in range(5):  # warm: every code path of a Try-Sync once
                    http.post("/v1/predictions", content=SYNC_BODY).raise_for_status()
            r.delete(s.gate)  # from now on workers hold whatever they take
            time.sleep(1.0)
            proc = psutil.Process(pid)

            def redis_conns() -> tuple[int, int]:
                ports = set(tcp_peers(pid, redis_port))
                listed = sum(1 for c in r.client_list() if int(c["addr"].rsplit(":", 1)[1]) in ports)
                return len(ports), listed

            base_rss = proc.memory_info().rss
            base_redis, base_listed = redis_conns()
            base_pg = len(tcp_peers(pid, 5432))
            spec = {
                "url": f"{url}/v1/predictions",
                "method": "POST",
                "headers": self.headers() | {"Try-Sync": "true"},
                "body": SYNC_BODY,
                "connections": waiters,
                "requests": waiters,
                "record": True,
            }
            tmp = Path(tempfile.mkdtemp(prefix="klein-waiters-"))
            client, out = start_python(spec, tmp)
            peak_redis, peak_rss = base_redis, base_rss
            warm = int(s.sql("SELECT count(*) FROM predictions"))
            started, progress_at, stored, submitted = time.monotonic(), time.monotonic(), 0, 0
            while time.monotonic() - started < 300:
                peak_redis = max(peak_redis, len(tcp_peers(pid, redis_port)))
                peak_rss = max(peak_rss, proc.memory_info().rss)
                now_stored = int(s.sql("SELECT count(*) FROM predictions")) - warm
                submitted = s.sql("SELECT count(*) FROM predictions WHERE status IN ('created', 'processing')")
                if now_stored != stored:
                    stored, progress_at = now_stored, time.monotonic()
                if stored >= waiters or client.poll() is not None:
                    break
                if time.monotonic() - progress_at > 15:  # some requests were refused: measure what is held
                    log(f"  {waiters}: no new prediction stored for 15 s ({stored} of {waiters}); measuring as is")
                    break
                time.sleep(0.1)
            submit_s = time.monotonic() - started
            time.sleep(1.0)
            held_rss = proc.memory_info().rss
            held_redis, held_listed = redis_conns()
            peak_redis = max(peak_redis, held_redis)
            held_pg = len(tcp_peers(pid, 5432))
            client_conns = sum(
                1
                for c in proc.net_connections(kind="tcp")
                if c.status == "ESTABLISHED" and c.laddr.port == int(url.rsplit(":", 1)[1])
            )
            log(
                f"  {waiters}: {submitted} stored in {submit_s:.1f} s; {client_conns} client connections open; "
                f"RSS {base_rss / 2**20:.1f} → {held_rss / 2**20:.1f} MB; Redis connections {base_redis} → "
                f"{held_redis} (CLIENT LIST {held_listed}, peak {peak_redis}); PostgreSQL {base_pg} → {held_pg}"
            )
            released = time.time()
            r.set(s.gate, 1)
            client.wait(900)
            after_rss = proc.memory_info().rss
            after_redis, _ = redis_conns()
            result = json.loads(out.read_text()) if out.exists() else {"records": []}
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if client is not None and client.poll() is None:
                client.kill()
            r.set(s.gate, 1)
            r.close()
            api.stop()
        records = result.get("records", [])
        ok = [
            rec
            for rec in records
            if rec.get("status") == 200
            and isinstance(rec.get("body"), dict)
            and rec["body"].get("status") == "succeeded"
            and rec["body"].get("generation_url")
        ]
        ids = {rec["body"]["id"] for rec in ok}
        ends = [rec["end"] for rec in records if "end" in rec]
        drain_s = max(ends) - released if ends else float("nan")
        outcome = Counter(_outcome(rec) for rec in records)
        log(f"  {waiters}: answered {dict(outcome)}; drained in {drain_s:.1f} s by {len(workers)} stub workers")
        return {
            "waiters": waiters,
            "stored": submitted,
            "submit_s": submit_s,
            "client_connections_held": client_conns,
            "answered_ok": len(ids),
            "outcomes": dict(outcome),
            "drain_s": drain_s,
            "drain_per_s": len(ids) / drain_s if drain_s and drain_s == drain_s else float("nan"),
            "rss_mb": {
                "base": base_rss / 2**20,
                "held": held_rss / 2**20,
                "peak": peak_rss / 2**20,
                "after": after_rss / 2**20,
            },
            "rss_growth_kb_per_held_waiter": (held_rss - base_rss) / 1024 / max(client_conns, 1),
            "redis_connections": {
                "base": base_redis,
                "held": held_redis,
                "held_client_list": held_listed,
                "peak": peak_redis,
                "after": after_redis,
                "base_client_list": base_listed,
            },
            "postgres_connections": {"base": base_pg, "held": held_pg},
        }


def _outcome(rec: dict[str, Any]) -> str:
    body = rec.get("body")
    return f"{rec.get('status')} {body.get('status') if isinstance(body, dict) else rec.get('error')}"
