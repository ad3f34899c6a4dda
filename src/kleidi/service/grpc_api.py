"""gRPC handlers for KMS v2 and v1beta1: decode, call :class:`EnvelopeService`, map errors.

Every call, whatever becomes of it (served, refused, malformed, failed), goes through
:func:`_handled`: it is counted by its real outcome, audited (a successful Status excepted: it
touches no key), logged without secrets, and answered with a gRPC status code and a neutral
reason. Requests are decoded here, not by grpcio, so that a message that is not valid protobuf
(or holds invalid UTF-8) is an ``INVALID_ARGUMENT`` like any other bad input, not an ``UNKNOWN``
with a traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from kleidi import __version__, audit, logs, telemetry
from kleidi._proto.kmsv1beta1 import api_pb2 as v1_pb
from kleidi._proto.kmsv2 import api_pb2 as v2_pb
from kleidi.callers import PeerCredentials
from kleidi.errors import (
    AuditUnavailable,
    BackendUnavailable,
    CallerRefused,
    ConfigError,
    DecryptionFailed,
    InvalidRequest,
    KeyringError,
    KleidiError,
    RetiredKey,
    ServiceUnavailable,
    UnknownKey,
)
from kleidi.service import validation
from kleidi.service.core import V1BETA1, EnvelopeService
from kleidi.service.keys import KeyManager

log = logging.getLogger("kleidi.grpc")

GRPC_CODES: dict[type[KleidiError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    DecryptionFailed: grpc.StatusCode.INVALID_ARGUMENT,
    CallerRefused: grpc.StatusCode.PERMISSION_DENIED,
    UnknownKey: grpc.StatusCode.NOT_FOUND,
    RetiredKey: grpc.StatusCode.FAILED_PRECONDITION,
    BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    AuditUnavailable: grpc.StatusCode.UNAVAILABLE,
    KeyringError: grpc.StatusCode.UNAVAILABLE,
    ConfigError: grpc.StatusCode.UNAVAILABLE,  # at run time: e.g. a credential file went missing
    ServiceUnavailable: grpc.StatusCode.UNAVAILABLE,
}
"""The one table from kleidi errors to gRPC status codes; anything else is INTERNAL."""

INTERNAL_MESSAGE = "internal error; see the kleidi log"

CallerLookup = Callable[[str], PeerCredentials | None]
"""From a call's peer address to the process that made it (see kleidi.callers); None: unknown."""


def grpc_code(exc: KleidiError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in GRPC_CODES:
            return GRPC_CODES[cls]
    return grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class Malformed:
    """What a request that could not be decoded turns into; the handler refuses it."""

    message_type: str
    reason: str


def _decoder(message_type: type[Message]) -> Callable[[bytes], Message | Malformed]:
    name = message_type.DESCRIPTOR.full_name

    def decode(data: bytes) -> Message | Malformed:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            # protobuf's own text is neutral ("String field had bad UTF-8", "Wire format was corrupt").
            reason = "a string field (uid, key_id or an annotation key) is not valid UTF-8" \
                if "UTF-8" in str(exc) else "it is not a valid protobuf encoding"
            return Malformed(name, reason)
        except Exception:  # whatever the decoder does with hostile bytes, the answer is the same
            return Malformed(name, "it is not a valid protobuf encoding")

    return decode


def _caller(context: grpc.aio.ServicerContext[Any, Any], callers: CallerLookup | None) -> PeerCredentials | None:
    """The calling process, when callers are authenticated. A call that did not come through the
    checked public socket (someone reached the private one directly) is refused."""
    if callers is None:
        return None
    caller = callers(context.peer())
    if caller is None:
        raise CallerRefused("calls must come through kleidi's public socket, where callers are authenticated")
    return caller


@dataclass
class Call:
    """What a handler learns about its call, for the audit record."""

    request: Any
    key_id: str | None = None


def _foreign_failure(method: str, exc: Exception) -> None:
    # The message of a foreign exception may quote data it was handed: log where, never what.
    frames = logs.frames(exc)
    log.error("%s failed with an unexpected %s; this is a bug in kleidi", method, type(exc).__name__,
              extra={"fields": {"method": method, "traceback": frames}})


@asynccontextmanager
async def _handled(context: grpc.aio.ServicerContext[Any, Any], method: str, request: Any,
                   callers: CallerLookup | None, audit_success: bool = True) -> AsyncIterator[Call]:
    """Check the caller and the request, then log, count and audit the call; turn every error into
    a gRPC status code with a neutral reason. The handler may set ``key_id`` on the yielded call."""
    started = time.perf_counter()
    call = Call(request)
    caller: PeerCredentials | None = None
    uid = "" if isinstance(request, Malformed) else validation.loggable(getattr(request, "uid", ""))
    status, message = grpc.StatusCode.OK, ""
    telemetry.IN_FLIGHT.inc()
    try:
        caller = _caller(context, callers)
        if isinstance(request, Malformed):
            raise InvalidRequest(f"request is not a valid {request.message_type}: {request.reason}")
        yield call
    except KleidiError as exc:
        status, message = grpc_code(exc), str(exc)
    except Exception as exc:
        _foreign_failure(method, exc)
        status, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
    finally:
        telemetry.IN_FLIGHT.dec()
    key_id = validation.loggable(call.key_id) if call.key_id else None
    if status != grpc.StatusCode.OK or audit_success:
        try:
            audit.emit(method, uid=uid or None, key_id=key_id, outcome=status.name,
                       latency_ms=audit.now_ms(started), **(caller.audit_fields() if caller else {}))
        except AuditUnavailable as exc:  # fail_closed: no unrecorded answer leaves kleidi
            if status == grpc.StatusCode.OK:
                status, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        except Exception as exc:
            _foreign_failure(f"{method} audit record", exc)
            if status == grpc.StatusCode.OK:
                status, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
    elapsed = time.perf_counter() - started
    try:
        telemetry.REQUESTS.labels(method, status.name).inc()
        telemetry.REQUEST_SECONDS.labels(method, status.name).observe(elapsed)
    except Exception as exc:  # a metric must never change the answer
        _foreign_failure(f"{method} metrics", exc)
    if status == grpc.StatusCode.OK:
        if audit_success and log.isEnabledFor(logging.DEBUG):  # not every Status poll and probe
            log.debug("%s ok", method, extra={"fields": {"method": method, "uid": uid, "code": "OK",
                                                         "latency_ms": round(elapsed * 1000, 3)}})
        return
    level = logging.ERROR if status == grpc.StatusCode.INTERNAL else logging.WARNING
    if status != grpc.StatusCode.INTERNAL:  # an INTERNAL was logged with its traceback already
        log.log(level, "%s failed: %s", method, message, extra={"fields": {
            "method": method, "uid": uid, "code": status.name, "latency_ms": round(elapsed * 1000, 3),
            **(caller.audit_fields() if caller else {})}})
    await context.abort(status, message)


def _v1_version(request: Any) -> None:
    if request.version != V1BETA1:
        raise InvalidRequest(f"unsupported KMS API version {validation.loggable(request.version, 32)!r}; "
                             "only v1beta1")


class KMSv2Servicer:
    """kube-apiserver's KMS v2 service (``v2.KeyManagementService``)."""

    def __init__(self, keys: KeyManager, service: EnvelopeService, status_version: str = "v2",
                 callers: CallerLookup | None = None) -> None:
        self._keys = keys
        self._service = service
        self._status_version = status_version
        self._callers = callers

    async def Status(self, request: v2_pb.StatusRequest | Malformed, context: Any) -> v2_pb.StatusResponse:
        async with _handled(context, "Status", request, self._callers, audit_success=False):
            health = self._keys.health
            key_set = self._keys.key_set
            key_id = key_set.current.key_id if key_set is not None else ""
            return v2_pb.StatusResponse(version=self._status_version, healthz=health.detail, key_id=key_id)
        raise AssertionError("unreachable: _handled aborts on error")

    async def Encrypt(self, request: v2_pb.EncryptRequest | Malformed, context: Any) -> v2_pb.EncryptResponse:
        async with _handled(context, "Encrypt", request, self._callers) as call:
            sealed = await self._service.encrypt(call.request.plaintext)
            call.key_id = sealed.key_id
            return v2_pb.EncryptResponse(ciphertext=sealed.ciphertext, key_id=sealed.key_id,
                                         annotations=dict(sealed.annotations))
        raise AssertionError("unreachable: _handled aborts on error")

    async def Decrypt(self, request: v2_pb.DecryptRequest | Malformed, context: Any) -> v2_pb.DecryptResponse:
        async with _handled(context, "Decrypt", request, self._callers) as call:
            call.key_id = call.request.key_id
            plaintext = await self._service.decrypt(call.request.ciphertext, call.request.key_id,
                                                    call.request.annotations)
            return v2_pb.DecryptResponse(plaintext=plaintext)
        raise AssertionError("unreachable: _handled aborts on error")

    def handler(self) -> grpc.GenericRpcHandler:
        return _service_handler("v2.KeyManagementService", {
            "Status": (self.Status, v2_pb.StatusRequest, v2_pb.StatusResponse),
            "Encrypt": (self.Encrypt, v2_pb.EncryptRequest, v2_pb.EncryptResponse),
            "Decrypt": (self.Decrypt, v2_pb.DecryptRequest, v2_pb.DecryptResponse),
        })


class KMSv1beta1Servicer:
    """The deprecated KMS v1 service (``v1beta1.KeyManagementService``)."""

    def __init__(self, service: EnvelopeService, callers: CallerLookup | None = None) -> None:
        self._service = service
        self._callers = callers

    async def Version(self, request: v1_pb.VersionRequest | Malformed, context: Any) -> v1_pb.VersionResponse:
        async with _handled(context, "v1beta1.Version", request, self._callers, audit_success=False) as call:
            _v1_version(call.request)
            return v1_pb.VersionResponse(version=V1BETA1, runtime_name="kleidi", runtime_version=__version__)
        raise AssertionError("unreachable: _handled aborts on error")

    async def Encrypt(self, request: v1_pb.EncryptRequest | Malformed, context: Any) -> v1_pb.EncryptResponse:
        async with _handled(context, "v1beta1.Encrypt", request, self._callers) as call:
            _v1_version(call.request)
            sealed = await self._service.encrypt(call.request.plain, V1BETA1)
            return v1_pb.EncryptResponse(cipher=sealed.ciphertext)
        raise AssertionError("unreachable: _handled aborts on error")

    async def Decrypt(self, request: v1_pb.DecryptRequest | Malformed, context: Any) -> v1_pb.DecryptResponse:
        async with _handled(context, "v1beta1.Decrypt", request, self._callers) as call:
            _v1_version(call.request)
            return v1_pb.DecryptResponse(plain=await self._service.decrypt_v1beta1(call.request.cipher))
        raise AssertionError("unreachable: _handled aborts on error")

    def handler(self) -> grpc.GenericRpcHandler:
        return _service_handler("v1beta1.KeyManagementService", {
            "Version": (self.Version, v1_pb.VersionRequest, v1_pb.VersionResponse),
            "Encrypt": (self.Encrypt, v1_pb.EncryptRequest, v1_pb.EncryptResponse),
            "Decrypt": (self.Decrypt, v1_pb.DecryptRequest, v1_pb.DecryptResponse),
        })


Handler = Callable[[Any, Any], Awaitable[Any]]


def _service_handler(service: str, methods: dict[str, tuple[Handler, type[Message], type[Message]]]
                     ) -> grpc.GenericRpcHandler:
    """Register the methods with kleidi's own decoder (see the module docstring)."""
    return grpc.method_handlers_generic_handler(service, {
        name: grpc.unary_unary_rpc_method_handler(
            function, request_deserializer=_decoder(request_type),
            response_serializer=response_type.SerializeToString)
        for name, (function, request_type, response_type) in methods.items()})
