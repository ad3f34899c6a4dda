"""A minimal KMS v2 client: ``kleidi status`` calls Status exactly as kube-apiserver does."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any

import grpc

from kleidi._proto.kmsv2 import api_pb2 as v2_pb
from kleidi._proto.kmsv2 import api_pb2_grpc as v2_grpc
from kleidi.endpoint import parse_endpoint
from kleidi.service.validation import MAX_KEY_ID_SIZE

ACCEPTED_VERSIONS = ("v2", "v2beta1")


def channel(endpoint: str) -> grpc.Channel:
    """An insecure channel to a unix-socket endpoint, with the apiserver's ``:authority`` of localhost."""
    return grpc.insecure_channel(parse_endpoint(endpoint).grpc_address,
                                 options=[("grpc.default_authority", "localhost")])


@dataclass
class StatusCheck:
    endpoint: str
    version: str | None = None
    healthz: str | None = None
    key_id: str | None = None
    error: str | None = None
    """Why no answer came (nothing listens, timeout, ...); None when the plugin answered."""
    fix: str | None = None
    problems: list[str] = field(default_factory=list)
    """What the apiserver would object to in the answer."""

    @property
    def healthy(self) -> bool:
        return self.error is None and not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "version": self.version, "healthz": self.healthz,
                "key_id": self.key_id, "healthy": self.healthy, "error": self.error, "fix": self.fix,
                "problems": self.problems}


_START_FIX = "start kleidi (kleidi serve --config ...), or check the endpoint (server.endpoint in its config)"


def _unreachable(endpoint: str) -> tuple[str, str] | None:
    """Why nothing can answer at a socket path, told before gRPC's generic UNAVAILABLE hides it."""
    path = parse_endpoint(endpoint).path
    if path is None:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"nothing listens at {path}: the socket does not exist", _START_FIX
    except OSError as exc:
        return f"cannot reach {path}: {exc.strerror}", "run as a user that may open the socket's directory"
    if not stat.S_ISSOCK(st.st_mode):
        return f"nothing listens at {path}: it is not a socket", "point the endpoint at kleidi's socket"
    return None


def check_status(endpoint: str, timeout: float) -> StatusCheck:
    """Call Status and apply the apiserver's checks (kms-protocol.md §2.1)."""
    result = StatusCheck(endpoint=endpoint)
    unreachable = _unreachable(endpoint)
    if unreachable is not None:
        result.error, result.fix = unreachable
        return result
    with channel(endpoint) as chan:
        try:
            response = v2_grpc.KeyManagementServiceStub(chan).Status(v2_pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                result.error = f"no answer within {timeout:g}s (DEADLINE_EXCEEDED)"
                result.fix = "see kleidi's log; a busy or stuck plugin also fails the apiserver's calls"
            elif code == grpc.StatusCode.UNAVAILABLE and "refused" in (exc.details() or "").lower():
                result.error = ("nothing listens at the socket (connection refused): a socket file left by a "
                                "stopped kleidi?")
                result.fix = _START_FIX
            else:
                result.error = f"{code.name}: {exc.details()}"
                result.fix = _START_FIX if code == grpc.StatusCode.UNAVAILABLE else None
            return result
    result.version, result.healthz, result.key_id = response.version, response.healthz, response.key_id
    if response.healthz != "ok":
        result.problems.append(f"got unexpected healthz status: {response.healthz}")
    if response.version not in ACCEPTED_VERSIONS:
        result.problems.append(f"version {response.version!r} is not one of {ACCEPTED_VERSIONS}")
    size = len(response.key_id.encode())
    if size == 0:
        result.problems.append("keyID is empty")
    elif size > MAX_KEY_ID_SIZE:
        result.problems.append(f"keyID is {size} bytes, which exceeds the max size of {MAX_KEY_ID_SIZE}")
    return result
