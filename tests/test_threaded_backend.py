"""kleidi.backends.threaded: a blocking SDK's calls run on the backend's own bounded pool.

The "device" here is a gate the test opens and closes (a threading.Event): what matters is what
the base does while a real SDK would block, which no real device here can be made to do on cue.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from kleidi.backends.base import KeySet, KeyVersion
from kleidi.backends.threaded import ThreadedBackend
from kleidi.errors import BackendUnavailable

KEY = KeyVersion("kleidi:test:v1:" + "A" * 32, 1)


class GatedDevice(ThreadedBackend):
    kind = "gated"

    def __init__(self, workers: int = 1, queue: int = 2) -> None:
        super().__init__(workers, queue)
        self.open = threading.Event()
        self.open.set()
        self.threads: list[str] = []
        self.closed = 0

    def load_keys_blocking(self, force: bool) -> KeySet:
        self.open.wait()
        self.threads.append(threading.current_thread().name)
        return KeySet(current=KEY, usable={KEY.key_id: KEY}, generation=1)

    def wrap_blocking(self, key: KeyVersion, plaintext: bytes, aad: bytes) -> bytes:
        self.open.wait()
        self.threads.append(threading.current_thread().name)
        return plaintext[::-1] + aad

    def unwrap_blocking(self, key: KeyVersion, payload: bytes, aad: bytes) -> bytes:
        self.open.wait()
        return payload[: len(payload) - len(aad)][::-1]

    def close_blocking(self) -> None:
        self.closed += 1


def _kleidi_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kleidi-gated")]


def test_construction_starts_no_thread_and_calls_run_off_the_event_loop() -> None:
    device = GatedDevice()
    assert _kleidi_threads() == []  # nothing happens until the first call

    async def scenario() -> bytes:
        await device.load_keys()
        sealed = await device.wrap(KEY, b"seed", b"aad")
        plain = await device.unwrap(KEY, sealed, b"aad")
        await device.close()
        return plain

    assert asyncio.run(scenario()) == b"seed"
    assert device.threads and all(name.startswith("kleidi-gated") for name in device.threads)
    assert threading.main_thread().name not in device.threads


def test_a_blocked_device_leaves_the_event_loop_free_and_refuses_calls_beyond_its_bound() -> None:
    device = GatedDevice(workers=1, queue=2)
    device.open.clear()

    async def scenario() -> dict[str, Any]:
        stuck = [asyncio.create_task(device.wrap(KEY, b"s", b"a")) for _ in range(3)]  # 1 running, 2 queued
        while device.in_flight < 3:
            await asyncio.sleep(0.01)
        loop_ticks = 0
        for _ in range(20):  # the loop keeps running other work while the device blocks
            await asyncio.sleep(0)
            loop_ticks += 1
        with pytest.raises(BackendUnavailable) as refused:
            await device.wrap(KEY, b"s", b"a")  # the fourth: refused at once, not queued
        threads_while_stuck = len(_kleidi_threads())
        device.open.set()
        results = await asyncio.gather(*stuck)
        await device.close()
        return {"ticks": loop_ticks, "refused": refused.value, "threads": threads_while_stuck, "results": results}

    outcome = asyncio.run(scenario())
    assert outcome["ticks"] == 20
    assert "saturated" in outcome["refused"].message and outcome["refused"].fix
    assert outcome["threads"] == 1  # one worker, however many callers
    assert outcome["results"] == [b"sa"] * 3


def test_timed_out_calls_keep_their_slot_until_the_device_answers_then_it_recovers() -> None:
    device = GatedDevice(workers=1, queue=1)  # at most two calls admitted
    device.open.clear()

    async def scenario() -> tuple[int, int, bytes]:
        for _ in range(2):  # the first sticks in the device; the second waits behind it and is cancelled
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await device.wrap(KEY, b"s", b"a")
        held = device.in_flight  # the stuck thread keeps its slot: threads cannot pile up
        queued = asyncio.create_task(device.wrap(KEY, b"q", b""))
        while device.in_flight < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(BackendUnavailable, match="saturated"):
            await device.wrap(KEY, b"s", b"a")
        device.open.set()  # the device answers again: everything drains, and new calls work
        assert await queued == b"q"
        while device.in_flight:
            await asyncio.sleep(0.01)
        answer = await device.wrap(KEY, b"ok", b"")
        await device.close()
        return held, device.in_flight, answer

    held, after, answer = asyncio.run(scenario())
    assert (held, after, answer) == (1, 0, b"ko")


def test_close_is_idempotent_and_later_calls_are_unavailable() -> None:
    device = GatedDevice()

    async def scenario() -> None:
        await device.load_keys()
        await device.close()
        await device.close()
        with pytest.raises(BackendUnavailable, match="closed"):
            await device.load_keys()

    asyncio.run(scenario())
    assert device.closed == 1
    assert _kleidi_threads() == [] or all(not t.is_alive() for t in threading.enumerate()
                                          if t.name.startswith("kleidi-gated"))


def test_bounds_must_make_sense() -> None:
    with pytest.raises(ValueError):
        GatedDevice(workers=0)
