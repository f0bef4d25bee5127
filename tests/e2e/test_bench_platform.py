"""The platform benchmark's short mode runs end to end (so it never rots); nothing about speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIGURE_ROWS = (
    "| 1. Submit throughput",
    "| 2. Try-Sync overhead",
    "| 3. Status reads",
    "| 4. Waiting clients answered correctly",
    "| 4. API memory per waiting client",
    "| 4. API Redis connections",
    "| 5. Submit p99",
    "| 5. Idle CPU",
)


def test_platform_benchmark_short_mode(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # The Python load generator: CI machines need not have wrk (full mode uses it when installed).
    args = [sys.executable, "-m", "bench.platform", "--short", "--loadgen", "python", "--json", str(out)]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=240)
    report = proc.stdout + proc.stderr[-6000:]
    assert proc.returncode == 0, report
    for row in FIGURE_ROWS:
        assert row in proc.stdout, f"missing row {row!r}\n{report}"
    assert "error" not in {line.rsplit("|", 2)[-2].strip() for line in proc.stdout.splitlines() if line.startswith("|")}
    results = json.loads(out.read_text())
    assert not results["failures"], results["failures"]
    assert set(results["results"]) == {"1_submit", "2_try_sync", "3_status", "4_waiters", "5_deep_queue"}


def test_asgi_cpu_benchmark_runs() -> None:
    args = [sys.executable, "-m", "bench.asgi_cpu", "--seconds", "0.5", "--rounds", "1", "--concurrency", "4"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    for path in ("submit", "status"):
        line = next(line for line in proc.stdout.splitlines() if line.startswith(f"{path} round 1:"))
        assert ", 0 failed)" in line, line  # every request of ours answered 2xx
