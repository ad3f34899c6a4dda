"""A minimal KMS v2 client: ``kleidi status`` calls Status exactly as kube-apiserver does."""

from __future__ import annotations

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
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        healthy = self.error is None and not self.problems
        return {"endpoint": self.endpoint, "version": self.version, "healthz": self.healthz,
                "key_id": self.key_id, "healthy": healthy, "error": self.error, "problems": self.problems}


def check_status(endpoint: str, timeout: float) -> StatusCheck:
    """Call Status and apply the apiserver's checks (kms-protocol.md §2.1)."""
    result = StatusCheck(endpoint=endpoint)
    with channel(endpoint) as chan:
        try:
            response = v2_grpc.KeyManagementServiceStub(chan).Status(v2_pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            result.error = f"{exc.code().name}: {exc.details()}"
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
