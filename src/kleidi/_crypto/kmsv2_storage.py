"""The apiserver's KMS v2 storage format: decrypt (and, for tests, produce) an etcd value offline.

kms-protocol.md §4: an etcd value is ``k8s:enc:kms:v2:<provider name>:`` followed by a protobuf
``EncryptedObject``. Its ``encryptedDEKSource`` is what the plugin's Encrypt returned; the plugin's
Decrypt gives back the seed (type 1) or the DEK itself (type 0). The object bytes are AES-GCM
sealed with the etcd key as authenticated data:

* type 1 (HKDF_SHA256_XNONCE_AES_GCM_SEED, Kubernetes 1.29+): ``info(32) ‖ nonce(12) ‖ ct ‖ tag``
  and DEK = HKDF-Expand-SHA256(seed, info, 32), no extract step, no salt;
* type 0 (AES_GCM_KEY, 1.27/1.28): ``nonce(12) ‖ ct ‖ tag`` under the DEK.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from google.protobuf.message import DecodeError

from kleidi._proto.kmsv2 import encrypted_object_pb2 as pb
from kleidi.errors import DecryptionFailed, InvalidRequest

PREFIX = b"k8s:enc:kms:v2:"
TYPE_AES_GCM_KEY = pb.AES_GCM_KEY
TYPE_HKDF_SEED = pb.HKDF_SHA256_XNONCE_AES_GCM_SEED
INFO_SIZE = 32
NONCE_SIZE = 12
MIN_SEED_SIZE = 32
MAX_DEK_SOURCE_SIZE = 1024
MAX_KEY_ID_SIZE = 1024


@dataclass(frozen=True)
class StoredObject:
    """One parsed etcd value: the provider name and the EncryptedObject fields."""

    provider: str
    encrypted_data: bytes
    key_id: str
    encrypted_dek_source: bytes
    annotations: dict[str, bytes] = field(default_factory=dict)
    dek_source_type: int = TYPE_HKDF_SEED


def parse_etcd_value(value: bytes) -> StoredObject:
    """Parse ``k8s:enc:kms:v2:<name>:<EncryptedObject>`` and apply the apiserver's read checks (§2.5)."""
    if not value.startswith(PREFIX):
        raise InvalidRequest("value is not KMS v2 encrypted (no k8s:enc:kms:v2: prefix)")
    name, sep, payload = value[len(PREFIX):].partition(b":")
    if not sep or not name:
        raise InvalidRequest("value has no provider name after k8s:enc:kms:v2:")
    obj = pb.EncryptedObject()
    try:
        obj.ParseFromString(payload)
    except DecodeError as exc:
        raise InvalidRequest(f"EncryptedObject does not decode: {exc}") from None
    if obj.encryptedDEKSourceType not in (TYPE_AES_GCM_KEY, TYPE_HKDF_SEED):
        raise InvalidRequest(f"unknown encryptedDEKSourceType: {obj.encryptedDEKSourceType}")
    if not obj.encryptedData:
        raise InvalidRequest("encryptedData is empty")
    if not 0 < len(obj.encryptedDEKSource) <= MAX_DEK_SOURCE_SIZE:
        raise InvalidRequest(f"encryptedDEKSource is {len(obj.encryptedDEKSource)} bytes, want 1..1024")
    if not 0 < len(obj.keyID.encode()) <= MAX_KEY_ID_SIZE:
        raise InvalidRequest(f"keyID is {len(obj.keyID.encode())} bytes, want 1..1024")
    return StoredObject(provider=name.decode(), encrypted_data=obj.encryptedData, key_id=obj.keyID,
                        encrypted_dek_source=obj.encryptedDEKSource,
                        annotations=dict(obj.annotations), dek_source_type=obj.encryptedDEKSourceType)


def _hkdf_expand(seed: bytes, info: bytes) -> bytes:
    return HKDFExpand(algorithm=hashes.SHA256(), length=32, info=info).derive(seed)


def decrypt_object(obj: StoredObject, dek_source: bytes, etcd_key: str) -> bytes:
    """Open ``obj.encrypted_data`` with the plaintext the plugin's Decrypt returned.

    ``etcd_key`` is the full key including the prefix, e.g. ``/registry/secrets/default/s1``.
    """
    data, aad = obj.encrypted_data, etcd_key.encode()
    try:
        if obj.dek_source_type == TYPE_HKDF_SEED:
            if len(dek_source) < MIN_SEED_SIZE:
                raise InvalidRequest(f"invalid seed length {len(dek_source)} used for key generation")
            dek = _hkdf_expand(dek_source, data[:INFO_SIZE])
            body = data[INFO_SIZE:]
        else:
            dek, body = dek_source, data
        plaintext: bytes = AESGCM(dek).decrypt(body[:NONCE_SIZE], body[NONCE_SIZE:], aad)
        return plaintext
    except (InvalidTag, ValueError):
        raise DecryptionFailed("object did not authenticate: wrong seed, wrong etcd key, or tampered") from None


def encrypt_object(seed: bytes, plaintext: bytes, etcd_key: str, *, provider: str, key_id: str,
                   encrypted_dek_source: bytes, annotations: dict[str, bytes] | None = None) -> bytes:
    """Produce an etcd value exactly as a Kubernetes 1.29+ apiserver writes it (type 1)."""
    info, nonce = os.urandom(INFO_SIZE), os.urandom(NONCE_SIZE)
    sealed = AESGCM(_hkdf_expand(seed, info)).encrypt(nonce, plaintext, etcd_key.encode())
    obj = pb.EncryptedObject(encryptedData=info + nonce + sealed, keyID=key_id,
                             encryptedDEKSource=encrypted_dek_source, annotations=annotations or {},
                             encryptedDEKSourceType=TYPE_HKDF_SEED)
    return PREFIX + provider.encode() + b":" + obj.SerializeToString(deterministic=True)
