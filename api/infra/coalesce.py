"""Concurrent requests' single-row statements, run together as one.

Each request's own statement costs the API a round trip on a pooled connection (a write, a read, the
task's wake-up and asyncpg's protocol work) and PostgreSQL a statement, and for an insert a commit that
waits for the disk. Under load many requests wait on such a statement at once: a `Coalescer` runs what
accumulated while its previous batches were under way as one statement over arrays (api/infra/pg.py), so
those costs are paid once per batch (docs/performance.md). An item that finds a batch free starts one
in the same event-loop pass: no timer, nothing added to a request's latency at low load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """`await coalescer(item)` is `(await run([item]))[0]`, with the items of concurrent callers sharing a
    call of `run`. `run` answers one result per item, in order.

    At most `concurrency` calls of `run` are under way, each with at most `max_batch` items. When a batch
    fails with an error that `retry_alone` says one item may have caused (a value PostgreSQL refuses), each
    of its items runs again alone, so a bad item fails only its own caller; any other error (the database
    is down) fails every caller of the batch at once. A caller that is cancelled stops waiting; its batch
    goes on (its statement may already have run)."""

    def __init__(
        self,
        run: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]],
        *,
        concurrency: int,
        max_batch: int,
        retry_alone: Callable[[Exception], bool],
    ) -> None:
        self._run = run
        self._retry_alone = retry_alone
        self._concurrency = concurrency
        self._max_batch = max_batch
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._running = 0  # batches started, their task scheduled or under way
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    async def __call__(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        # One batch at a time waits to start: it takes what is waiting when it starts, so every item that
        # arrives in the same event-loop pass goes with it.
        if self._running < self._concurrency and len(self._waiting) == 1:
            self._start()
        return await future

    def _start(self) -> None:
        self._running += 1
        task = asyncio.get_running_loop().create_task(self._batch())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _batch(self) -> None:
        batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
        if self._waiting and self._running < self._concurrency:
            self._start()  # more than one batch's worth was waiting
        try:
            if batch:
                await self._settle(batch)
        finally:
            self._running -= 1
            if self._waiting and self._running < self._concurrency:
                self._start()

    async def _settle(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
        except Exception as exc:
            if len(batch) > 1 and self._retry_alone(exc):
                await asyncio.gather(*(self._settle([one]) for one in batch))
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            return
        except BaseException:  # the loop is shutting down: nobody will answer these callers
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # its caller may have been cancelled
                future.set_result(result)
