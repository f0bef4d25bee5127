"""`python bench/gpu.py --compare`: each variant in its own process, under a time limit, inside one budget.

A process per variant gives every variant a clean GPU (no earlier pipeline, no earlier compiled graphs or
inductor options) and lets a slow one be stopped without losing the others: the child writes its record after
every scenario, and the parent merges the records into the report after every variant. A variant whose limit
runs out keeps the scenarios it finished, marked as timed out; variants the budget no longer covers are listed
as skipped. On CUDA the default budget (450 s) fits a run into 8 minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.gpu_variant import CORE, Variant, variants, write_json

ROOT = Path(__file__).resolve().parent.parent
CUDA_BUDGET_S = 450.0
# Per-variant caps on CUDA: an eager variant builds and measures in well under a minute; a compiled one also
# compiles every measured shape (transformer blocks and VAE decoder) once.
CUDA_CAP_S = {"eager": 90.0, "compiled": 180.0}
MIN_START_S = {"cuda": 30.0, "cpu": 5.0}  # less left than this: the variant is skipped, not started
RESERVE_S = 5.0  # kept for the parent's last report
# The arguments a child repeats from the parent's command line (bench/gpu.py's options).
FORWARDED = ("device", "scenarios", "iters", "warmup", "scale", "steps", "peak_tflops", "model", "breakdown")
FLAGS = ("tiny", "cut_depth")


def chosen_variants(args: Any) -> list[Variant]:
    everything = variants(args.device.startswith("cuda"))
    by_name = {v.name: v for v in everything}
    if args.switches == "all":
        return everything
    names = args.switches.split(",") if args.switches else list(CORE)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(by_name)}")
    return [by_name["baseline"]] + [by_name[n] for n in names if n != "baseline"]


def child_command(args: Any, variant: Variant, record: Path, flops: Path) -> list[str]:
    command = [sys.executable, "-u", str(ROOT / "bench" / "gpu.py")]
    for name in FORWARDED:
        value = getattr(args, name)
        if value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    command += [f"--{name.replace('_', '-')}" for name in FLAGS if getattr(args, name)]
    return [*command, "--child", variant.name, "--child-json", str(record), "--flops-json", str(flops)]


def run_child(command: list[str], limit_s: float | None) -> tuple[int | None, float]:
    """Run `command` in its own process group for at most `limit_s`: (exit status or None if stopped, seconds).
    The group is stopped too when this process is interrupted or terminated (SIGTERM), never left running."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return process.wait(timeout=limit_s), time.perf_counter() - started
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - started
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def limits(args: Any, variant: Variant) -> float | None:
    """The variant's own cap: --limit NAME=S, else --variant-limit, else the CUDA default for its kind."""
    for item in args.limit or []:
        name, _, seconds = item.rpartition("=")
        if name == variant.name:
            return float(seconds)
    if args.variant_limit:
        return float(args.variant_limit)
    if args.device.startswith("cuda"):
        compiled = variant.overrides.get("compile_transformer") or variant.overrides.get("compile_vae")
        return CUDA_CAP_S["compiled" if compiled else "eager"]
    return None


def compare(args: Any, flops: dict[str, Any], report: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """Run every chosen variant in a child process; `report["compare"]` is updated and saved after each one."""
    started = time.perf_counter()
    budget = args.budget if args.budget is not None else (CUDA_BUDGET_S if args.device.startswith("cuda") else None)
    minimum = MIN_START_S["cuda" if args.device.startswith("cuda") else "cpu"]
    work.mkdir(parents=True, exist_ok=True)
    flops_path = work / "flops.json"
    write_json(flops_path, {k: v.as_dict(args.peak_tflops) for k, v in flops.items()})
    records: list[dict[str, Any]] = []
    report |= {"compare": records, "budget_s": budget, "work": str(work)}
    for variant in chosen_variants(args):
        path = work / f"variant-{variant.slug}.json"
        path.unlink(missing_ok=True)
        left = None if budget is None else budget - (time.perf_counter() - started) - RESERVE_S
        bounds = [x for x in (limits(args, variant), left) if x is not None]
        limit = min(bounds) if bounds else None
        if limit is not None and limit < minimum:
            record: dict[str, Any] = {"variant": variant.name, "status": f"skipped: {max(left or 0, 0):.0f} s left"}
            record["results"] = []
        else:
            print(f"\n## {variant.name} (limit {'none' if limit is None else f'{limit:.0f} s'})", flush=True)
            rc, took = run_child(child_command(args, variant, path, flops_path), limit)
            record = json.loads(path.read_text()) if path.exists() else {"variant": variant.name, "results": []}
            if rc is None:
                record["status"] = f"timed out at its {limit:.0f} s limit (kept {len(record['results'])} scenarios)"
            elif rc != 0 and not str(record.get("status", "")).startswith(("done", "skipped", "setup failed")):
                record["status"] = f"exited with status {rc}"
            record["wall_s"] = round(took, 1)
        records.append(record)
        report["table"] = table(records, list(flops))
        if args.json:
            write_json(Path(args.json), report)
        print(f"[{variant.name}] {record['status']}", flush=True)
    print("\n" + report["table"], flush=True)
    return records


def table(records: list[dict[str, Any]], keys: list[str]) -> str:
    """p50 per scenario (× baseline), 'c' compiled or 'e' eager, peak memory, start-up with warm-ups, status."""
    base = {r["key"]: r["p50_s"] for r in records[0].get("results", [])} if records else {}
    lines = [
        "| variant | " + " | ".join(f"{k} p50 s (× baseline)" for k in keys) + " | peak GB | start s | status |",
        "| --- | " + " | ".join("---" for _ in keys) + " | --- | --- | --- |",
    ]
    for record in records:
        by_key = {r["key"]: r for r in record.get("results", [])}
        cells = []
        for k in keys:
            r = by_key.get(k)
            if r is None:
                cells.append("—")
                continue
            speedup = f" ({base[k] / r['p50_s']:.2f}×)" if k in base else ""
            cells.append(f"{r['p50_s']:.4f}{speedup} {'c' if r.get('compiled') else 'e'}")
        peak = max((r["peak_gb"] for r in by_key.values()), default=None)
        start = record.get("start_s")
        lines.append(
            f"| {record['variant']} | " + " | ".join(cells) + f" | {'—' if peak is None else f'{peak:.2f}'} "
            f"| {'—' if start is None else f'{start:.1f}'} | {record.get('status', '?')} |"
        )
    return "\n".join(lines)
