"""The backend's key state, kept fresh in the background so that Status never calls the backend."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from kleidi import audit, logs, telemetry
from kleidi.backends.base import Backend, KeySet, KeyVersion
from kleidi.errors import BackendUnavailable, KleidiError

log = logging.getLogger("kleidi.keys")

_PROBE_AAD = b"kleidi health probe"
T = TypeVar("T")


async def round_trip(backend: Backend, key: KeyVersion) -> None:
    """Wrap and unwrap 32 random bytes with ``key``: the one check that the KEK really works.

    :raises KleidiError: the backend failed, or gave back other bytes.
    """
    sample = os.urandom(32)
    payload = await backend.wrap(key, sample, _PROBE_AAD)
    if not hmac.compare_digest(await backend.unwrap(key, payload, _PROBE_AAD), sample):
        raise KleidiError("round trip returned other bytes")


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str
    """"ok", or a short non-secret reason shown in Status healthz and the apiserver's /readyz."""


class KeyManager:
    """Owns the current :class:`KeySet` and the backend's health.

    ``refresh()`` re-reads key versions (cheap when nothing changed); ``probe()`` does a wrap/unwrap
    round trip with a random value. ``run()`` repeats both on their intervals; ``trigger()`` (SIGHUP)
    refreshes at once.
    """

    def __init__(self, backend: Backend, refresh_interval: float, probe_interval: float,
                 call_timeout: float, binds_aad_itself: bool = False) -> None:
        self.backend = backend
        self.binds_aad_itself = binds_aad_itself
        """The envelope binds the authenticated data in kleidi (format 2): no backend needs to."""
        self.refresh_interval = refresh_interval
        self.probe_interval = probe_interval
        self.call_timeout = call_timeout
        self.key_set: KeySet | None = None
        self._refresh_error: str | None = "keys not loaded yet"
        self._probe_error: str | None = "not probed yet"
        self._wake = asyncio.Event()
        self._force = False
        self._probed_generation: object = object()
        self._last_refresh = 0.0
        self._refresh_lock = asyncio.Lock()
        # Read at each scrape, so the gauge can never disagree with what Status says.
        telemetry.HEALTHY.set_function(lambda: 1.0 if self.health.ok else 0.0)

    @property
    def health(self) -> Health:
        """What Status reports: the backend's state, and an audit log that refuses calls (fail_closed)."""
        problem = self._refresh_error or self._probe_error
        if problem is None and audit.fails_closed():
            problem = audit.problem()
        return Health(ok=problem is None, detail=problem or "ok")

    def swap_backend(self, backend: Backend, key_set: KeySet, refresh_interval: float, probe_interval: float,
                     call_timeout: float) -> None:
        """Serve from another, already checked backend from now on (configuration reload)."""
        self.backend, self.key_set = backend, key_set
        self.refresh_interval, self.probe_interval, self.call_timeout = refresh_interval, probe_interval, call_timeout
        self._refresh_error = self._probe_error = None
        self._probed_generation = key_set.generation
        telemetry.set_current_key(key_set.current.key_id)
        self.trigger()

    def trigger(self) -> None:
        """Re-read the keys now, even if the backend reports no change (SIGHUP)."""
        self._force = True
        self._wake.set()

    async def call_backend(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """One use of the backend: timed, counted, bounded by ``call_timeout``. Whatever goes wrong
        ends as a :class:`KleidiError` (a foreign exception, e.g. from a malformed answer, as
        :class:`BackendUnavailable` with a neutral message, its traceback logged)."""
        backend = self.backend
        try:
            with telemetry.backend_call(backend.kind, operation):
                async with asyncio.timeout(self.call_timeout):
                    return await call()
        except KleidiError:
            raise
        except TimeoutError:
            raise BackendUnavailable("backend did not answer in time") from None
        except Exception as exc:
            # The message of a foreign exception may quote what the backend sent: log where, not what.
            log.error("the %s backend failed with an unexpected %s during %s", backend.kind, type(exc).__name__,
                      operation, extra={"fields": {"traceback": logs.frames(exc)}})
            raise BackendUnavailable(f"the {backend.kind} backend failed unexpectedly during {operation} "
                                     f"({type(exc).__name__}); see the kleidi log") from None

    async def refresh(self, fatal: tuple[type[Exception], ...] = (), force: bool = False) -> KeySet | None:
        """Re-read the key set; errors make Status unhealthy but keep the last good keys, except
        those in ``fatal`` (used at start-up), which propagate."""
        backend = self.backend
        try:
            key_set = await self.call_backend("load_keys", lambda: backend.load_keys(force=force))
        except fatal:
            raise
        except KleidiError as exc:
            reason = str(exc)
            if reason != self._refresh_error:
                log.error("cannot load keys from %s: %s", self.backend.describe(), reason)
            self._refresh_error = reason
            return self.key_set
        previous, self.key_set = self.key_set, key_set
        self._last_refresh = time.monotonic()
        recovered = self._refresh_error is not None and previous is not None
        if recovered:
            log.info("keys loaded again from %s", self.backend.describe())
        self._refresh_error = None
        if previous is None or previous.current.key_id != key_set.current.key_id:
            telemetry.set_current_key(key_set.current.key_id)
            if previous is not None:
                telemetry.ROTATIONS.inc()
                audit.note("key_rotation", key_id=key_set.current.key_id, previous_key_id=previous.current.key_id,
                           backend=self.backend.kind)
            log.info("current KEK: key_id %s (version %d)", key_set.current.key_id, key_set.current.version,
                     extra={"fields": {"key_id": key_set.current.key_id,
                                       "previous_key_id": previous.current.key_id if previous else None}})
        unbound = key_set.unbound_aad
        if unbound is not None and not self.binds_aad_itself and (previous is None or previous.unbound_aad != unbound):
            log.warning("%s, which cannot bind associated data: ciphertexts are not bound to their key_id and "
                        "annotations; %sset server.envelope_format: 2", unbound.what,
                        f"{unbound.instead}, or " if unbound.instead else "")
        for key_id in sorted(set(key_set.retired) - set(previous.retired if previous else key_set.retired)):
            audit.note("key_retired", key_id=key_id, backend=self.backend.kind)
        if key_set.generation != self._probed_generation or (recovered and self._probe_error is not None):
            await self.probe()
        return key_set

    async def refresh_soon(self, min_age: float = 1.0) -> KeySet | None:
        """Refresh now unless that happened within ``min_age`` seconds; concurrent callers share one
        refresh. Used when a request names a key_id not seen yet: another node may have rotated first."""
        async with self._refresh_lock:
            if time.monotonic() - self._last_refresh >= min_age:
                await self.refresh()
        return self.key_set

    async def probe(self) -> None:
        key_set = self.key_set
        if key_set is None:
            return
        backend = self.backend
        try:
            await self.call_backend("probe", lambda: round_trip(backend, key_set.current))
        except KleidiError as exc:
            reason = f"health probe failed: {exc}"
            if reason != self._probe_error:
                log.error("%s (%s)", reason, self.backend.describe())
            self._probe_error = reason
            return
        if self._probe_error is not None and self._probe_error != "not probed yet":
            log.info("health probe passes again (%s)", self.backend.describe())
        self._probe_error = None
        self._probed_generation = key_set.generation

    async def run(self) -> None:
        """Refresh and probe forever; cancel to stop. Nothing ends the loop but cancellation: a
        failure of one round is reported (log, Status unhealthy) and the next round tries again."""
        next_probe = time.monotonic() + self.probe_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh_interval):
                    await self._wake.wait()
            self._wake.clear()
            force, self._force = self._force, False
            try:
                await self.refresh(force=force)
                if time.monotonic() >= next_probe:
                    await self.probe()
                    next_probe = time.monotonic() + self.probe_interval
            except Exception as exc:
                reason = f"key refresh failed unexpectedly ({type(exc).__name__}); see the kleidi log"
                if reason != self._refresh_error:
                    log.error("%s", reason, extra={"fields": {
                        "traceback": logs.frames(exc)}})
                self._refresh_error = reason
