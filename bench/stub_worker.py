"""The platform's Celery worker with only the pipeline replaced: `celery -A bench.stub_worker worker`.

Everything else is the real `worker.app` task (claim, lease, encode, upload to S3, finish, usage record,
slot release, completion event, the sweeper thread). The stub returns a 64×64 image per output at once,
so the benchmark can drain thousands of waiting clients on a CPU in seconds instead of hours of 1 MP
tiny-pipeline renders (≈ 3 s each on 2 cores).

With BENCH_STUB_GATE set (a Redis key), each generation waits until that key exists, as a long render
would: the benchmark holds every client waiting, measures, then opens the gate and times the drain.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import redis
from PIL import Image

import worker.runtime


class StubPipeline:
    """Stands in for models.klein_pipeline.KleinPipeline: a constant 64×64 image per output."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.parameters = 0
        self.startup = SimpleNamespace(load_s=0.0, warmup_s=0.0)  # models.klein_pipeline.StartupTimes' read ones
        self.lora_targets: dict[str, tuple[int, int]] = {}
        self.adapters = SimpleNamespace(use=lambda adapters: 0.0)
        self.language_model = None  # no Qwen3 to rewrite prompts with: the enhancer is off on this worker
        self._gate = os.environ.get("BENCH_STUB_GATE")
        self._redis = redis.Redis.from_url(os.environ["KLEIN_REDIS_URL"]) if self._gate else None

    def generate_batch(
        self,
        batch: Sequence[Any],
        references: Sequence[Any] = (),
        stop_reason: Callable[[], str | None] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> list[list[Image.Image]]:
        while self._redis is not None and self._gate is not None and not self._redis.exists(self._gate):
            reason = stop_reason() if stop_reason is not None else None
            if reason:
                raise _stop_error()(reason)
            time.sleep(0.25)
        return [[Image.new("RGB", (64, 64), (p.seed % 256, 64, 128)) for _ in range(p.num_outputs)] for p in batch]

    def __getattr__(self, name: str) -> Callable[..., None]:
        """Any other method the runtime calls (freeing memory and the like) does nothing here."""
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def _stop_error() -> type[Exception]:
    from models import klein_pipeline

    stop: type[Exception] = getattr(klein_pipeline, "Stop", RuntimeError)
    return stop


if not hasattr(worker.runtime, "KleinPipeline"):
    raise RuntimeError("bench.stub_worker: worker.runtime no longer uses KleinPipeline; update the stub")
worker.runtime.KleinPipeline = StubPipeline  # type: ignore[misc,assignment]

from worker.app import app  # noqa: E402 - after the stub is in place

__all__ = ["StubPipeline", "app"]
