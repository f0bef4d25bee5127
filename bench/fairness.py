"""Fair queueing, measured: a quiet tenant's queue wait with and without a noisy tenant's backlog.

    python -m bench.fairness [--backlog 30] [--samples 5] [--batch-size 1] [--lora]

Starts its own stack (bench/tiny_stack.py): one worker running the tiny pipeline, micro-batching up to
`--batch-size` images per pipeline call, and the API; prints a table. Without fair dispatch a quiet
prediction would wait for the whole backlog ahead of it (backlog × image time). With `--lora` every noisy
prediction carries the same LoRA, which a worker that has it loaded prefers (KLEIN_LORA_AFFINITY_STREAK).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import httpx
import redis

from bench.tiny_stack import tiny_stack


def _submit(api: str, key: str, prompt: str, sync: bool, loras: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    headers = {"apikey": key, "Model": "flux-klein-4b"} | ({"Try-Sync": "true"} if sync else {})
    body = {"input": {"prompt": prompt, "aspect_ratio": "1:1", "output_format": "jpg", "loras": loras or []}}
    answer = httpx.post(f"{api}/v1/predictions", headers=headers, json=body, timeout=300)
    answer.raise_for_status()
    return dict(answer.json())


def _quiet_waits(api: str, key: str, samples: int) -> tuple[list[float], list[float]]:
    """Queue waits and inference times (ms) of `samples` quiet predictions, one after another."""
    waits, inference = [], []
    for i in range(samples):
        done = _submit(api, key, f"quiet {i}", sync=True)
        assert done["status"] == "succeeded", done
        waits.append(done["timings"]["queue_ms"])
        inference.append(done["timings"]["inference_ms"])
    return waits, inference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=30, help="noisy predictions queued (default 30)")
    parser.add_argument("--samples", type=int, default=5, help="quiet predictions per phase (default 5)")
    parser.add_argument("--batch-size", type=int, default=1, help="the worker's KLEIN_BATCH_SIZE (default 1)")
    parser.add_argument("--lora", action="store_true", help="the noisy tenant's predictions all carry one LoRA")
    args = parser.parse_args()

    with tiny_stack("fairness") as stack:
        stack.worker("fairness", KLEIN_BATCH_SIZE=str(args.batch_size))
        api = stack.api()
        quiet, noisy = stack.key(), stack.key(max_in_flight=10_000)
        settings = stack.settings

        idle_waits, inference = _quiet_waits(api, quiet, args.samples)
        loras = None
        if args.lora:
            from bench.lora import adapter

            upload = httpx.post(
                f"{api}/v1/files", headers={"apikey": noisy}, files={"content": ("a.safetensors", adapter(8, 1))}
            )
            loras = [{"path": upload.raise_for_status().json()["url"], "scale": 1.0}]
            _submit(api, noisy, "noisy warm-up", sync=True, loras=loras)  # the worker has it loaded now
        backlog = [_submit(api, noisy, f"noisy {i}", sync=False, loras=loras)["id"] for i in range(args.backlog)]
        if args.lora:  # a few images with nothing more urgent queued: the worker takes the next ones by their LoRA
            time.sleep(3 * statistics.median(inference) / 1000)
        queue_depth = [redis.Redis.from_url(settings.redis_url).scard(f"{settings.queue_name}:queued")]
        busy_waits, _ = _quiet_waits(api, quiet, args.samples)
        queue_depth.append(redis.Redis.from_url(settings.redis_url).scard(f"{settings.queue_name}:queued"))
        ahead = 0  # noisy predictions a worker with their LoRA loaded took before their turn
        for prediction_id in backlog:
            ended = httpx.post(f"{api}/v1/predictions/{prediction_id}/cancel", headers={"apikey": noisy}).json()
            ahead += any("taken ahead of the queue" in line["message"] for line in ended.get("logs", []))

        image_ms = statistics.median(inference)
        rows = [
            ("quiet tenant's queue wait, no backlog (p50 / max)", idle_waits),
            (f"quiet tenant's queue wait, noisy backlog of {args.backlog} (p50 / max)", busy_waits),
        ]
        print("\n| figure | value |\n| --- | --- |")
        for label, waits in rows:
            print(f"| {label} | {statistics.median(waits):.0f} ms / {max(waits):.0f} ms |")
        print(f"| noisy predictions still queued before / after the quiet ones | {queue_depth[0]} / {queue_depth[1]} |")
        print(f"| one image's inference (p50) | {image_ms:.0f} ms |")
        if args.lora:
            print(f"| noisy predictions taken ahead of the queue for their loaded LoRA | {ahead} of {args.backlog} |")
        fifo_ms = queue_depth[0] * image_ms
        print(f"| first-in-first-out wait for the quiet tenant (queued × image time) | ≈ {fifo_ms:.0f} ms |")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
