"""Reloading a running server's configuration, on SIGHUP or when its config file changes.

A new configuration is applied without dropping calls, or refused (keeping the running one) if it
is invalid or its backend does not work. One reload at a time: SIGHUP and the file watcher could
otherwise apply two backends in either order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kleidi import audit, logs
from kleidi.backends.base import Backend, file_stamp
from kleidi.errors import KleidiError
from kleidi.registry import create_backend
from kleidi.service.keys import round_trip
from kleidi.settings.model import KleidiSettings

if TYPE_CHECKING:
    from kleidi.server.instance import Server

log = logging.getLogger("kleidi.server")

WATCH_INTERVAL = 1.0  # seconds between looks at the config file's stamp (one stat call)
RESTART_ONLY = ("server", "telemetry", "audit")  # bound at start-up (socket, listener, open file)


class Reloader:
    """Applies new settings from ``load`` to ``server`` (its settings, backend and key manager)."""

    def __init__(self, server: Server, load: Callable[[], KleidiSettings] | None) -> None:
        self.server = server
        self.load = load
        self._lock = asyncio.Lock()

    async def reload(self) -> bool:
        """Re-read the keys and, if there is a config to re-read, apply it. Returns whether a
        configuration was applied. A reload during another waits for it, then reads the file again."""
        async with self._lock:
            return await self._reload()

    async def _reload(self) -> bool:
        server = self.server
        server.keys.trigger()
        if self.load is None:
            log.info("SIGHUP: re-reading keys")
            return False
        try:
            new = self.load()
        except KleidiError as exc:
            log.error("config reload refused; the running configuration stays in force: %s", exc)
            audit.note("config_reload", outcome="refused")
            return False
        old_settings = server.settings
        if new == old_settings:
            log.info("SIGHUP: configuration unchanged; re-reading keys")
            return True
        fixed = [name for name in RESTART_ONLY if getattr(new, name) != getattr(old_settings, name)]
        if new.backend != old_settings.backend:
            try:
                backend, key_set = await self.tried_backend(new)
            except (KleidiError, TimeoutError) as exc:
                log.error("config reload refused: the new backend does not work (%s); the running configuration "
                          "stays in force", exc or "no answer in time")
                audit.note("config_reload", outcome="refused")
                return False
            old, server.backend = server.backend, backend
            b = new.backend
            server.keys.swap_backend(backend, key_set, b.refresh_interval, b.probe_interval, b.timeout)
            # Calls already inside the old backend finish with it; close it once they cannot be running.
            asyncio.get_running_loop().call_later(old_settings.server.shutdown_timeout + b.timeout,
                                                  lambda: server.background.spawn(old.close()))
        if new.logging != old_settings.logging:
            logs.configure(new.logging.level, new.logging.format)
        if fixed:
            log.warning("config reload: changes to %s take effect only after a restart", ", ".join(fixed))
        server.settings = new.model_copy(update={name: getattr(old_settings, name) for name in fixed})
        log.info("configuration reloaded (%s)", server.backend.describe())
        audit.note("config_reload", outcome="applied", backend=server.backend.kind)
        return True

    async def tried_backend(self, settings: KleidiSettings) -> tuple[Backend, Any]:
        """A backend for ``settings`` that has loaded its keys and done one round trip."""
        backend = create_backend(settings.backend)
        try:
            async with asyncio.timeout(settings.backend.timeout * 3):
                key_set = await backend.load_keys()
                await round_trip(backend, key_set.current)
        except BaseException:
            await backend.close()
            backend.discard_created()
            raise
        return backend, key_set

    async def watch(self, path: Path) -> None:
        """Reload when the config file changes (an edit, or a ConfigMap's symlink swap), as on SIGHUP."""
        seen = file_stamp(path)
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            stamp = file_stamp(path)
            if stamp != seen and stamp is not None:
                seen = stamp
                log.info("config file %s changed: reloading", path)
                await self.reload()
