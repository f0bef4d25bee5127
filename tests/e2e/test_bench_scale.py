"""`python -m bench.scale` with a few predictions: each phase's footprint is what the code does, and the ceiling is
computed from it (nothing about speed is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scale_benchmark_measures_each_phase(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "scale.json"
    args = [sys.executable, "-m", "bench.scale", "--predictions", "3", "--lists", "2", "--idle-s", "1"]
    args += ["--saturate-s", "1", "--pgbench-s", "1", "--connections", "4", "--redis-requests", "2000"]
    args += ["--loadgen", "python", "--model", str(tiny_model), "--json", str(out)]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = proc.stdout + proc.stderr[-6000:]
    assert proc.returncode == 0, report
    for row in ("| submit |", "| claim |", "| finish |", "| webhook |", "| **one prediction** |", "First to give out"):
        assert row in proc.stdout, f"missing {row!r}\n{report}"
    figures = json.loads(out.read_text())
    phases = figures["phases"]

    submit = phases["submit"]  # the row, its WAL, the enqueue
    assert submit["pg_rows_written"] >= 1 and submit["pg_commits"] >= 1 and submit["wal_bytes"] > 0, submit
    assert submit["redis_cmds"] >= 1 and submit["s3_requests"] == 0, submit
    claim = phases["claim"]  # the claim's UPDATE; the broker's fetch
    assert claim["pg_rows_written"] >= 1 and claim["redis_cmds"] >= 1, claim
    step = phases["progress, per step"]  # an event on the prediction's stream and its notice, per step
    assert step["redis_cmds"] >= 3 and step["s3_requests"] == 0, step
    finish = phases["finish"]  # the output's upload and the row's update
    assert finish["s3_puts"] >= 1 and finish["s3_bytes"] > 1000, finish
    assert finish["pg_rows_written"] >= 1 and finish["wal_bytes"] > 0, finish
    assert phases["webhook"]["pg_statements"] >= 1, phases["webhook"]
    download = phases["download"]
    assert download["s3_gets"] >= 1 and download["s3_bytes"] >= finish["s3_bytes"] * 0.9, download
    for read in ("status, queued", "status, done", "list"):
        assert 0.5 <= phases[read]["pg_statements"] <= 5, (read, phases[read])
        assert phases[read]["pg_rows_written"] < 0.5 and phases[read]["s3_requests"] == 0, (read, phases[read])

    one = figures["one_prediction"]
    assert one["pg_statements"] > submit["pg_statements"] and one["redis_cmds"] > 10, one
    saturation = figures["saturation"]
    assert saturation["submits_per_s"] > 0 and saturation["non_2xx"] == 0, saturation
    ceiling = figures["ceiling"]
    assert 0 < ceiling["predictions_per_s"] < math.inf and ceiling["first"] in proc.stdout, ceiling
    assert ceiling["predictions_per_s"] == min(ceiling["postgres"], ceiling["redis"]), ceiling
