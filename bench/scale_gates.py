"""Gates for `bench.scale`'s workers: a task waits at named points until the benchmark lets it go, so that each
phase of a prediction runs alone between two readings of the shared services' counters.

A gate is a pair of files in BENCH_SCALE_GATES (`<point>-<k>.at` written by the worker, `<point>-<k>.go` by the
benchmark), not a Redis key or a row: waiting at one must add nothing to what is counted.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path

POLL_S = 0.002


class Gates:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.counts: dict[str, int] = defaultdict(int)
        self.in_task = False  # only tasks wait: a pipeline's warm-up at start passes
        self._lock = threading.Lock()  # the webhook worker's tasks run in threads

    def _next(self, point: str) -> int:
        with self._lock:
            self.counts[point] += 1
            return self.counts[point]

    def reach(self, point: str) -> None:
        """The worker's side: say it is at `point` (its k-th time there) and wait to be let go."""
        if not self.in_task:
            return
        k = self._next(point)
        (self.folder / f"{point}-{k}.at").touch()
        go = self.folder / f"{point}-{k}.go"
        while not go.exists():
            time.sleep(POLL_S)

    def mark(self, point: str) -> None:
        """The worker's side: say it passed `point`, without waiting."""
        (self.folder / f"{point}-{self._next(point)}.at").touch()

    # -- the benchmark's side ---------------------------------------------------------------------------------

    def wait_at(self, point: str, k: int, timeout: float = 120.0) -> None:
        at = self.folder / f"{point}-{k}.at"
        deadline = time.monotonic() + timeout
        while not at.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no worker reached {point} #{k} within {timeout:.0f} s")
            time.sleep(POLL_S)

    def release(self, point: str, k: int) -> None:
        (self.folder / f"{point}-{k}.go").touch()


def from_env() -> Gates:
    folder = os.environ.get("BENCH_SCALE_GATES")
    if not folder:
        raise RuntimeError("BENCH_SCALE_GATES is not set: this worker runs under python -m bench.scale only")
    return Gates(folder)
