"""The committed stubs match the .proto files, and the wire names are exactly the apiserver's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kleidi._proto.kmsv1beta1 import api_pb2 as v1
from kleidi._proto.kmsv2 import api_pb2 as v2
from kleidi._proto.kmsv2 import encrypted_object_pb2 as eo

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)], check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc produced nothing"
    for rel in generated:
        committed = ROOT / "src" / rel
        assert committed.exists(), f"{rel} is generated but not committed; run scripts/gen-proto.sh"
        assert committed.read_text() == (tmp_path / rel).read_text(), f"{rel} is stale; run scripts/gen-proto.sh"


def _fields(message: object) -> dict[str, tuple[int, int]]:
    return {f.name: (f.number, f.type) for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_v2_wire_contract() -> None:
    service = v2.DESCRIPTOR.services_by_name["KeyManagementService"]
    assert service.full_name == "v2.KeyManagementService"
    assert [m.name for m in service.methods] == ["Status", "Decrypt", "Encrypt"]
    string, bytes_, message = 9, 12, 11
    assert _fields(v2.StatusResponse) == {"version": (1, string), "healthz": (2, string), "key_id": (3, string)}
    assert _fields(v2.DecryptRequest) == {"ciphertext": (1, bytes_), "uid": (2, string), "key_id": (3, string),
                                          "annotations": (4, message)}
    assert _fields(v2.DecryptResponse) == {"plaintext": (1, bytes_)}
    assert _fields(v2.EncryptRequest) == {"plaintext": (1, bytes_), "uid": (2, string)}
    assert _fields(v2.EncryptResponse) == {"ciphertext": (1, bytes_), "key_id": (2, string),
                                           "annotations": (3, message)}
    assert _fields(v2.StatusRequest) == {}


def test_v1beta1_wire_contract() -> None:
    service = v1.DESCRIPTOR.services_by_name["KeyManagementService"]
    assert service.full_name == "v1beta1.KeyManagementService"
    assert [m.name for m in service.methods] == ["Version", "Decrypt", "Encrypt"]
    string, bytes_ = 9, 12
    assert _fields(v1.VersionRequest) == {"version": (1, string)}
    assert _fields(v1.VersionResponse) == {"version": (1, string), "runtime_name": (2, string),
                                           "runtime_version": (3, string)}
    assert _fields(v1.DecryptRequest) == {"version": (1, string), "cipher": (2, bytes_)}
    assert _fields(v1.DecryptResponse) == {"plain": (1, bytes_)}
    assert _fields(v1.EncryptRequest) == {"version": (1, string), "plain": (2, bytes_)}
    assert _fields(v1.EncryptResponse) == {"cipher": (1, bytes_)}


def test_encrypted_object_contract() -> None:
    assert eo.EncryptedObject.DESCRIPTOR.full_name == "v2.EncryptedObject"
    assert {f.name: f.number for f in eo.EncryptedObject.DESCRIPTOR.fields} == {
        "encryptedData": 1, "keyID": 2, "encryptedDEKSource": 3, "annotations": 4, "encryptedDEKSourceType": 5}
    assert eo.AES_GCM_KEY == 0 and eo.HKDF_SHA256_XNONCE_AES_GCM_SEED == 1
