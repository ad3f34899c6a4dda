"""A real kleidi server whose backend is slow to unwrap: for testing graceful shutdown.

Usage: slow_server.py CONFIG_PATH

The local backend's ``unwrap`` sleeps ``SLOW_SERVER_UNWRAP_DELAY`` seconds (default 1.5) for every
call except kleidi's own health probe, so start-up and the background probes stay fast. Before it
sleeps it creates ``<CONFIG_PATH>.unwrapping``, so a test knows the call has reached the backend.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from kleidi import logs
from kleidi.backends.base import KeyVersion
from kleidi.backends.local import LocalBackend, LocalBackendSettings
from kleidi.config import load_settings
from kleidi.server import Server
from kleidi.service.keys import _PROBE_AAD


class SlowBackend(LocalBackend):
    def __init__(self, settings: LocalBackendSettings, marker: Path, delay: float) -> None:
        super().__init__(settings)
        self._marker = marker
        self._delay = delay

    async def unwrap(self, key: KeyVersion, payload: bytes, aad: bytes) -> bytes:
        if aad != _PROBE_AAD:
            self._marker.touch()
            await asyncio.sleep(self._delay)
        return await super().unwrap(key, payload, aad)


def main() -> None:
    config_path = Path(sys.argv[1])
    settings = load_settings(config_path)
    logs.configure(settings.logging.level, settings.logging.format)
    delay = float(os.environ.get("SLOW_SERVER_UNWRAP_DELAY", "1.5"))
    marker = config_path.with_name(config_path.name + ".unwrapping")
    backend = SlowBackend(settings.backend, marker, delay)
    asyncio.run(Server(settings, backend=backend, reload_settings=lambda: load_settings(config_path)).run())


if __name__ == "__main__":
    main()
