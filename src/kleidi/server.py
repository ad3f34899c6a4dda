"""``kleidi serve``: the gRPC server on the unix socket, its lifecycle and its signals."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from kleidi import __version__, audit, endpoint, logs, telemetry
from kleidi._proto.kmsv2 import api_pb2_grpc as v2_grpc
from kleidi.backends.base import Backend, file_stamp
from kleidi.callers import CallerPolicy, SocketGate
from kleidi.config import KleidiSettings
from kleidi.errors import ConfigError, KeyringError, KleidiError
from kleidi.hardening import harden_process
from kleidi.registry import create_backend
from kleidi.service.core import EnvelopeService
from kleidi.service.grpc_api import KMSv1beta1Servicer, KMSv2Servicer
from kleidi.service.keys import KeyManager, round_trip
from kleidi.tasks import TaskSet

log = logging.getLogger("kleidi.server")

_WATCH_INTERVAL = 1.0  # seconds between looks at the config file's stamp (one stat call)
_MAX_MESSAGE = 256 * 1024  # the largest legal request (32 KiB annotations + 1 KiB ciphertext) fits many times


class Server:
    """One kleidi instance: backend, key state, gRPC server. ``run()`` serves until ``stop()``."""

    def __init__(self, settings: KleidiSettings, backend: Backend | None = None,
                 reload_settings: Callable[[], KleidiSettings] | None = None, watch: Path | None = None) -> None:
        self.settings = settings
        self._reload_settings = reload_settings
        self._watch = watch
        self.endpoint = endpoint.parse_endpoint(settings.server.endpoint)
        self.backend = backend if backend is not None else create_backend(settings.backend)
        b = settings.backend
        self.keys = KeyManager(self.backend, b.refresh_interval, b.probe_interval, call_timeout=b.timeout)
        self._stop = asyncio.Event()
        self._background = TaskSet()  # SIGHUP reloads, closing a swapped-out backend, a second signal's stop
        self._reloading = asyncio.Lock()  # SIGHUP and the file watcher never apply two configs at once
        self._inode: int | None = None
        self.gate: SocketGate | None = None

    def stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the configuration (if kleidi has a file to re-read) and the keys."""
        self._background.spawn(self.reload_config())

    async def reload_config(self) -> bool:
        """Apply a new configuration without dropping calls; refuse it, keeping the running one, if it
        is invalid or its backend does not work. Returns whether it was applied. One at a time: a
        SIGHUP during a file-triggered reload waits for it, then reads the file again."""
        async with self._reloading:
            return await self._reload_config()

    async def _reload_config(self) -> bool:
        self.keys.trigger()
        if self._reload_settings is None:
            log.info("SIGHUP: re-reading keys")
            return False
        try:
            new = self._reload_settings()
        except KleidiError as exc:
            log.error("config reload refused; the running configuration stays in force: %s", exc)
            audit.note("config_reload", outcome="refused")
            return False
        if new == self.settings:
            log.info("SIGHUP: configuration unchanged; re-reading keys")
            return True
        # These are bound at start-up (socket, listener, open file): a change needs a restart.
        fixed = [name for name in ("server", "telemetry", "audit")
                 if getattr(new, name) != getattr(self.settings, name)]
        if new.backend != self.settings.backend:
            try:
                backend, key_set = await self._tried_backend(new)
            except (KleidiError, TimeoutError) as exc:
                log.error("config reload refused: the new backend does not work (%s); the running configuration "
                          "stays in force", exc or "no answer in time")
                audit.note("config_reload", outcome="refused")
                return False
            old, self.backend = self.backend, backend
            b = new.backend
            self.keys.swap_backend(backend, key_set, b.refresh_interval, b.probe_interval, b.timeout)
            # Calls already inside the old backend finish with it; close it once they cannot be running.
            asyncio.get_running_loop().call_later(self.settings.server.shutdown_timeout + b.timeout,
                                                  lambda: self._background.spawn(old.close()))
        if new.logging != self.settings.logging:
            logs.configure(new.logging.level, new.logging.format)
        if fixed:
            log.warning("config reload: changes to %s take effect only after a restart", ", ".join(fixed))
        self.settings = new.model_copy(update={name: getattr(self.settings, name) for name in fixed})
        log.info("configuration reloaded (%s)", self.backend.describe())
        audit.note("config_reload", outcome="applied", backend=self.backend.kind)
        return True

    async def _watch_config(self, path: Path) -> None:
        """Reload when the config file changes (an edit, or a ConfigMap's symlink swap), as on SIGHUP."""
        seen = file_stamp(path)
        while True:
            await asyncio.sleep(_WATCH_INTERVAL)
            stamp = file_stamp(path)
            if stamp != seen and stamp is not None:
                seen = stamp
                log.info("config file %s changed: reloading", path)
                await self.reload_config()

    async def _tried_backend(self, settings: KleidiSettings) -> tuple[Backend, Any]:
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

    async def _start_grpc(self) -> grpc.aio.Server:
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
            # grpc-core cancels calls queued beyond 1000 before the handler sees them; a burst of
            # Decrypts after an apiserver restart can be larger, and every call here is short.
            ("grpc.server.max_pending_requests", 20000),
            ("grpc.server.max_pending_requests_hard_limit", 60000),
        ])
        server_settings = self.settings.server
        if server_settings.authenticate_callers:
            policy = CallerPolicy.from_settings(server_settings.allowed_uids, server_settings.allowed_gids)
            self.gate = SocketGate(self.endpoint, policy, runtime_dir=server_settings.runtime_dir,
                                   max_refused_connections=server_settings.max_refused_connections,
                                   refused_timeout=server_settings.refused_timeout,
                                   refusal_report_interval=server_settings.refusal_report_interval)
        callers = self.gate.caller if self.gate is not None else None
        envelope_service = EnvelopeService(self.keys, self.settings.server.envelope_format)
        v2_servicer = KMSv2Servicer(self.keys, envelope_service, server_settings.status_version, callers)
        server.add_generic_rpc_handlers((v2_servicer.handler(),))
        if server_settings.enable_v1beta1:
            server.add_generic_rpc_handlers((KMSv1beta1Servicer(envelope_service, callers).handler(),))
        if self.gate is None:
            endpoint.prepare_path(self.endpoint)
        try:
            if self.gate is not None:
                # gRPC listens inside the gate's private directory; the gate owns the public socket.
                self.gate.prepare()
                await self._bind_grpc(server, self.gate.private_address)
                await self.gate.start(server_settings.socket_mode, server_settings.socket_group)
                log.info("callers authenticated by SO_PEERCRED: allowed %s; gRPC server behind it on %s",
                         self.gate.policy.describe(), self.gate.private_path)
            else:
                await self._bind_grpc(server, self.endpoint.grpc_address)
                self._inode = endpoint.inode_of(self.endpoint)
                endpoint.restrict(self.endpoint, server_settings.socket_mode, server_settings.socket_group)
        except BaseException:
            await server.stop(None)
            await self._release_socket()
            raise
        return server

    async def _release_socket(self) -> None:
        if self.gate is not None:
            await self.gate.close()
        elif self._inode is not None:
            endpoint.remove(self.endpoint, self._inode)

    async def _bind_grpc(self, server: grpc.aio.Server, address: str) -> None:
        with endpoint.owner_only_umask():
            try:
                port = server.add_insecure_port(address)
            except RuntimeError:  # grpcio raises instead of returning 0
                port = 0
            if port == 0:
                raise ConfigError(f"server.endpoint: cannot bind {self.endpoint}",
                                  fix="check that the directory exists and that kleidi's user may write it")
            await server.start()

    async def _live(self) -> tuple[bool, str]:
        """/livez: the gRPC server answers Status on its socket (Status never calls the backend, so a
        backend outage does not make kleidi look dead and get it restarted). Asynchronous: the
        listener runs on the event loop that answers the call."""
        from kleidi._proto.kmsv2 import api_pb2 as v2_pb

        try:
            stub = v2_grpc.KeyManagementServiceStub(self._live_channel)
            await stub.Status(v2_pb.StatusRequest(), timeout=telemetry.LIVE_TIMEOUT)
        except grpc.RpcError as exc:
            return False, f"gRPC server does not answer: {exc.code().name}"
        return True, "ok"

    def _ready(self) -> tuple[bool, str]:
        """/readyz: the backend is usable now, as the background refresh and probe last saw it, and
        the audit log can be written (under fail_open too, where Status stays ok for the apiserver)."""
        health = self.keys.health
        if health.ok and audit.problem() is not None:
            return False, str(audit.problem())
        return health.ok, health.detail

    async def _start_health_server(self) -> telemetry.HealthServer | None:
        settings = self.settings.telemetry
        address = settings.address
        if address is None:
            return None
        try:
            health = telemetry.HealthServer(address, self._live, self._ready, max_connections=settings.max_connections,
                                            request_timeout=settings.request_timeout)
        except OSError as exc:
            raise ConfigError(f"telemetry.address: cannot listen on {address}: {exc.strerror}",
                              fix="choose a free port, or set telemetry.address: null to turn metrics and health "
                              "endpoints off") from None
        # One channel for every /livez probe (a channel per probe costs a connection each), closed in run().
        self._live_channel = grpc.aio.insecure_channel(self.endpoint.grpc_address,
                                                       options=[("grpc.default_authority", "localhost")])
        await health.start()
        log.info("metrics and health on http://%s (/metrics, /livez, /readyz)", address)
        return health

    def _open_audit(self) -> audit.AuditLog | None:
        settings = self.settings.audit
        if settings.path is None:
            return None
        try:
            log_file = audit.AuditLog(settings.path, hmac_key=audit.read_hmac_key(settings.hmac_key_file),
                                      fsync=settings.fsync, max_bytes=settings.max_bytes, keep=settings.keep,
                                      on_failure=settings.on_failure, anchor_path=settings.anchor_path)
        except OSError as exc:
            raise ConfigError(f"audit.path: cannot open {settings.path}: {exc.strerror}",
                              fix="create the directory and let kleidi's user write it") from None
        audit.activate(log_file)
        return log_file

    @staticmethod
    async def _sync_audit(audit_log: audit.AuditLog) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await asyncio.to_thread(audit_log.tick)  # recovery after a failure, fsync, anchor
            except Exception:  # this task is what brings the log back: no one failure may end it
                log.exception("audit log upkeep failed; trying again in a second")

    async def run(self, install_signal_handlers: bool = True) -> None:
        audit_log = self._open_audit()  # first, so that a backend's start-up login is audited too
        try:
            # A keyring or config problem at start-up stops kleidi; a backend outage does not.
            await self.keys.refresh(fatal=(KeyringError, ConfigError))
            if self.keys.key_set is None:
                log.warning("starting without keys: %s; Status reports unhealthy until the backend answers",
                            self.keys.health.detail)
            server = await self._start_grpc()
            try:
                health_server = await self._start_health_server()
            except ConfigError:
                await server.stop(None)
                await self._release_socket()
                raise
        except BaseException:
            self.backend.discard_created()  # a failed first try leaves nothing a second one would reuse
            if audit_log is not None:
                audit.activate(None)
                audit_log.close()
            raise
        audit.note("start", version=__version__, backend=self.backend.kind, endpoint=str(self.endpoint),
                   key_id=self.keys.key_set.current.key_id if self.keys.key_set else None)
        syncer = asyncio.create_task(self._sync_audit(audit_log)) if audit_log else None
        watcher = (asyncio.create_task(self._watch_config(self._watch))
                   if self._watch is not None and self._reload_settings is not None else None)
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.endpoint.abstract_name is not None and self.gate is None:
            log.warning("abstract socket @%s has no file permissions: any process in this network namespace "
                        "can connect", self.endpoint.abstract_name)
        refresher = asyncio.create_task(self.keys.run(), name="kleidi-key-refresh")
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
                loop.add_signal_handler(signal.SIGTERM, lambda: self._background.spawn(server.stop(0)))
                loop.add_signal_handler(signal.SIGINT, lambda: self._background.spawn(server.stop(0)))
            if self.gate is not None:
                self.gate.close_listener()
            await server.stop(grace)
        finally:
            if health_server is not None:
                await health_server.stop()
                await self._live_channel.close()
            for task in (syncer, watcher):
                if task is not None:
                    task.cancel()
            if audit_log is not None:
                audit.activate(None)
                audit_log.close()
            refresher.cancel()
            # Each step runs whatever the others did: the socket and private directory must go.
            for step in (lambda: refresher, self._release_socket, self.backend.close):
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
