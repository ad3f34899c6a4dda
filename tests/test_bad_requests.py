"""Hostile requests on the real socket: bytes that are not the message they claim to be, invalid
UTF-8, oversized fields. Each gets INVALID_ARGUMENT with a neutral reason, is counted and audited,
and leaves no traceback in the log."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import grpc
import pytest

from kleidi._proto.kmsv1beta1 import api_pb2 as v1_pb
from kleidi._proto.kmsv2 import api_pb2 as v2_pb
from tests.test_telemetry import samples, value


def raw_call(endpoint: str, method: str, payload: bytes) -> grpc.RpcError:
    """Send ``payload`` as the request body of ``method`` as is; return the error it must get."""
    with grpc.insecure_channel(endpoint, options=[("grpc.default_authority", "localhost")]) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=5)
    return info.value


def audit_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def audited(kleidi_factory: Any, short_dir: Path) -> Any:
    return kleidi_factory(settings={"audit": {"path": str(short_dir / "audit.jsonl"), "fsync": "always"},
                                    "server": {"enable_v1beta1": True}})


ENCRYPT = v2_pb.EncryptRequest(plaintext=os.urandom(32), uid="abc").SerializeToString()
DECRYPT = v2_pb.DecryptRequest(ciphertext=b"x" * 40, key_id="kid", annotations={"a.example.com": b"1"},
                               uid="abc").SerializeToString()

CASES = {
    "uid-not-utf8": ("/v2.KeyManagementService/Encrypt", "Encrypt", ENCRYPT.replace(b"abc", b"a\xffc"),
                     "request is not a valid v2.EncryptRequest: a string field (uid, key_id or an annotation key) "
                     "is not valid UTF-8"),
    "key-id-not-utf8": ("/v2.KeyManagementService/Decrypt", "Decrypt", DECRYPT.replace(b"kid", b"k\xc3d"),
                        "request is not a valid v2.DecryptRequest: a string field (uid, key_id or an annotation key) "
                        "is not valid UTF-8"),
    "annotation-key-not-utf8": ("/v2.KeyManagementService/Decrypt", "Decrypt",
                                DECRYPT.replace(b"a.example.com", b"a.ex\xfeple.com"),
                                # protobuf reports bad UTF-8 inside a map entry as plain corruption
                                "request is not a valid v2.DecryptRequest: it is not a valid protobuf encoding"),
    "corrupt-wire-format": ("/v2.KeyManagementService/Encrypt", "Encrypt", b"\xff\xff\xff\xff",
                            "request is not a valid v2.EncryptRequest: it is not a valid protobuf encoding"),
    "corrupt-status": ("/v2.KeyManagementService/Status", "Status", b"\x0a\xff",
                       "request is not a valid v2.StatusRequest: it is not a valid protobuf encoding"),
    "corrupt-v1beta1": ("/v1beta1.KeyManagementService/Decrypt", "v1beta1.Decrypt", b"\x0a\x05ab",
                        "request is not a valid v1beta1.DecryptRequest: it is not a valid protobuf encoding"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_undecodable_requests_are_invalid_argument_counted_and_audited(audited: Any, short_dir: Path,
                                                                      case: str) -> None:
    path, method, payload, reason = CASES[case]
    before = value(samples(audited), "kleidi_requests_total", method=method, code="INVALID_ARGUMENT")
    error = raw_call(audited.endpoint, path, payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == reason
    assert value(samples(audited), "kleidi_requests_total", method=method, code="INVALID_ARGUMENT") == before + 1
    record = audit_records(short_dir / "audit.jsonl")[-1]
    assert record["event"] == method and record["outcome"] == "INVALID_ARGUMENT"
    assert record["caller_uid"] == os.getuid()  # refused calls name their caller too
    assert "Traceback" not in audited.log() and "exception" not in audited.log()
    assert audited.status().healthz == "ok"  # a hostile caller's invalid calls never make kleidi unhealthy


def test_v1beta1_wrong_version_is_audited_and_checked_after_the_caller(audited: Any, short_dir: Path) -> None:
    request = v1_pb.EncryptRequest(version="v9\n", plain=b"x" * 32).SerializeToString()
    error = raw_call(audited.endpoint, "/v1beta1.KeyManagementService/Encrypt", request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "unsupported KMS API version 'v9\\\\n'; only v1beta1"
    record = audit_records(short_dir / "audit.jsonl")[-1]
    assert record["event"] == "v1beta1.Encrypt" and record["outcome"] == "INVALID_ARGUMENT"

    # Straight to the private gRPC socket, around the caller check: refused for that first, before
    # anything about the request is looked at.
    private = re.search(r"gRPC server behind it on (\S+?)\"", audited.log())
    assert private, audited.log()
    error = raw_call(f"unix://{private.group(1)}", "/v1beta1.KeyManagementService/Encrypt", request)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    record = audit_records(short_dir / "audit.jsonl")[-1]
    assert record["event"] == "v1beta1.Encrypt" and record["outcome"] == "PERMISSION_DENIED"


def test_an_oversized_uid_is_bounded_and_escaped_in_logs_and_audit(audited: Any, short_dir: Path) -> None:
    huge = "\n{\"forged\": 1}" + "u" * 200_000
    sealed = audited.encrypt(os.urandom(32), uid=huge)  # the uid is only a correlation id: still served
    assert sealed.key_id
    record = next(r for r in audit_records(short_dir / "audit.jsonl") if r["event"] == "Encrypt")
    assert len(record["uid"]) < 200 and record["uid"].startswith("\\n{")
    assert record["uid"].endswith(f"...(+{len(huge) - 128} chars)")
    assert max(len(line) for line in audited.log().splitlines()) < 4096
    assert "forged" not in {k for line in audited.log().splitlines() for k in json.loads(line)}
