"""The conformance tests every kleidi backend passes, for its own test module to subclass.

Like keyring's backend tests: a backend's test module defines a class that inherits
:class:`BackendConformance` (and :class:`OutageConformance` if the backend can be cut off) and
supplies, as methods, how to make a backend on fresh key material and how to rotate, retire and
(for outages) interrupt it. pytest then runs every test below against that backend. The tests call
the backend directly, on its own event loop, as the key manager does; the plugin-level suite
(tests/conformance) drives the whole plugin over its socket.

Requires pytest (the ``test`` extra).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

import pytest

from kleidi.backends.base import MAX_PLAINTEXT_SIZE, Backend, KeySet, KeyVersion
from kleidi.errors import BackendUnavailable, DecryptionFailed, RetiredKey

AAD = b"kleidi conformance aad"


class BackendConformance:
    """Subclass in a test module (``class TestMyBackend(BackendConformance): ...``) and implement:"""

    def make_backend(self) -> Backend:
        """A backend on key material of its own: each call in one test shares that material (a second
        instance), and each test starts from new material."""
        raise NotImplementedError

    def rotate(self) -> None:
        """Add a key version and make it current, as an operator would (not through the backend)."""
        raise NotImplementedError

    def retire(self, version: int) -> None:
        """Make ``version`` unable to unwrap, as an operator would."""
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    async def _keys(backend: Backend, force: bool = True) -> KeySet:
        return await backend.load_keys(force=force)

    @staticmethod
    async def _round_trip(backend: Backend, key: KeyVersion, seed: bytes, aad: bytes = AAD) -> bytes:
        return await backend.unwrap(key, await backend.wrap(key, seed, aad), aad)

    def _using(self, scenario: Callable[..., Awaitable[None]], count: int = 1) -> None:
        """Run ``scenario(backend, ...)`` on one event loop, with ``count`` instances made and closed
        on it (a backend's connections belong to the loop that made them)."""

        async def main() -> None:
            backends = [self.make_backend() for _ in range(count)]
            try:
                await scenario(*backends)
            finally:
                for backend in backends:
                    await backend.close()

        asyncio.run(main())

    # -- the tests ----------------------------------------------------------------------------

    def test_round_trip_at_every_size_up_to_the_largest_seed(self) -> None:
        async def scenario(backend: Backend) -> None:
            key = (await self._keys(backend)).current
            for size in (1, 32, MAX_PLAINTEXT_SIZE):
                seed = os.urandom(size)
                assert await self._round_trip(backend, key, seed) == seed

        self._using(scenario)

    def test_tampered_truncated_and_rebound_payloads_fail_as_decryption_failed(self) -> None:
        async def scenario(backend: Backend) -> None:
            key = (await self._keys(backend)).current
            payload = await backend.wrap(key, os.urandom(32), AAD)
            changed = [bytes([payload[0] ^ 1]) + payload[1:], payload[:-1] + bytes([payload[-1] ^ 1]),
                       payload[: len(payload) // 2], payload[:1]]
            for bad in changed:
                with pytest.raises(DecryptionFailed):
                    await backend.unwrap(key, bad, AAD)
            with pytest.raises(DecryptionFailed):
                await backend.unwrap(key, payload, AAD + b"x")  # other key_id, annotations or protocol

        self._using(scenario)

    def test_a_payload_presented_under_another_version_fails(self) -> None:
        async def scenario(backend: Backend) -> None:
            first = (await self._keys(backend)).current
            payload = await backend.wrap(first, os.urandom(32), AAD)
            self.rotate()
            second = (await self._keys(backend)).current
            assert second.version != first.version and second.key_id != first.key_id
            with pytest.raises(DecryptionFailed):
                await backend.unwrap(second, payload, AAD)

        self._using(scenario)

    def test_rotation_keeps_old_versions_decrypting_until_retired(self) -> None:
        async def scenario(backend: Backend) -> None:
            first = (await self._keys(backend)).current
            seed = os.urandom(32)
            payload = await backend.wrap(first, seed, AAD)
            self.rotate()
            keys = await self._keys(backend)
            assert keys.current.key_id != first.key_id and first.key_id in keys.usable
            assert await backend.unwrap(keys.usable[first.key_id], payload, AAD) == seed
            self.retire(first.version)
            keys = await self._keys(backend)
            assert first.key_id in keys.retired and first.key_id not in keys.usable
            with pytest.raises(RetiredKey):
                await backend.unwrap(first, payload, AAD)

        self._using(scenario)

    def test_a_second_instance_reports_the_same_key_ids_and_decrypts_the_first_ones_ciphertexts(self) -> None:
        async def scenario(first: Backend, second: Backend) -> None:
            one, two = await self._keys(first), await self._keys(second)
            assert one.current.key_id == two.current.key_id
            assert set(one.usable) == set(two.usable)
            seed = os.urandom(32)
            payload = await first.wrap(one.current, seed, AAD)
            assert await second.unwrap(two.current, payload, AAD) == seed

        self._using(scenario, 2)

    def test_hundreds_of_concurrent_calls_are_all_correct(self) -> None:
        async def scenario(backend: Backend) -> None:
            key = (await self._keys(backend)).current
            seeds = [os.urandom(32) for _ in range(300)]
            aads = [AAD + str(i).encode() for i in range(len(seeds))]
            payloads = await asyncio.gather(*(backend.wrap(key, s, a) for s, a in zip(seeds, aads, strict=True)))
            plains = await asyncio.gather(*(backend.unwrap(key, p, a) for p, a in zip(payloads, aads,
                                                                                      strict=True)))
            assert plains == seeds

        self._using(scenario)

    def test_close_is_idempotent(self) -> None:
        async def scenario(backend: Backend) -> None:
            await self._keys(backend)
            await backend.close()
            await backend.close()

        self._using(scenario)  # and closed a third time by _using

    def test_no_seed_reaches_a_log(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG)
        seed = os.urandom(32)
        async def scenario(backend: Backend) -> None:
            key = (await self._keys(backend)).current
            payload = await backend.wrap(key, seed, AAD)
            assert await backend.unwrap(key, payload, AAD) == seed
            with contextlib.suppress(DecryptionFailed):
                await backend.unwrap(key, payload, AAD + b"x")

        self._using(scenario)
        forms = {seed.hex(), seed.hex().upper(), repr(seed)[2:-1]}
        forms |= {base64.b64encode(seed).decode(), base64.urlsafe_b64encode(seed).decode().rstrip("=")}
        for record in caplog.records:
            text = record.getMessage() + str(getattr(record, "fields", ""))
            assert not any(form in text for form in forms), record.getMessage()


class OutageConformance:
    """For backends that can be cut off (a server, a device): implement :meth:`outage`."""

    def make_backend(self) -> Backend:
        raise NotImplementedError

    def outage(self) -> contextlib.AbstractContextManager[None]:
        """While inside, the backend cannot be reached; on exit it is back, with its key material."""
        raise NotImplementedError

    def test_an_outage_is_unavailable_and_the_backend_recovers_by_itself(self) -> None:
        async def call(backend: Backend, key: KeyVersion, seed: bytes) -> bytes:
            return await backend.unwrap(key, await backend.wrap(key, seed, AAD), AAD)

        async def main() -> None:
            backend = self.make_backend()
            try:
                key = (await backend.load_keys(force=True)).current
                seed = os.urandom(32)
                assert await call(backend, key, seed) == seed
                with self.outage():
                    with pytest.raises(BackendUnavailable):
                        await asyncio.wait_for(call(backend, key, os.urandom(32)), 30)
                    with pytest.raises(BackendUnavailable):
                        await asyncio.wait_for(backend.load_keys(force=True), 30)
                for _ in range(150):  # back: the next calls work, without a restart or a new instance
                    try:
                        assert await call(backend, key, seed) == seed
                        break
                    except BackendUnavailable:
                        await asyncio.sleep(0.2)
                else:
                    raise AssertionError("the backend did not recover by itself")
            finally:
                await backend.close()

        asyncio.run(main())
