"""api/infra/coalesce.py: concurrent callers share batches, bounded in number and size; failures reach their callers.

The batch function here is a plain coroutine that records its calls (tests/integration/test_pg.py runs the real
statements).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from api.infra.coalesce import Coalescer


class Refused(Exception):
    """What a value PostgreSQL refuses stands for here: retried alone."""


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.running = 0
        self.most_running = 0
        self.release = asyncio.Event()

    async def run(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.wait()
            await asyncio.sleep(0.001)  # a round trip's worth: others run meanwhile
            if -2 in items:
                raise ConnectionError("down")  # the database, for everyone
            if -1 in items:
                raise Refused
            return [item * 10 for item in items]
        finally:
            self.running -= 1


def coalescer(recorder: Recorder, concurrency: int = 2, max_batch: int = 100) -> Coalescer[int, int]:
    return Coalescer(
        recorder.run,
        concurrency=concurrency,
        max_batch=max_batch,
        retry_alone=lambda exc: isinstance(exc, Refused),
    )


def test_a_lone_item_goes_at_once_and_later_ones_wait_for_a_free_batch() -> None:
    async def scenario() -> tuple[Recorder, list[int]]:
        recorder = Recorder()
        batched = coalescer(recorder, concurrency=2)
        first = asyncio.create_task(batched(1))
        await asyncio.sleep(0.01)
        assert recorder.batches == [[1]]  # no timer: it did not wait for company
        second = asyncio.create_task(batched(2))
        await asyncio.sleep(0.01)
        assert recorder.batches == [[1], [2]]  # a second batch was free
        rest = [asyncio.create_task(batched(n)) for n in range(3, 8)]
        await asyncio.sleep(0.01)
        assert recorder.batches == [[1], [2]]  # both busy: the rest wait together
        recorder.release.set()
        results = await asyncio.gather(first, second, *rest)
        return recorder, results

    recorder, results = asyncio.run(scenario())
    assert results == [10, 20, 30, 40, 50, 60, 70]
    assert recorder.batches == [[1], [2], [3, 4, 5, 6, 7]]
    assert recorder.most_running == 2


def test_batches_are_at_most_max_batch_and_at_most_concurrency_run_at_once() -> None:
    async def scenario() -> tuple[Recorder, list[int]]:
        recorder = Recorder()
        batched = coalescer(recorder, concurrency=3, max_batch=4)
        recorder.release.set()
        results = await asyncio.gather(*(batched(n) for n in range(30)))
        return recorder, results

    recorder, results = asyncio.run(scenario())
    assert results == [n * 10 for n in range(30)]
    assert max(len(batch) for batch in recorder.batches) == 4
    assert sorted(item for batch in recorder.batches for item in batch) == list(range(30))
    assert recorder.most_running == 3


def test_a_refused_item_fails_alone_and_any_other_error_fails_its_whole_batch() -> None:
    async def scenario(items: list[int]) -> tuple[Recorder, list[int | BaseException]]:
        recorder = Recorder()
        batched = coalescer(recorder, concurrency=1)
        recorder.release.set()
        return recorder, await asyncio.gather(*(batched(n) for n in items), return_exceptions=True)

    recorder, results = asyncio.run(scenario([1, -1, 2]))
    assert results[0] == 10 and results[2] == 20 and isinstance(results[1], Refused)
    assert recorder.batches == [[1, -1, 2], [1], [-1], [2]]

    # ConnectionError is not retried item by item: every caller of the batch gets it, once.
    recorder, results = asyncio.run(scenario([1, -2, 2]))
    assert all(isinstance(result, ConnectionError) for result in results)
    assert recorder.batches == [[1, -2, 2]]


def test_a_cancelled_caller_leaves_its_batch_and_the_others_answered() -> None:
    async def scenario() -> tuple[Recorder, list[int]]:
        recorder = Recorder()
        batched = coalescer(recorder, concurrency=1)
        tasks = [asyncio.create_task(batched(n)) for n in (1, 2, 3)]
        await asyncio.sleep(0.01)
        tasks[1].cancel()
        recorder.release.set()
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        return recorder, [await tasks[0], await tasks[2]]

    recorder, results = asyncio.run(scenario())
    assert results == [10, 30]
    assert recorder.batches == [[1, 2, 3]]  # the cancelled caller's item was run all the same
