"""One kleidi instance: backend, key state, the gRPC listener, health and audit; ``run()`` starts
them in order, serves until ``stop()``, and cleans up whatever started."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from kleidi import __version__, audit
from kleidi.backends.base import Backend
from kleidi.errors import ConfigError, KeyringError
from kleidi.hardening import harden_process
from kleidi.registry import create_backend
from kleidi.server.audit_upkeep import close_audit, keep_up, open_audit
from kleidi.server.health import HealthEndpoints
from kleidi.server.listener import KmsListener
from kleidi.server.reload import Reloader
from kleidi.service.keys import KeyManager
from kleidi.settings.model import KleidiSettings
from kleidi.tasks import TaskSet

log = logging.getLogger("kleidi.server")


class Server:
    """One kleidi instance. ``run()`` serves until ``stop()``; SIGHUP (``reload``) re-reads the config."""

    def __init__(self, settings: KleidiSettings, backend: Backend | None = None,
                 reload_settings: Callable[[], KleidiSettings] | None = None, watch: Path | None = None) -> None:
        self.settings = settings
        self.backend = backend if backend is not None else create_backend(settings.backend)
        b = settings.backend
        self.keys = KeyManager(self.backend, b.refresh_interval, b.probe_interval, call_timeout=b.timeout,
                               binds_aad_itself=settings.server.envelope_format >= 2)
        self.listener = KmsListener(settings.server, self.keys)
        self.endpoint = self.listener.endpoint
        self.health = HealthEndpoints(settings.telemetry, self.endpoint, self.keys)
        self.reloader = Reloader(self, reload_settings)
        self.background = TaskSet()  # SIGHUP reloads, closing a swapped-out backend, a second signal's stop
        self._watch = watch if reload_settings is not None else None
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the configuration (if kleidi has a file to re-read) and the keys."""
        self.background.spawn(self.reload_config())

    async def reload_config(self) -> bool:
        """See :meth:`kleidi.server.reload.Reloader.reload`."""
        return await self.reloader.reload()

    async def run(self, install_signal_handlers: bool = True) -> None:
        audit_log = open_audit(self.settings.audit)  # first, so that a backend's start-up login is audited too
        try:
            # A keyring or config problem at start-up stops kleidi; a backend outage does not.
            await self.keys.refresh(fatal=(KeyringError, ConfigError))
            if self.keys.key_set is None:
                log.warning("starting without keys: %s; Status reports unhealthy until the backend answers",
                            self.keys.health.detail)
            server = await self.listener.start()
            try:
                await self.health.start()
            except ConfigError:
                await server.stop(None)
                await self.listener.release()
                raise
        except BaseException:
            self.backend.discard_created()  # a failed first try leaves nothing a second one would reuse
            close_audit(audit_log)
            raise
        audit.note("start", version=__version__, backend=self.backend.kind, endpoint=str(self.endpoint),
                   key_id=self.keys.key_set.current.key_id if self.keys.key_set else None)
        tasks = [asyncio.create_task(self.keys.run(), name="kleidi-key-refresh")]
        if audit_log is not None:
            tasks.append(asyncio.create_task(keep_up(audit_log), name="kleidi-audit-upkeep"))
        if self._watch is not None:
            tasks.append(asyncio.create_task(self.reloader.watch(self._watch), name="kleidi-config-watch"))
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        key_set = self.keys.key_set
        log.info("kleidi %s serving KMS %s on %s (%s)", __version__,
                 "v2 + v1beta1" if self.settings.server.enable_v1beta1 else "v2", self.endpoint,
                 self.backend.describe(),
                 extra={"fields": {"key_id": key_set.current.key_id if key_set else None,
                                   "healthz": self.keys.health.detail}})
        try:
            await self._stop.wait()
            grace = self.settings.server.shutdown_timeout
            log.info("shutting down: finishing in-flight calls (up to %.1fs)", grace)
            if install_signal_handlers:
                # A second signal ends the wait for in-flight calls at once.
                loop.add_signal_handler(signal.SIGTERM, lambda: self.background.spawn(server.stop(0)))
                loop.add_signal_handler(signal.SIGINT, lambda: self.background.spawn(server.stop(0)))
            self.listener.stop_accepting()
            await server.stop(grace)
        finally:
            await self._clean_up(tasks, audit_log)

    async def _clean_up(self, tasks: list[asyncio.Task[None]], audit_log: audit.AuditLog | None) -> None:
        await self.health.stop()
        for task in tasks:
            task.cancel()
        close_audit(audit_log)
        # Each step runs whatever the others did: the socket and private directory must go.
        for step in (lambda: asyncio.gather(*tasks, return_exceptions=True), self.listener.release,
                     self.backend.close):
            try:
                await step()
            except asyncio.CancelledError:
                pass
            except Exception as exc:
                log.error("shutdown: %s", type(exc).__name__)
        log.info("stopped")


def serve(settings: KleidiSettings, reload_settings: Callable[[], KleidiSettings] | None = None,
          watch: Path | None = None) -> None:
    """Build the server and run it until SIGTERM/SIGINT; SIGHUP, or a change to the file ``watch``,
    reloads through ``reload_settings``."""
    harden_process(settings.server.lock_memory)  # after logging is configured, so the result is logged
    with asyncio.Runner(loop_factory=_event_loop_factory(settings.server.event_loop)) as runner:
        runner.run(Server(settings, reload_settings=reload_settings, watch=watch).run())


def _event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop by default: the event loop's own cost per call is a large share of kleidi's (see
    docs/benchmarks.md); ``asyncio`` is the standard library's loop."""
    if name == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop
