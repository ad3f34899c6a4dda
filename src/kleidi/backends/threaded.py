"""A base for backends whose SDK blocks (python-pkcs11, tpm2-pytss, most cloud SDKs).

Their calls run on the backend's own bounded worker pool, never on the event loop, so a slow device
delays neither Status nor any other backend. A thread cannot be cancelled: a call that timed out
keeps its worker until the device answers. So that such calls cannot pile up threads or an endless
queue, at most ``workers + queue`` calls are admitted at once; one beyond that fails at once with
:class:`BackendUnavailable`, and a timed-out call keeps its slot until its thread really returns.
Use one worker where the device serialises anyway (a TPM).

A subclass implements the three blocking methods. Its constructor must not touch the device: the
first :meth:`load_keys` (on a worker) opens what it needs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from abc import abstractmethod
from collections.abc import Callable
from typing import TypeVar

from kleidi.backends.base import Backend, KeySet, KeyVersion
from kleidi.errors import BackendUnavailable

T = TypeVar("T")


class ThreadedBackend(Backend):
    """A :class:`Backend` whose work happens in blocking ``*_blocking`` methods on its own threads."""

    def __init__(self, workers: int = 4, queue: int = 64) -> None:
        if workers < 1 or queue < 0:
            raise ValueError("workers must be at least 1 and queue at least 0")
        self._workers = workers
        self._capacity = workers + queue
        self._admitted = 0
        self._lock = threading.Lock()  # _admitted is released from worker threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    # -- what a subclass implements, all called on a worker thread

    @abstractmethod
    def load_keys_blocking(self, force: bool) -> KeySet:
        """As :meth:`Backend.load_keys`."""

    @abstractmethod
    def wrap_blocking(self, key: KeyVersion, plaintext: bytes, aad: bytes) -> bytes:
        """As :meth:`Backend.wrap`."""

    @abstractmethod
    def unwrap_blocking(self, key: KeyVersion, payload: bytes, aad: bytes) -> bytes:
        """As :meth:`Backend.unwrap`."""

    def close_blocking(self) -> None:
        """Release sessions and handles; called once, on a worker, after every admitted call ended."""

    # -- the Backend interface

    async def load_keys(self, force: bool = False) -> KeySet:
        return await self._run(self.load_keys_blocking, force)

    async def wrap(self, key: KeyVersion, plaintext: bytes, aad: bytes) -> bytes:
        return await self._run(self.wrap_blocking, key, plaintext, aad)

    async def unwrap(self, key: KeyVersion, payload: bytes, aad: bytes) -> bytes:
        return await self._run(self.unwrap_blocking, key, payload, aad)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(pool, self.close_blocking)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def in_flight(self) -> int:
        """Calls admitted and not yet returned by their thread (timed-out ones included)."""
        return self._admitted

    # -- admission and execution

    async def _run(self, func: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise BackendUnavailable(f"the {self.kind} backend is closed")
        with self._lock:
            if self._admitted >= self._capacity:
                raise BackendUnavailable(f"the {self.kind} backend is saturated: {self._admitted} calls are waiting "
                                         f"for the device (at most {self._capacity})",
                                         fix="check the device; calls that timed out still hold their worker "
                                             "until it answers")
            self._admitted += 1
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix=f"kleidi-{self.kind}")
        try:
            future = self._pool.submit(func, *args)
        except RuntimeError:  # the pool was shut down under us
            self._release()
            raise BackendUnavailable(f"the {self.kind} backend is closed") from None
        future.add_done_callback(lambda _: self._release())  # when the thread returns, not when we stop waiting
        return await asyncio.wrap_future(future)

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1
