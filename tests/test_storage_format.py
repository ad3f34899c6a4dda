"""The apiserver's KMS v2 etcd format (kms-protocol.md §4.3-4.4), checked against upstream vectors.

This is what an offline decrypt of an etcd backup needs: the seed from kleidi's Decrypt, then the
apiserver's own HKDF + AES-GCM layer with the etcd key as authenticated data.
"""

from __future__ import annotations

import os

import pytest

from kleidi._crypto import kmsv2_storage as storage
from kleidi._proto.kmsv2 import encrypted_object_pb2 as pb
from kleidi.errors import DecryptionFailed, InvalidRequest

# k8s.io/apiserver v0.36.3 pkg/storage/value/encrypt/aes/aes_test.go
TYPE1_SEED = bytes.fromhex("5d40323a820ff95561675e3b95e81867c5fdd561d35a88a2d08b08aa9d4fcf5c")
TYPE1_DATA = bytes.fromhex(
    "2442759e33945fbad709db577a0f037fd8a709fc76979b8942209debcecb9d57efe3d6ff6a1ef6ee9a5003b9833b3043"
    "cec1e47b35175b151107a8d2416b0e296bbf66b5d102fcefdf9a78f293d271")
# TestGCMLegacyDataCompatibility: Go string literal decoded to bytes (47 bytes)
TYPE0_KEY = b"snorlax_awesomes"
TYPE0_DATA = bytes.fromhex(
    "9f27c8fcea8a58c467d8e437dbf2d85955f9b4bd912f4ef967d788a0cb07797dac0a3f0a0845605ca85ac8562b4ae1")
PLAINTEXT = b"pandas are the best"
AAD = "bamboo"


def _obj(data: bytes, dek_type: int) -> storage.StoredObject:
    return storage.StoredObject(provider="p", encrypted_data=data, key_id="k", encrypted_dek_source=b"x",
                                dek_source_type=dek_type)


def test_upstream_type1_vector_hkdf_seed() -> None:
    assert len(TYPE1_DATA) == 79
    assert storage.decrypt_object(_obj(TYPE1_DATA, storage.TYPE_HKDF_SEED), TYPE1_SEED, AAD) == PLAINTEXT


def test_upstream_type0_vector_plain_gcm() -> None:
    assert len(TYPE0_DATA) == 47
    assert storage.decrypt_object(_obj(TYPE0_DATA, storage.TYPE_AES_GCM_KEY), TYPE0_KEY, AAD) == PLAINTEXT


@pytest.mark.parametrize("data, key, dek_type, aad", [
    (TYPE1_DATA, TYPE1_SEED, storage.TYPE_HKDF_SEED, "panda"),
    (TYPE1_DATA[:-1] + b"\x00", TYPE1_SEED, storage.TYPE_HKDF_SEED, AAD),
    (TYPE1_DATA, bytes(32), storage.TYPE_HKDF_SEED, AAD),
    (TYPE0_DATA, TYPE0_KEY, storage.TYPE_AES_GCM_KEY, "panda"),
    (TYPE0_DATA, b"snorlax_awesomez", storage.TYPE_AES_GCM_KEY, AAD),
])
def test_vectors_fail_with_wrong_inputs(data: bytes, key: bytes, dek_type: int, aad: str) -> None:
    with pytest.raises(DecryptionFailed):
        storage.decrypt_object(_obj(data, dek_type), key, aad)


def test_short_seed_is_refused_like_the_apiserver() -> None:
    with pytest.raises(InvalidRequest, match="invalid seed length 31"):
        storage.decrypt_object(_obj(TYPE1_DATA, storage.TYPE_HKDF_SEED), TYPE1_SEED[:31], AAD)


def test_etcd_value_round_trip_and_wire_layout() -> None:
    seed = os.urandom(32)
    value = storage.encrypt_object(seed, b"k8s\x00object-bytes", "/registry/secrets/default/s1", provider="kleidi",
                                   key_id="kid", encrypted_dek_source=b"wrapped",
                                   annotations={"envelope.kleidi.io": b"1"})
    assert value.startswith(b"k8s:enc:kms:v2:kleidi:\x0a")  # field 1 (encryptedData) comes first
    assert value.endswith(b"\x28\x01")  # field 5 = 1 (HKDF seed type) comes last
    parsed = storage.parse_etcd_value(value)
    assert (parsed.provider, parsed.key_id, parsed.encrypted_dek_source) == ("kleidi", "kid", b"wrapped")
    assert parsed.annotations == {"envelope.kleidi.io": b"1"}
    assert len(parsed.encrypted_data) == 32 + 12 + len(b"k8s\x00object-bytes") + 16
    assert storage.decrypt_object(parsed, seed, "/registry/secrets/default/s1") == b"k8s\x00object-bytes"
    with pytest.raises(DecryptionFailed):  # moved to another key: AAD mismatch
        storage.decrypt_object(parsed, seed, "/registry/secrets/default/s2")


def _value(**fields: object) -> bytes:
    base: dict[str, object] = dict(encryptedData=b"d", keyID="k", encryptedDEKSource=b"s")
    base.update(fields)
    return b"k8s:enc:kms:v2:p:" + pb.EncryptedObject(**base).SerializeToString()  # type: ignore[arg-type]


@pytest.mark.parametrize("value, reason", [
    (b"k8s:enc:aescbc:v1:key:xx", "no k8s:enc:kms:v2: prefix"),
    (b"k8s:enc:kms:v2:nocolon", "no provider name"),
    (b"k8s:enc:kms:v2:p:\xff\xff\xff", "does not decode"),
    (_value(encryptedData=b""), "encryptedData is empty"),
    (_value(encryptedDEKSource=b""), "encryptedDEKSource is 0 bytes"),
    (_value(encryptedDEKSource=b"x" * 1025), "encryptedDEKSource is 1025 bytes"),
    (_value(keyID=""), "keyID is 0 bytes"),
    (_value(keyID="k" * 1025), "keyID is 1025 bytes"),
    (_value(encryptedDEKSourceType=2), "unknown encryptedDEKSourceType: 2"),
])
def test_parse_applies_the_apiservers_read_checks(value: bytes, reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason):
        storage.parse_etcd_value(value)


def test_offline_decrypt_with_a_seed_from_kleidi(kleidi_factory) -> None:  # type: ignore[no-untyped-def]
    """The seed kleidi wraps and unwraps over the socket opens an apiserver-format etcd value."""
    proc = kleidi_factory()
    seed = os.urandom(32)
    wrapped = proc.encrypt(seed)
    value = storage.encrypt_object(seed, b"k8s\x00secret", "/registry/secrets/ns/name", provider="kleidi",
                                   key_id=wrapped.key_id, encrypted_dek_source=wrapped.ciphertext,
                                   annotations=dict(wrapped.annotations))
    stored = storage.parse_etcd_value(value)
    unwrapped = proc.decrypt(stored.encrypted_dek_source, stored.key_id, stored.annotations)
    assert storage.decrypt_object(stored, unwrapped, "/registry/secrets/ns/name") == b"k8s\x00secret"
