"""The one GPU command (bench/gpu_run.sh: bench/gpu.py --compare) in its cut-depth mode on CPU: the runner a GPU
run relies on to fit its time, and its offline install from a wheelhouse.

Each variant runs in its own process under a limit; its record is written after every scenario (seen here while
the run goes on), a variant stopped by its limit keeps what it wrote, FP8 off FP8 hardware is skipped, and the
report is complete after every variant. The figures are CPU figures of the real widths, not GPU ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cut_depth_compare_runs_each_variant_in_its_own_process_under_a_limit(tmp_path: Path) -> None:
    out, work = tmp_path / "bench.json", tmp_path / "variants"
    command = ["bash", "bench/gpu_run.sh", "--cut-depth", "--switches", "fuse_qkv,all + fp8"]
    command += ["--scenarios", "t2i-1024,t2i-512", "--scale", "16", "--steps", "1", "--iters", "1", "--warmup", "0"]
    command += ["--limit", "fuse_qkv=8", "--json", str(out), "--work", str(work)]
    env = os.environ | {"PYTHON": sys.executable}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    baseline = work / "variant-baseline.json"
    seen: list[tuple[str, int]] = []  # (status, scenarios written) of the baseline's record, as the run goes on
    deadline = time.monotonic() + 420
    while process.poll() is None and time.monotonic() < deadline:
        try:
            record = json.loads(baseline.read_text())
            state = (record["status"], len(record["results"]))
            if not seen or seen[-1] != state:
                seen.append(state)
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet (writes are atomic renames)
            pass
        time.sleep(0.2)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output[-4000:]
    assert "nothing to install" in output  # this machine has every package

    assert ("measuring", 1) in seen and seen[-1] == ("done", 2), seen  # written after every scenario
    report = json.loads(out.read_text())
    rows = {row["variant"]: row for row in report["compare"]}
    assert list(rows) == ["baseline", "fuse_qkv", "all + fp8"]
    base = rows["baseline"]
    assert [(r["key"], r["compiled"]) for r in base["results"]] == [("t2i-1024", False), ("t2i-512", False)]
    assert base["environment"]["device"] == "cpu" and base["text_encoder_out_layers"] == [0, 1, 2]
    stopped = rows["fuse_qkv"]
    assert stopped["status"].startswith("timed out at its 8 s limit"), stopped  # building alone takes longer
    assert stopped["settings"]["fuse_qkv"] is True and 8 <= stopped["wall_s"] < 8 + 30  # its record was kept
    assert rows["all + fp8"]["status"] == "skipped: FP8 needs CUDA (compute capability ≥ 8.9)"
    assert "| baseline | " in report["table"] and " e |" in report["table"]
    assert report["flops"]["t2i-1024"]["total"] > 0


def test_compare_skips_what_the_budget_no_longer_covers(tmp_path: Path) -> None:
    """Without starting a process: every variant past the budget is listed as skipped, and the report saved."""
    from bench.gpu_compare import compare

    args = argparse.Namespace(device="cpu", switches="fuse_qkv", budget=3.0, limit=None, variant_limit=None)
    args.json = tmp_path / "report.json"
    report: dict[str, object] = {}
    records = compare(args, {}, report, tmp_path / "work")
    assert [(r["variant"], r["status"]) for r in records] == [
        ("baseline", "skipped: 0 s left"),
        ("fuse_qkv", "skipped: 0 s left"),
    ]
    assert json.loads(args.json.read_text())["compare"] == records


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel of a module `klein_probe`, made by hand (a wheel is a zip with its metadata)."""
    import zipfile

    path = folder / "klein_probe-1.0-py3-none-any.whl"
    info = "klein_probe-1.0.dist-info"
    files = {
        "klein_probe/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: klein-probe\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


def test_the_gpu_command_installs_what_is_missing_from_the_wheelhouse_offline(tmp_path: Path) -> None:
    wheelhouse, site = tmp_path / "whl", tmp_path / "site"
    wheelhouse.mkdir()
    env = os.environ | {"PYTHON": sys.executable, "WHEELHOUSE": str(wheelhouse), "SITE": str(site)}
    env |= {"NEEDS": "json klein_probe", "PIP_INDEX_URL": "http://127.0.0.1:9/"}  # no index would answer
    command = ["bash", "bench/gpu_run.sh", "--install-only"]
    empty = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "missing: klein_probe; no wheels" in empty.stderr
    assert "bench/gpu_wheels.sh" in empty.stderr

    probe_wheel(wheelhouse)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "installing for klein_probe from 1 wheels" in done.stdout
    check = [sys.executable, "-c", "import klein_probe; print(klein_probe.VALUE)"]
    assert subprocess.run(check, env=env | {"PYTHONPATH": str(site)}, capture_output=True, text=True).stdout == "42\n"
