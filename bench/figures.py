"""The platform benchmark's figures 1, 3 and 5, and what every figure uses."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    MODEL,
    SUBMIT_BODY,
    Plan,
    combine,
    fmt,
    log,
    process_cpu,
)
from bench.loadgen import Loadgen, start_python
from bench.profiling import summarize_profile
from bench.stack import Stack

# ---------------------------------------------------------------------------------------------------------------
# Figures


@dataclass
class BenchBase:
    """What every figure uses: the plan, the stack, the load generator, and the results table."""

    plan: Plan
    stack: Stack
    loadgen: Loadgen
    profile_dir: Path | None
    results: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, str]] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        return {"apikey": self.stack.key, "Model": MODEL, "Content-Type": "application/json"}

    def submit_spec(self, url: str, duration: float, body: str = SUBMIT_BODY) -> dict[str, Any]:
        return {
            "url": url,
            "method": "POST",
            "headers": self.headers(),
            "body": body,
            "connections": self.plan.connections,
            "duration_s": duration,
        }

    def status_spec(self, base: str, paths: list[str], duration: float, auth: bool) -> dict[str, Any]:
        headers = {"apikey": self.stack.key} if auth else {}
        return {
            "url": base + paths[0],
            "paths": paths,
            "headers": headers,
            "connections": self.plan.connections,
            "duration_s": duration,
        }

    def load(self, spec: dict[str, Any]) -> dict[str, Any]:
        warm = dict(spec, duration_s=self.plan.warmup_s)
        self.loadgen.run(warm)
        return self.loadgen.run(spec)

    def side_by_side(self, ours: dict[str, Any], floor: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Alternate ours and the floor, `rounds` times each (order swapped every round)."""
        ours_runs: list[dict[str, Any]] = []
        floor_runs: list[dict[str, Any]] = []
        for round_no in range(self.plan.rounds):
            order = [("ours", ours), ("floor", floor)]
            if round_no % 2:
                order.reverse()
            for which, spec in order:
                self.loadgen.run(dict(spec, duration_s=self.plan.warmup_s))
                count = not self.plan.short  # the statistics lag: 2 s a run, not worth it in short mode
                before = self.stack.counters() if count else {}
                server = self.stack.api_pid if which == "ours" else self.stack.floor_pid
                cpu_before = self.stack.cpu_seconds(server)
                result = self.loadgen.run(spec)
                n = max(result["requests"], 1)
                result["cpu_us_per_request"] = {
                    k: (v - cpu_before[k]) / n * 1e6 for k, v in self.stack.cpu_seconds(server).items()
                }
                cpu = result["cpu_us_per_request"]
                sessions_text = (
                    f"; CPU per request: server {cpu['server']:.0f} µs, its PostgreSQL sessions "
                    f"{cpu['postgres']:.0f} µs, Redis {cpu['redis']:.0f} µs"
                )
                if count:
                    after = self.stack.counters()
                    result["db_sessions_opened"] = after["db_sessions"] - before["db_sessions"]
                    result["db_transactions_per_request"] = (after["db_transactions"] - before["db_transactions"]) / n
                    result["redis_commands_per_request"] = (after["redis_commands"] - before["redis_commands"]) / n
                    sessions_text += (
                        f"; ≈{result['db_sessions_opened']} database sessions opened, "
                        f"{result['db_transactions_per_request']:.1f} transactions and "
                        f"{result['redis_commands_per_request']:.1f} Redis commands per request"
                    )
                (ours_runs if which == "ours" else floor_runs).append(result)
                log(
                    f"  {which}: {result['rps']:.0f} req/s, p50 {result['p50_ms']:.1f} ms, "
                    f"p99 {result['p99_ms']:.1f} ms, non-2xx {result['non_2xx']}, "
                    f"socket errors {result['socket_errors']}{sessions_text}"
                )
        return combine(ours_runs), combine(floor_runs)

    def row(self, figure: str, ours: str, floor: str, ratio: str, goal: str, result: str) -> None:
        self.rows.append(
            {"figure": figure, "ours": ours, "floor": floor, "ratio": ratio, "goal": goal, "result": result}
        )

    def throughput_row(self, figure: str, ours: dict[str, Any], floor: dict[str, Any], valid: bool) -> None:
        """Requests per second against the floor's; the goal is 0.8 of it."""

        def cell(side: dict[str, Any]) -> str:
            return f"{fmt(side['rps'], 0)} (p50 {fmt(side['p50_ms'])} / p99 {fmt(side['p99_ms'])} ms)"

        ratio = ours["rps"] / floor["rps"]
        self.row(figure, cell(ours), cell(floor), f"{ratio:.2f}", "≥ 0.8", self.verdict(ratio >= 0.8, valid))

    @staticmethod
    def verdict(ok: bool, valid: bool = True) -> str:
        if not valid:
            return "invalid"
        return "pass" if ok else "FAIL"

    def profile(self, name: str, spec: dict[str, Any], floor_spec: dict[str, Any]) -> None:
        """py-spy records of the API and of its floor under these loads (after the measurement, so they never
        skew it): what the API spends that the floor does not is what there is to remove."""
        if self.profile_dir is None:
            return
        if self.stack.api_pid is not None:
            self._profile(name, spec, self.stack.api_pid)
        floor = self.stack.floor
        if floor is not None and floor.process is not None:
            self._profile(f"{name}-floor", floor_spec, floor.process.pid)

    def _profile(self, name: str, spec: dict[str, Any], process_id: int) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(spy).exists():
            log("py-spy not found (pip install py-spy): no profile")
            return
        assert self.profile_dir is not None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        pid = str(process_id)
        seconds = str(int(self.plan.profile_s))
        raw = self.profile_dir / f"{name}.txt"
        load = dict(spec, duration_s=2 * self.plan.profile_s + 5)
        with tempfile.TemporaryDirectory() as tmp:
            generator, _ = start_python(load, Path(tmp)) if self.loadgen.kind == "python" else (None, None)
            wrk = None
            if generator is None:
                from bench.loadgen import wrk_script

                script = Path(tmp) / "wrk.lua"
                script.write_text(wrk_script(load))
                wrk = subprocess.Popen(
                    [
                        "wrk",
                        "-t1",
                        "-c",
                        str(load["connections"]),
                        "-d",
                        f"{int(load['duration_s'])}s",
                        "-s",
                        str(script),
                        load["url"],
                    ],
                    stdout=subprocess.DEVNULL,
                )
            time.sleep(1.0)
            subprocess.run(
                [spy, "record", "--gil", "--pid", pid, "--duration", seconds, "--format", "raw", "-o", str(raw)],
                check=False,
                capture_output=True,
            )
            subprocess.run(
                [spy, "record", "--pid", pid, "--duration", seconds, "-o", str(self.profile_dir / f"{name}.svg")],
                check=False,
                capture_output=True,
            )
            for proc in (generator, wrk):
                if proc is not None:
                    proc.wait(60)
        if raw.exists():
            summary = summarize_profile(raw)
            (self.profile_dir / f"{name}-top.txt").write_text(summary)
            log(f"profile {name}: {raw} (+ .svg, -top.txt)\n{summary}")


class ThroughputFigures(BenchBase):
    """Figures 1 (submit), 3 (status reads) and 5 (deep queue)."""

    # -- 1 ---------------------------------------------------------------------------------------------------------

    def figure_submit(self) -> None:
        log("1. submit throughput: POST /v1/predictions vs floor (parse, asyncpg INSERT, Redis LPUSH)")
        s = self.stack
        ours_spec = self.submit_spec(f"{s.api_url}/v1/predictions", self.plan.duration_s)
        floor_spec = self.submit_spec(f"{s.floor_url}/floor/predictions", self.plan.duration_s)
        rows_before = s.sql("SELECT count(*) FROM predictions WHERE api_key_id = %s", s.key_id)
        queued_before = s.queued()
        ours, floor = self.side_by_side(ours_spec, floor_spec)
        inserted = s.sql("SELECT count(*) FROM predictions WHERE api_key_id = %s", s.key_id) - rows_before
        enqueued = s.queued() - queued_before
        ours["rows_inserted"], ours["messages_enqueued"] = inserted, enqueued
        log(f"  ours stored {inserted} predictions and queued {enqueued} messages (incl. warm-up)")
        ratio = ours["rps"] / floor["rps"]
        valid = ours["non_2xx"] == 0 and floor["non_2xx"] == 0 and inserted == enqueued
        self.results["1_submit"] = {"ours": ours, "floor": floor, "ratio": ratio}
        self.throughput_row("1. Submit throughput (req/s)", ours, floor, valid)
        self.profile("submit", ours_spec, floor_spec)

    # -- 3 ---------------------------------------------------------------------------------------------------------

    def figure_status(self) -> None:
        log("3. status reads: GET /v1/predictions/status/{id} vs floor (raw asyncpg primary-key read)")
        s = self.stack
        ids = [
            r[0]
            for r in s.db().execute(
                "SELECT id FROM predictions WHERE api_key_id = %s LIMIT %s", (s.key_id, self.plan.status_ids)
            )
        ]
        if len(ids) < self.plan.status_ids:
            with httpx.Client(base_url=s.api_url, headers=self.headers(), timeout=30) as http:
                for _ in range(self.plan.status_ids - len(ids)):
                    ids.append(http.post("/v1/predictions", content=SUBMIT_BODY).raise_for_status().json()["id"])
        ours_spec = self.status_spec(
            s.api_url, [f"/v1/predictions/status/{i}" for i in ids], self.plan.duration_s, True
        )
        floor_spec = self.status_spec(s.floor_url, [f"/floor/status/{i}" for i in ids], self.plan.duration_s, False)
        ours, floor = self.side_by_side(ours_spec, floor_spec)
        ratio = ours["rps"] / floor["rps"]
        self.results["3_status"] = {"ours": ours, "floor": floor, "ratio": ratio, "ids": len(ids)}
        self.throughput_row("3. Status reads (req/s)", ours, floor, ours["non_2xx"] == 0 and floor["non_2xx"] == 0)
        self.profile("status", ours_spec, floor_spec)

    # -- 5 ---------------------------------------------------------------------------------------------------------

    def idle_cpu(self, seconds: float) -> dict[str, float]:
        """Cores used by the platform's processes (and, separately, the shared Redis server) while nothing is sent."""
        r = self.stack.redis_client()
        pids = self.stack.stack_pids()
        redis_before = r.info("cpu")
        before = {k: process_cpu(v) for k, v in pids.items()}
        time.sleep(seconds)
        after = {k: process_cpu(v) for k, v in self.stack.stack_pids().items() if k in pids}
        redis_after = r.info("cpu")
        r.close()

        def redis_cpu(info: dict[str, Any]) -> float:
            return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

        out = {f"{k}_cores": (after[k] - before[k]) / seconds for k in pids}
        out["redis_server_cores"] = (redis_cpu(redis_after) - redis_cpu(redis_before)) / seconds
        out["platform_and_db_cores"] = out["api_cores"] + out["workers_cores"] + out["postgres_cores"]
        return out

    def figure_deep_queue(self) -> None:
        plan, s = self.plan, self.stack
        log(f"5. deep queue: submit p99 with {plan.deep:,} queued vs empty; idle CPU as the queue grows")
        spec = self.submit_spec(f"{s.api_url}/v1/predictions", plan.duration_s)
        backlog = s.create_tenants(plan.deep_tenants)
        ladder = [0, plan.deep] if plan.short else [0, plan.deep // 100, plan.deep // 10, plan.deep]
        empty_runs: list[dict[str, Any]] = []
        deep_runs: list[dict[str, Any]] = []
        idle: dict[int, dict[str, float]] = {}
        fills: list[dict[str, float]] = []
        # One worker busy with a render that never ends (gate closed): it drains nothing, but its background
        # threads (lease renewal, the sweeper) run as they do beside a real render. Short mode sweeps every
        # second so its 2-second windows see sweeps; full mode keeps the platform's settings.
        s.reset()
        s.close_gate()
        for extra in s.stubs[1:]:
            s.stop_worker(extra)
        s.ensure_stubs(1, {"KLEIN_SWEEP_INTERVAL_S": "1"} if plan.short else {})
        # A p99 of one 10-second run moves fourfold when the machine stalls once in it; with three rounds or
        # more, one stalled run is not the median (with two, their mean would carry it).
        rounds = plan.rounds if plan.short else max(plan.rounds, 3)
        for round_no in range(rounds):
            s.reset()
            if round_no == 0:
                idle[0] = self.idle_cpu(plan.idle_s)
            empty_runs.append(self.load(spec))
            log(f"  empty queue: p99 {empty_runs[-1]['p99_ms']:.1f} ms, {empty_runs[-1]['rps']:.0f} req/s")
            s.reset()
            depth = 0
            for target in ladder[1:] if round_no == 0 else [plan.deep]:
                fills.append(s.fill(target - depth, backlog) | {"count": target - depth})
                depth = target
                log(f"  queued {depth:,} (rows {fills[-1]['rows_s']:.1f} s, messages {fills[-1]['messages_s']:.1f} s)")
                if round_no == 0:
                    idle[depth] = self.idle_cpu(plan.idle_s)
            queued = s.queued()
            deep_runs.append(self.load(spec))
            log(f"  {queued:,} queued: p99 {deep_runs[-1]['p99_ms']:.1f} ms, {deep_runs[-1]['rps']:.0f} req/s")
        s.reset()
        s.open_gate()  # the held prediction is gone with the reset: the worker finishes it (dropped) and idles
        empty, deep = combine(empty_runs), combine(deep_runs)
        ratio = deep["p99_ms"] / empty["p99_ms"]
        self.results["5_deep_queue"] = {
            "empty": empty,
            "deep": deep,
            "p99_ratio": ratio,
            "depth": plan.deep,
            "backlog_tenants": plan.deep_tenants,
            "idle_cpu_by_depth": {str(k): v for k, v in idle.items()},
            "fills": fills,
        }
        valid = empty["non_2xx"] == 0 and deep["non_2xx"] == 0
        self.row(
            f"5. Submit p99, {plan.deep:,} queued vs empty (ms)",
            f"{fmt(deep['p99_ms'])} ({fmt(deep['rps'], 0)} req/s)",
            f"{fmt(empty['p99_ms'])} ({fmt(empty['rps'], 0)} req/s)",
            f"{ratio:.2f}",
            "≤ 1.2",
            self.verdict(ratio <= 1.2, valid),
        )
        top, bottom = idle[max(idle)], idle[0]
        ladder_text = ", ".join(
            f"{k:,}: {v['platform_and_db_cores'] * 100:.1f}% + Redis {v['redis_server_cores'] * 100:.1f}%"
            for k, v in sorted(idle.items())
        )
        self.row(
            f"5. Idle CPU of API + a busy worker (sweeper) + their DB sessions, {plan.deep:,} queued vs empty "
            "(% of a core)",
            f"{top['platform_and_db_cores'] * 100:.2f}% (by depth: {ladder_text})",
            f"{bottom['platform_and_db_cores'] * 100:.2f}%",
            f"+{(top['platform_and_db_cores'] - bottom['platform_and_db_cores']) * 100:.2f} pt",
            "flat (report)",
            "info",
        )
