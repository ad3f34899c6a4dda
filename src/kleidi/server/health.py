"""/livez and /readyz, answered on the telemetry listener (beside /metrics)."""

from __future__ import annotations

import logging

import grpc

from kleidi import audit, telemetry
from kleidi._proto.kmsv2 import api_pb2_grpc as v2_grpc
from kleidi.endpoint import Endpoint
from kleidi.errors import ConfigError
from kleidi.service.keys import KeyManager
from kleidi.settings.sections import TelemetrySettings

log = logging.getLogger("kleidi.server")


class HealthEndpoints:
    """Serves /metrics, /livez and /readyz on ``settings.address`` (nothing if it is null)."""

    def __init__(self, settings: TelemetrySettings, endpoint: Endpoint, keys: KeyManager) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.keys = keys
        self._server: telemetry.HealthServer | None = None
        self._live_channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        address = self.settings.address
        if address is None:
            return
        try:
            server = telemetry.HealthServer(address, self.live, self.ready,
                                            max_connections=self.settings.max_connections,
                                            request_timeout=self.settings.request_timeout)
        except OSError as exc:
            raise ConfigError(f"telemetry.address: cannot listen on {address}: {exc.strerror}",
                              fix="choose a free port, or set telemetry.address: null to turn metrics and health "
                              "endpoints off") from None
        # One channel for every /livez probe (a channel per probe costs a connection each).
        self._live_channel = grpc.aio.insecure_channel(self.endpoint.grpc_address,
                                                       options=[("grpc.default_authority", "localhost")])
        await server.start()
        self._server = server
        log.info("metrics and health on http://%s (/metrics, /livez, /readyz)", address)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop()
        channel, self._live_channel = self._live_channel, None
        if channel is not None:
            await channel.close()

    async def live(self) -> tuple[bool, str]:
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

    def ready(self) -> tuple[bool, str]:
        """/readyz: the backend is usable now, as the background refresh and probe last saw it, and
        the audit log can be written (under fail_open too, where Status stays ok for the apiserver)."""
        health = self.keys.health
        if health.ok and audit.problem() is not None:
            return False, str(audit.problem())
        return health.ok, health.detail
