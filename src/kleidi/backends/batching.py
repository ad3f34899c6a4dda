"""Coalescing calls into batches when a backend is busy, with no wait when it is not.

A remote KEK service spends most of each request on things other than the cryptography: HTTP,
JSON, the token lookup, the policy check, its own log. When many seeds must be wrapped or
unwrapped at once (an apiserver restart decrypting every DEK seed, a benchmark at concurrency 64),
one request carrying many items costs the service far less than as many requests.

:class:`Coalescer` sends each call at once while fewer than ``max_in_flight`` requests are out, so a
lone call waits for nothing. Calls that arrive while ``max_in_flight`` requests are out queue up;
as soon as one of those requests returns, everything queued (up to ``max_batch``) leaves together.
There is no timer and no added latency: batches form only from calls that would have waited anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from kleidi.tasks import TaskSet

Item = TypeVar("Item")
Result = TypeVar("Result")

SendBatch = Callable[[Sequence[Item]], Awaitable[Sequence[Result | BaseException]]]
"""Sends the items in one request; returns one result or exception per item, in order."""


class Coalescer(Generic[Item, Result]):
    def __init__(self, send: SendBatch[Item, Result], max_in_flight: int, max_batch: int = 128) -> None:
        self._send = send
        self.max_in_flight = max_in_flight
        self.max_batch = max_batch
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._in_flight = 0
        self._tasks = TaskSet()

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._dispatch()
        return await future  # a cancelled caller leaves its item in the batch; its result is dropped

    def _dispatch(self) -> None:
        while self._queue and self._in_flight < self.max_in_flight:
            batch = [entry for entry in self._queue[:self.max_batch] if not entry[1].done()]
            del self._queue[:self.max_batch]
            if not batch:
                continue
            self._in_flight += 1
            self._tasks.spawn(self._run(batch))

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._send([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} answered with {len(results)} results")
        except BaseException as exc:  # the whole request failed: every caller in it gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._dispatch()
