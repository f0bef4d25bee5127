"""Batch jobs beside interactive work, measured (docs/batch.md).

    python -m bench.batch [--lines 500] [--samples 30]

Starts its own stack (bench/tiny_stack.py): one worker on the tiny pipeline and the API. Three phases, every
image 256×256 at 1 step with 64 prompt tokens: an interactive tenant submitting one prediction after another (the
images API, which answers when the image is done) on an idle platform; the same while a batch of `--lines` lines
(OpenAI's Batch API, the official `openai` client) waits beside it; the batch alone on the idle platform, for its
images/s. Prints the interactive queue waits (p50 / p99) side by side with one image's time: the batch may add
at most the image already running to an interactive wait.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import httpx
import openai

from bench.common import summarize
from bench.tiny_stack import tiny_stack

# As small as the images API takes: the figure is the scheduling, not the model's speed.
SIZE = {"size": "256x256", "num_inference_steps": 1, "max_sequence_length": 64}


def _lines(count: int, tag: str) -> bytes:
    body = [
        {
            "custom_id": f"{tag}-{i}",
            "method": "POST",
            "url": "/v1/images/generations",
            "body": {"prompt": f"{tag} {i}"} | SIZE,
        }
        for i in range(count)
    ]
    return "".join(json.dumps(line) + "\n" for line in body).encode()


def _batch(client: openai.OpenAI, count: int, tag: str) -> Any:
    uploaded = client.files.create(file=(f"{tag}.jsonl", _lines(count, tag)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window="24h")


def _ended(client: openai.OpenAI, batch_id: str) -> Any:
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "cancelled", "expired", "failed"):
        time.sleep(0.2)
    return batch


def _interactive(api: str, key: str, samples: int) -> tuple[list[float], list[float]]:
    """Queue waits and run times (ms) of `samples` interactive predictions, each submitted as the last ends."""
    waits, runs = [], []
    with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {key}"}) as http:
        for i in range(samples):  # the images API answers once the image is done
            body = {"prompt": f"interactive {i}"} | SIZE
            done = http.post(f"{api}/v1/images/generations", json=body).raise_for_status().json()
            waits.append(done["timings"]["queue_ms"])
            runs.append(done["timings"]["total_ms"] - done["timings"]["queue_ms"])
    return waits, runs


def _p(values: list[float]) -> str:
    s = summarize(values)
    return f"{s['p50_ms']:.0f} ms / {s['p99_ms']:.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=500, help="lines of each batch (default 500)")
    parser.add_argument("--samples", type=int, default=30, help="interactive predictions per phase (default 30)")
    args = parser.parse_args()

    with tiny_stack("batch", KLEIN_DEFAULT_RATE_LIMIT_PER_MINUTE="100000") as stack:  # it polls
        stack.worker("batch")
        api = stack.api()
        interactive_key, batch_key = stack.key(), stack.key()
        client = openai.OpenAI(api_key=batch_key, base_url=f"{api}/v1", max_retries=0, timeout=120)
        _interactive(api, interactive_key, 3)  # warm-up: the prompt cache, the connections

        alone, runs = _interactive(api, interactive_key, args.samples)
        beside_batch = _batch(client, args.lines, "beside")
        beside, _ = _interactive(api, interactive_key, args.samples)
        during = client.batches.retrieve(beside_batch.id).request_counts
        client.batches.cancel(beside_batch.id)
        _ended(client, beside_batch.id)

        started = time.perf_counter()
        idle_batch = _batch(client, args.lines, "idle")
        final = _ended(client, idle_batch.id)
        seconds = time.perf_counter() - started
        assert final.request_counts is not None and final.request_counts.completed == args.lines, final

        image_ms = statistics.median(runs)
        shape = f"{args.samples} interactive predictions, batches of {args.lines} lines, 256×256, 1 step"
        print(f"\n| figure ({shape}) | value |")
        print("| --- | --- |")
        print(f"| interactive queue wait, platform otherwise idle (p50 / p99) | {_p(alone)} |")
        print(f"| interactive queue wait, a batch queued beside it (p50 / p99) | {_p(beside)} |")
        print(f"| one interactive image's run, claim to finish (p50) | {image_ms:.0f} ms |")
        done = during.completed if during is not None else 0
        print(f"| the batch's lines done while the interactive ones ran | {done} of {args.lines} |")
        print(f"| the batch alone on the idle platform | {args.lines / seconds:.1f} images/s ({seconds:.1f} s) |")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
