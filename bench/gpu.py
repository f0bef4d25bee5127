"""GPU inference benchmark of the worker's pipeline: `python bench/gpu.py` (CUDA), `--tiny` or `--cut-depth` (CPU).

On CUDA it builds the real FLUX.2 [klein] 4B architecture (bench/real_model.py: the released configs, random
weights) directly on the GPU, in the worker's dtype: no weights are downloaded. `--model PATH` loads real
weights from a local diffusers folder instead, as the worker does (straight onto the device). `--cut-depth`
keeps every real width at 1 double + 1 single block and a 4-layer text encoder (CPU by default); `--tiny` runs
the tiny random-weights pipeline on CPU. Sides are divided by `--scale` (4 with --tiny, 8 with --cut-depth).

Every timing is the worker's own call, `KleinPipeline.generate_batch(params, references)`, PIL images out, after the
worker's setup (dtype, speed switches from KLEIN_* settings). With compilation on, exactly the measured shapes
are warmed up, each just before its scenario, and every cell says whether it ran compiled (checked).

For each scenario (bench/flops.py SCENARIOS): p50/p90 seconds, images/s, peak memory, the FLOPs counted on the
meta device, the compute floor at `--peak-tflops` and the fraction of it reached (floor / p50). Prompts differ
on every call unless `--repeat-prompt`, so the prompt-embedding cache never hides the text encoder.

`--compare` runs each variant (bench/gpu_variant.py: baseline = every switch off, the worker's defaults, each
switch on its own, everything on with and without FP8) in its own process under a time limit, inside one budget
(450 s on CUDA), writing the report after every variant (bench/gpu_compare.py). `--fp8-error` reports FP8's
numerical difference to bf16 on the same inputs (bench/gpu_fp8.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

if not __package__:  # `python bench/gpu.py`: the repository on the path instead of bench/ (its platform.py)
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.flops import PEAK_TFLOPS, SCENARIOS, Scenario, ScenarioFlops
from bench.gpu_fp8 import fp8_difference
from bench.gpu_measure import Result, environment, results_table
from bench.gpu_variant import (
    CORE,
    ENV,
    Variant,
    flop_counter,
    make_pipeline,
    release,
    run_variant,
    source_name,
    variants,
)

COMPARE_SCENARIOS = "t2i-1024,t2i-512,edit-1024,batch4-512"  # --compare's default: 4 shapes fit the budget


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, the tiny random-weights pipeline (CI mode)")
    parser.add_argument("--cut-depth", action="store_true", help="the real widths, 1+1 blocks, 4 text layers")
    parser.add_argument("--model", help="load real weights from this diffusers folder instead of random ones")
    parser.add_argument("--device", help="default: cuda, or cpu with --tiny / --cut-depth")
    parser.add_argument("--scenarios", help="comma-separated keys: " + ",".join(s.key for s in SCENARIOS))
    parser.add_argument("--iters", type=int, help="timed calls per scenario (10; 5 with --compare; 3 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed calls per scenario first (2; 1 with --compare or CPU)")
    parser.add_argument("--scale", "--tiny-scale", type=int, help="divide every side by this (4 tiny, 8 cut)")
    parser.add_argument("--steps", type=int, help="denoising steps instead of the scenarios' 4")
    parser.add_argument("--repeat-prompt", action="store_true", help="the same prompt every call (cache hits)")
    parser.add_argument("--compare", action="store_true", help="variants, each in its own process; see --switches")
    parser.add_argument("--switches", help=f"--compare: these variants ('all': every one; default {','.join(CORE)})")
    parser.add_argument("--budget", type=float, help="--compare: seconds for all variants (CUDA default 450)")
    parser.add_argument("--variant-limit", type=float, help="--compare: seconds per variant (CUDA: 90, compiled 180)")
    parser.add_argument("--limit", action="append", help="--compare: NAME=SECONDS for one variant (repeatable)")
    parser.add_argument("--work", type=Path, help="--compare: folder of the variants' own records")
    parser.add_argument("--breakdown", type=int, help="one more call per scenario, timed per part (1 on CUDA)")
    parser.add_argument("--fp8-error", action="store_true", help="FP8 vs bf16 relative error on the same inputs")
    parser.add_argument("--no-safety", action="store_true", help="skip the image checker's scenario (bench/safety.py)")
    parser.add_argument(
        "--no-enhancer", action="store_true", help="skip the prompt enhancer's scenario on CUDA (bench/enhance.py)"
    )
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="dense bf16 rate of the floor")
    parser.add_argument("--json", type=Path, help="also write every figure here (after every variant)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # --compare's child: run this one variant
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--flops-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cpu_mode = args.tiny or args.cut_depth
    args.device = args.device or ("cpu" if cpu_mode else "cuda")
    on_cpu = args.device == "cpu"
    args.iters = args.iters or (3 if on_cpu else 5 if args.compare else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if on_cpu or args.compare else 2)
    args.scale = args.scale or (4 if args.tiny else 8 if args.cut_depth else 1)
    args.breakdown = args.breakdown if args.breakdown is not None else int(not on_cpu)
    if args.compare and not args.scenarios:
        args.scenarios = COMPARE_SCENARIOS
    return args


def scenarios_for(args: argparse.Namespace) -> list[Scenario]:
    chosen = [s for s in SCENARIOS if not args.scenarios or s.key in args.scenarios.split(",")]
    if not chosen:
        raise SystemExit(f"no scenario among {args.scenarios!r}; known: {', '.join(s.key for s in SCENARIOS)}")
    if args.scale > 1:
        chosen = [s.scaled(args.scale) for s in chosen]
    if args.steps:
        chosen = [Scenario(s.key, s.label, s.width, s.height, s.references, s.batch, args.steps) for s in chosen]
    return chosen


def flops_for(args: argparse.Namespace, scenarios: list[Scenario]) -> dict[str, ScenarioFlops]:
    if args.flops_json:  # counted once by the parent of --compare
        names = set(ScenarioFlops.__dataclass_fields__)
        saved = json.loads(args.flops_json.read_text())
        return {k: ScenarioFlops(**{n: v for n, v in saved[k].items() if n in names}) for k in saved}
    counter = flop_counter(args)
    return {s.key: counter.scenario(s) for s in scenarios}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from core.settings import Settings

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --tiny or --cut-depth for a CPU mode", file=sys.stderr)
        return 2
    env = Settings()  # KLEIN_* from the environment, as the worker reads them
    scenarios = scenarios_for(args)
    flops = flops_for(args, scenarios)
    if args.child:  # one variant of --compare, in its own process
        variant = next(v for v in variants(device.type == "cuda") if v.name == args.child)
        run_variant(args, variant, env, scenarios, flops, path=args.child_json)
        return 0

    info = environment(device)
    mode = source_name(args) + ("" if device.type == "cuda" else " on CPU (not GPU figures)")
    print(f"# klein GPU benchmark: {mode} | {info.get('gpu', device)}", flush=True)
    print(
        f"torch {info['torch']}, diffusers {info['diffusers']}, transformers {info['transformers']}, "
        f"torchao {info['torchao']}"
    )
    report: dict[str, Any] = {"environment": info, "mode": mode, "peak_tflops": args.peak_tflops}
    report["flops"] = {k: v.as_dict(args.peak_tflops) for k, v in flops.items()}
    if args.compare:
        from bench.gpu_compare import compare

        default_work = args.json.with_name(args.json.stem + "-variants") if args.json else None
        work = args.work or default_work or Path(tempfile.mkdtemp(prefix="klein-gpu-"))
        compare(args, flops, report, work)
    else:
        record = run_variant(args, Variant(ENV, {}, args.repeat_prompt), env, scenarios, flops)
        results = [Result(**{k: v for k, v in r.items() if k != "breakdown"}) for r in record["results"]]
        memory = "peak GB (GPU allocated)" if device.type == "cuda" else "peak GB (process RSS)"
        startup = record.get("startup") or {}
        print(f"speed switches: {'; '.join(f'{k}={v}' for k, v in record.get('outcomes', {}).items())}")
        nan = float("nan")
        print(
            f"worker start: ready in {startup.get('ready_s', nan):.1f} s (load {startup.get('load_s', nan):.1f} s);"
            f" with the measured shapes warmed: {record.get('start_s', nan):.1f} s",
            flush=True,
        )
        print(results_table(results, memory), flush=True)
        for r in record["results"]:
            if r.get("breakdown"):
                print(f"{r['key']} breakdown of one call (ms): {r['breakdown']}")
        for error in record["errors"]:
            print(f"ERROR {error}", file=sys.stderr)
        report |= {k: record.get(k) for k in ("settings", "outcomes", "startup", "start_s", "status", "errors")}
        report |= {"speedups": record.get("outcomes"), "results": record["results"]}
    if not args.no_safety:  # the image checker on the same device, its own scenario
        report["safety_checker"] = measure_safety(device)
    if device.type == "cuda" and not args.no_enhancer:  # Qwen3-4B: prefill + 120 tokens, encoding with all layers
        report["prompt_enhancer"] = measure_enhancer(device)
    if args.fp8_error:
        report["fp8_difference"] = measure_fp8_error(args, env, scenarios[0])
        print("FP8 vs bf16 on the same inputs:", json.dumps(report["fp8_difference"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


def measure_safety(device: Any) -> list[dict[str, Any]] | dict[str, str]:
    """bench/safety.py's figures on this device, after the pipeline's scenarios (their memory released): the
    reference checker's shape (ViT-base, random weights) on CUDA; the tiny one on CPU, where `python -m
    bench.safety` is the command (the test suite runs the CPU modes)."""
    from bench.safety import measure, table

    try:
        rows = measure(device, kinds=("vit-base",) if device.type == "cuda" else ("tiny",))
    except Exception as exc:  # the pipeline's figures stand without it
        print(f"ERROR safety checker scenario: {exc!r}", file=sys.stderr)
        return {"error": repr(exc)}
    print(table(rows, device, 1024), flush=True)
    return rows


def measure_enhancer(device: Any) -> dict[str, Any]:
    """bench/enhance.py's real-shape figures on this GPU, after the pipeline's (their memory released): a rewrite
    of 130 prompt + 120 new tokens, and the text encoder's cost per image with the enhancer's whole LM kept. On CPU
    `python -m bench.enhance` is the command (the tiny Qwen3)."""
    from bench.enhance import measure, table

    release()
    try:
        figures = measure(device, real=True, tokens=120, iters=3)
    except Exception as exc:  # the pipeline's figures stand without it
        print(f"ERROR prompt enhancer scenario: {exc!r}", file=sys.stderr)
        return {"error": repr(exc)}
    finally:
        release()
    print(table(figures), flush=True)
    return figures


def measure_fp8_error(args: argparse.Namespace, env: Any, scenario: Scenario) -> dict[str, Any]:
    """On a fresh eager pipeline (every switch off), released afterwards."""
    klein = make_pipeline(args, Variant("baseline", {}).settings(env))
    try:
        return fp8_difference(klein, scenario.width, scenario.height)
    finally:
        klein = None
        release()


if __name__ == "__main__":
    raise SystemExit(main())
