"""gRPC servicers for KMS v2 and v1beta1: decode, call :class:`EnvelopeService`, map errors."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc

from kleidi import __version__, audit, telemetry
from kleidi._proto.kmsv1beta1 import api_pb2 as v1_pb
from kleidi._proto.kmsv1beta1 import api_pb2_grpc as v1_grpc
from kleidi._proto.kmsv2 import api_pb2 as v2_pb
from kleidi._proto.kmsv2 import api_pb2_grpc as v2_grpc
from kleidi.callers import PeerCredentials
from kleidi.errors import (
    AuditUnavailable,
    BackendUnavailable,
    ConfigError,
    DecryptionFailed,
    InvalidRequest,
    KeyringError,
    KleidiError,
    RetiredKey,
    UnknownKey,
)
from kleidi.service.core import V1BETA1, EnvelopeService
from kleidi.service.keys import KeyManager

log = logging.getLogger("kleidi.grpc")

GRPC_CODES: dict[type[KleidiError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    DecryptionFailed: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownKey: grpc.StatusCode.NOT_FOUND,
    RetiredKey: grpc.StatusCode.FAILED_PRECONDITION,
    BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    AuditUnavailable: grpc.StatusCode.UNAVAILABLE,
    KeyringError: grpc.StatusCode.UNAVAILABLE,
    ConfigError: grpc.StatusCode.UNAVAILABLE,  # at run time: e.g. a credential file went missing
}
"""The one table from kleidi errors to gRPC status codes; anything else is INTERNAL."""


CallerLookup = Callable[[str], PeerCredentials | None]
"""From a call's peer address to the process that made it (see kleidi.callers); None: unknown."""


async def _caller(context: grpc.aio.ServicerContext[Any, Any], callers: CallerLookup | None) -> PeerCredentials | None:
    """The calling process, when callers are authenticated. A call that did not come through the
    checked public socket (someone reached the private one directly) is refused."""
    if callers is None:
        return None
    caller = callers(context.peer())
    if caller is None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            "calls must come through kleidi's public socket, where callers are authenticated")
    return caller


def grpc_code(exc: KleidiError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in GRPC_CODES:
            return GRPC_CODES[cls]
    return grpc.StatusCode.INTERNAL


@asynccontextmanager
async def _handled(context: grpc.aio.ServicerContext[Any, Any], method: str, uid: str,
                   callers: CallerLookup | None, key_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
    """Log, count and audit the call; turn kleidi errors into gRPC status codes with their reason.
    The handler may add ``key_id`` to the yielded dict (the audit record's key)."""
    started = time.perf_counter()
    caller = await _caller(context, callers)
    fields: dict[str, Any] = {"method": method, "uid": uid}
    audit_fields: dict[str, Any] = {"key_id": key_id}
    code = "OK"
    telemetry.IN_FLIGHT.inc()
    try:
        yield audit_fields
    except KleidiError as exc:
        status = grpc_code(exc)
        code = status.name
        fields.update(code=code, latency_ms=round((time.perf_counter() - started) * 1000, 3))
        log.warning("%s failed: %s", method, exc, extra={"fields": fields})
        await context.abort(status, str(exc))
    except Exception:
        code = fields["code"] = "INTERNAL"
        log.exception("%s failed with an unexpected error", method, extra={"fields": fields})
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the kleidi log")
    else:
        if log.isEnabledFor(logging.DEBUG):
            fields.update(code="OK", latency_ms=round((time.perf_counter() - started) * 1000, 3))
            log.debug("%s ok", method, extra={"fields": fields})
    finally:
        elapsed = time.perf_counter() - started
        telemetry.IN_FLIGHT.dec()
        telemetry.REQUESTS.labels(method, code).inc()
        telemetry.REQUEST_SECONDS.labels(method, code).observe(elapsed)
        audit.emit(method, uid=uid or None, key_id=audit_fields.get("key_id") or None, outcome=code,
                   latency_ms=round(elapsed * 1000, 3), **(caller.audit_fields() if caller else {}))


class KMSv2Servicer(v2_grpc.KeyManagementServiceServicer):
    def __init__(self, keys: KeyManager, service: EnvelopeService, status_version: str = "v2",
                 callers: CallerLookup | None = None) -> None:
        self._keys = keys
        self._service = service
        self._status_version = status_version
        self._callers = callers

    async def Status(self, request: v2_pb.StatusRequest, context: Any) -> v2_pb.StatusResponse:
        await _caller(context, self._callers)
        telemetry.REQUESTS.labels("Status", "OK").inc()
        health = self._keys.health
        key_set = self._keys.key_set
        key_id = key_set.current.key_id if key_set is not None else ""
        return v2_pb.StatusResponse(version=self._status_version, healthz=health.detail, key_id=key_id)

    async def Encrypt(self, request: v2_pb.EncryptRequest, context: Any) -> v2_pb.EncryptResponse:
        async with _handled(context, "Encrypt", request.uid, self._callers) as record:
            sealed = await self._service.encrypt(request.plaintext)
            record["key_id"] = sealed.key_id
            return v2_pb.EncryptResponse(ciphertext=sealed.ciphertext, key_id=sealed.key_id,
                                         annotations=dict(sealed.annotations))
        raise AssertionError("unreachable: _handled aborts on error")

    async def Decrypt(self, request: v2_pb.DecryptRequest, context: Any) -> v2_pb.DecryptResponse:
        async with _handled(context, "Decrypt", request.uid, self._callers, key_id=request.key_id[:1024]):
            plaintext = await self._service.decrypt(request.ciphertext, request.key_id, request.annotations)
            return v2_pb.DecryptResponse(plaintext=plaintext)
        raise AssertionError("unreachable: _handled aborts on error")


class KMSv1beta1Servicer(v1_grpc.KeyManagementServiceServicer):
    def __init__(self, service: EnvelopeService, callers: CallerLookup | None = None) -> None:
        self._service = service
        self._callers = callers

    @staticmethod
    async def _check_version(request: Any, context: Any) -> None:
        if request.version != V1BETA1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unsupported KMS API version {request.version[:32]!r}; only v1beta1")

    async def Version(self, request: v1_pb.VersionRequest, context: Any) -> v1_pb.VersionResponse:
        await _caller(context, self._callers)
        await self._check_version(request, context)
        return v1_pb.VersionResponse(version=V1BETA1, runtime_name="kleidi", runtime_version=__version__)

    async def Encrypt(self, request: v1_pb.EncryptRequest, context: Any) -> v1_pb.EncryptResponse:
        await self._check_version(request, context)
        async with _handled(context, "v1beta1.Encrypt", "", self._callers):
            sealed = await self._service.encrypt(request.plain, V1BETA1)
            return v1_pb.EncryptResponse(cipher=sealed.ciphertext)
        raise AssertionError("unreachable: _handled aborts on error")

    async def Decrypt(self, request: v1_pb.DecryptRequest, context: Any) -> v1_pb.DecryptResponse:
        await self._check_version(request, context)
        async with _handled(context, "v1beta1.Decrypt", "", self._callers):
            return v1_pb.DecryptResponse(plain=await self._service.decrypt_v1beta1(request.cipher))
        raise AssertionError("unreachable: _handled aborts on error")


