"""The gRPC server kube-apiserver calls, on a unix socket in one of two modes.

With caller authentication (the default) gRPC listens inside a private directory and the
:class:`~kleidi.callers.SocketGate` owns the public socket, admitting only allowed peers; without
it, gRPC listens on the public socket itself, whose mode and group kleidi sets."""

from __future__ import annotations

import logging

import grpc

from kleidi import endpoint
from kleidi.callers import CallerPolicy, SocketGate
from kleidi.errors import ConfigError
from kleidi.service.core import EnvelopeService
from kleidi.service.grpc_api import KMSv1beta1Servicer, KMSv2Servicer
from kleidi.service.keys import KeyManager
from kleidi.settings.sections import ServerSettings

log = logging.getLogger("kleidi.server")

_MAX_MESSAGE = 256 * 1024  # the largest legal request (32 KiB annotations + 1 KiB ciphertext) fits many times


class KmsListener:
    """Starts the gRPC server on ``settings.endpoint`` and, on :meth:`release`, removes its socket."""

    def __init__(self, settings: ServerSettings, keys: KeyManager) -> None:
        self.settings = settings
        self.endpoint = endpoint.parse_endpoint(settings.endpoint)
        self.keys = keys
        self.gate: SocketGate | None = None
        self._inode: int | None = None

    async def start(self) -> grpc.aio.Server:
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
            # grpc-core cancels calls queued beyond 1000 before the handler sees them; a burst of
            # Decrypts after an apiserver restart can be larger, and every call here is short.
            ("grpc.server.max_pending_requests", 20000),
            ("grpc.server.max_pending_requests_hard_limit", 60000),
        ])
        settings = self.settings
        if settings.authenticate_callers:
            policy = CallerPolicy.from_settings(settings.allowed_uids, settings.allowed_gids)
            self.gate = SocketGate(self.endpoint, policy, runtime_dir=settings.runtime_dir,
                                   max_refused_connections=settings.max_refused_connections,
                                   refused_timeout=settings.refused_timeout,
                                   refusal_report_interval=settings.refusal_report_interval)
        callers = self.gate.caller if self.gate is not None else None
        envelope_service = EnvelopeService(self.keys, settings.envelope_format)
        v2_servicer = KMSv2Servicer(self.keys, envelope_service, settings.status_version, callers)
        server.add_generic_rpc_handlers((v2_servicer.handler(),))
        if settings.enable_v1beta1:
            server.add_generic_rpc_handlers((KMSv1beta1Servicer(envelope_service, callers).handler(),))
        if self.gate is None:
            endpoint.prepare_path(self.endpoint)
        try:
            if self.gate is not None:
                # gRPC listens inside the gate's private directory; the gate owns the public socket.
                self.gate.prepare()
                await self._bind(server, self.gate.private_address)
                await self.gate.start(settings.socket_mode, settings.socket_group)
                log.info("callers authenticated by SO_PEERCRED: allowed %s; gRPC server behind it on %s",
                         self.gate.policy.describe(), self.gate.private_path)
            else:
                await self._bind(server, self.endpoint.grpc_address)
                self._inode = endpoint.inode_of(self.endpoint)
                endpoint.restrict(self.endpoint, settings.socket_mode, settings.socket_group)
        except BaseException:
            await server.stop(None)
            await self.release()
            raise
        if self.endpoint.abstract_name is not None and self.gate is None:
            log.warning("abstract socket @%s has no file permissions: any process in this network namespace "
                        "can connect", self.endpoint.abstract_name)
        return server

    def stop_accepting(self) -> None:
        """Shutting down: the gate stops admitting new connections (gRPC's own stop does the rest)."""
        if self.gate is not None:
            self.gate.close_listener()

    async def release(self) -> None:
        """Remove the socket (and the gate's private directory), if it is still ours."""
        if self.gate is not None:
            await self.gate.close()
        elif self._inode is not None:
            endpoint.remove(self.endpoint, self._inode)

    async def _bind(self, server: grpc.aio.Server, address: str) -> None:
        with endpoint.owner_only_umask():
            try:
                port = server.add_insecure_port(address)
            except RuntimeError:  # grpcio raises instead of returning 0
                port = 0
            if port == 0:
                raise ConfigError(f"server.endpoint: cannot bind {self.endpoint}",
                                  fix="check that the directory exists and that kleidi's user may write it")
            await server.start()
