"""KMS v1beta1 (legacy) on the same socket, behind server.enable_v1beta1 (kms-protocol.md §1.3, §2.6)."""

from __future__ import annotations

import os
from typing import Any

import grpc
import pytest

from kleidi._proto.kmsv1beta1 import api_pb2 as v1
from kleidi._proto.kmsv1beta1 import api_pb2_grpc as v1_grpc
from kleidi._proto.kmsv2 import api_pb2 as v2


def _stub(proc: Any) -> v1_grpc.KeyManagementServiceStub:
    return v1_grpc.KeyManagementServiceStub(grpc.insecure_channel(proc.endpoint))


@pytest.fixture
def legacy(kleidi_factory: Any) -> Any:
    return kleidi_factory(settings={"server": {"enable_v1beta1": True}})


def test_version_answers_v1beta1(legacy: Any) -> None:
    response = _stub(legacy).Version(v1.VersionRequest(version="v1beta1"), timeout=3)
    assert response.version == "v1beta1"
    assert response.runtime_name == "kleidi"


def test_v1_round_trip_and_health_ping(legacy: Any) -> None:
    stub = _stub(legacy)
    for plain in (os.urandom(32), b"ping"):
        cipher = stub.Encrypt(v1.EncryptRequest(version="v1beta1", plain=plain), timeout=3).cipher
        assert plain not in cipher
        assert stub.Decrypt(v1.DecryptRequest(version="v1beta1", cipher=cipher), timeout=3).plain == plain


def test_v1_refuses_other_versions_and_tampering(legacy: Any) -> None:
    stub = _stub(legacy)
    with pytest.raises(grpc.RpcError) as info:
        stub.Encrypt(v1.EncryptRequest(version="v2", plain=b"x" * 32), timeout=3)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    cipher = stub.Encrypt(v1.EncryptRequest(version="v1beta1", plain=b"x" * 32), timeout=3).cipher
    with pytest.raises(grpc.RpcError) as info:
        stub.Decrypt(v1.DecryptRequest(version="v1beta1", cipher=cipher[:-1] + bytes([cipher[-1] ^ 1])), timeout=3)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_ciphertexts_do_not_cross_protocols(legacy: Any) -> None:
    """A v2 ciphertext fed to v1 Decrypt (or the reverse) fails: the protocol is authenticated."""
    v2_response = legacy.encrypt(os.urandom(32))
    with pytest.raises(grpc.RpcError) as info:
        _stub(legacy).Decrypt(v1.DecryptRequest(version="v1beta1", cipher=v2_response.ciphertext), timeout=3)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    v1_cipher = _stub(legacy).Encrypt(v1.EncryptRequest(version="v1beta1", plain=b"y" * 32), timeout=3).cipher
    with pytest.raises(grpc.RpcError) as info:
        legacy.decrypt(v1_cipher, v2_response.key_id, v2_response.annotations)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_v2_still_served_alongside(legacy: Any) -> None:
    assert legacy.stub.Status(v2.StatusRequest(), timeout=3).healthz == "ok"


def test_v1beta1_is_off_by_default(kleidi_factory: Any) -> None:
    proc = kleidi_factory()
    with pytest.raises(grpc.RpcError) as info:
        _stub(proc).Version(v1.VersionRequest(version="v1beta1"), timeout=3)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_v1_retired_version_is_reported_as_retired(legacy: Any) -> None:
    stub = _stub(legacy)
    cipher = stub.Encrypt(v1.EncryptRequest(version="v1beta1", plain=b"z" * 32), timeout=3).cipher
    old_key_id = legacy.status().key_id
    from tests.conftest import run_kleidi
    assert run_kleidi("rotate", "--keyring", str(legacy.keyring)).returncode == 0
    legacy.wait_for_key_id(lambda k: k != old_key_id)
    assert run_kleidi("retire", "1", "--yes", "--keyring", str(legacy.keyring)).returncode == 0
    deadline = __import__("time").monotonic() + 10
    while True:
        try:
            stub.Decrypt(v1.DecryptRequest(version="v1beta1", cipher=cipher), timeout=3)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "retired" in (exc.details() or "")
            break
        assert __import__("time").monotonic() < deadline, "retired version kept decrypting"
