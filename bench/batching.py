"""Micro-batching, measured: a worker's images/s draining a queue at batch sizes 1, 2 and 4 (tiny pipeline).

    python -m bench.batching [--images 16] [--size 512] [--sizes 1,2,4]

For each batch size: queue `--images` text-to-image predictions (WaveSpeed's endpoint, `size`×`size`, 4 steps)
with no worker running, start one worker with KLEIN_BATCH_SIZE, and time its work from the first claim to the
last result as PostgreSQL recorded them. The tiny pipeline's arithmetic is small and CPU-bound, so what
batching saves here is per-call overhead; the GPU figure comes from `bench/gpu.py` on a GPU.
"""

from __future__ import annotations

import argparse
import re
import time

import httpx
from sqlalchemy import func, select

from bench.tiny_stack import TinyStack, tiny_stack
from core.db import make_sync_engine
from core.tables import predictions


def drain(stack: TinyStack, api: str, key: str, images: int, size: int, batch_size: int) -> tuple[float, int]:
    """Seconds from first claim to last result for `images` predictions, and the largest batch seen."""
    url = f"{api}/api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image"
    body = {"size": f"{size}*{size}", "output_format": "jpeg"}
    ids = []
    for i in range(images):
        answer = httpx.post(url, headers={"apikey": key}, json=body | {"prompt": f"bench {i}", "seed": i}, timeout=60)
        answer.raise_for_status()
        ids.append(answer.json()["data"]["id"])
    worker = stack.worker(f"batch-{batch_size}", KLEIN_BATCH_SIZE=str(batch_size))
    engine = make_sync_engine(stack.settings)
    query = select(
        func.count().filter(predictions.c.status == "completed"),
        func.min(predictions.c.started_at),
        func.max(predictions.c.completed_at),
    ).where(predictions.c.id.in_(ids))
    deadline = time.monotonic() + 900
    while True:
        with engine.connect() as conn:
            done, first, last = conn.execute(query).one()
        if done == images:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{done} of {images} done after 900 s")
        time.sleep(0.2)
    with engine.connect() as conn:
        logs = conn.execute(select(predictions.c.logs).where(predictions.c.id.in_(ids))).scalars().all()
    engine.dispose()
    worker.stop()
    calls = [
        int(m) for lines in logs for line in lines for m in re.findall(r"one pipeline call for (\d+)", line["message"])
    ]
    return (last - first).total_seconds(), max(calls, default=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="predictions queued per batch size (default 16)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--sizes", default="1,2,4", help="batch sizes to measure (default 1,2,4)")
    args = parser.parse_args()
    sizes = [int(b) for b in args.sizes.split(",")]

    with tiny_stack("batching") as stack:
        api = stack.api()
        key = stack.key(max_in_flight=10_000)
        results = {b: drain(stack, api, key, args.images, args.size, b) for b in sizes}
    baseline = args.images / results[sizes[0]][0]
    print(f"\n{args.images} images of {args.size}², 4 steps, tiny pipeline, one CPU worker\n")
    print("| KLEIN_BATCH_SIZE | largest call seen | seconds | images/s | vs batch size 1 |")
    print("| --- | --- | --- | --- | --- |")
    for b, (seconds, largest) in results.items():
        rate = args.images / seconds
        print(f"| {b} | {largest} | {seconds:.2f} | {rate:.2f} | {rate / baseline:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
