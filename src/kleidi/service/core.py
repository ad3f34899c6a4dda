"""Encrypt and Decrypt as kleidi defines them, for any backend and either protocol.

Encrypt wraps the seed with the current KEK version inside kleidi's envelope
(:mod:`kleidi._crypto.envelope`); Decrypt checks the request against what kleidi produced (key_id
known and not retired, annotations exactly kleidi's, envelope format and key version matching
the key_id) before it calls the backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kleidi._crypto import envelope
from kleidi.backends.base import KeySet, KeyVersion
from kleidi.errors import BackendUnavailable, DecryptionFailed, InvalidRequest, RetiredKey, UnknownKey
from kleidi.service import validation
from kleidi.service.keys import KeyManager

V2 = "v2"
V1BETA1 = "v1beta1"

def annotations_for(envelope_format: int) -> dict[str, bytes]:
    """What Encrypt returns (KMS v2): marks the value in etcd as kleidi's, and its envelope format.
    Stored in plaintext by the apiserver and bound into the envelope's authenticated data."""
    return {"envelope.kleidi.io": str(envelope_format).encode()}



def _annotation_difference(annotations: Mapping[str, bytes], expected: Mapping[str, bytes]) -> str:
    missing = sorted(set(expected) - set(annotations))
    extra = sorted(set(annotations) - set(expected))[:4]
    changed = sorted(k for k in set(expected) & set(annotations) if annotations[k] != expected[k])
    parts = [f"{label} {', '.join(keys)}" for label, keys in
             (("missing", missing), ("unexpected", [k[:64] for k in extra]), ("changed value of", changed)) if keys]
    return "; ".join(parts)


@dataclass(frozen=True)
class Sealed:
    ciphertext: bytes
    key_id: str
    annotations: Mapping[str, bytes]


class EnvelopeService:
    def __init__(self, keys: KeyManager, envelope_format: int = envelope.FORMAT_V1) -> None:
        self._keys = keys
        self._format = envelope_format  # what Encrypt writes; Decrypt reads every known format

    def _key_set(self) -> KeySet:
        key_set = self._keys.key_set
        if key_set is None:
            raise BackendUnavailable(f"no keys loaded yet: {self._keys.health.detail}")
        return key_set


    async def encrypt(self, plaintext: bytes, protocol: str = V2) -> Sealed:
        validation.check_plaintext(plaintext)
        key = self._key_set().current
        annotations = annotations_for(self._format) if protocol == V2 else {}
        header = envelope.Envelope(self._format, key.version, b"").header()
        aad = envelope.associated_data(header, protocol, key.key_id, annotations)
        if self._format == envelope.FORMAT_V1:
            payload = await self._wrap(key, plaintext, aad)
        else:  # kleidi binds the authenticated data itself; the backend wraps only the data key
            data_key = envelope.new_data_key()
            payload = envelope.seal_v2(data_key, await self._wrap(key, data_key, aad), plaintext, aad)
        ciphertext = header + payload
        if protocol == V2 and len(ciphertext) > validation.MAX_CIPHERTEXT_SIZE:
            raise InvalidRequest(f"wrapped seed is {len(ciphertext)} bytes, over the apiserver's "
                                 f"{validation.MAX_CIPHERTEXT_SIZE}; send a shorter plaintext")
        return Sealed(ciphertext=ciphertext, key_id=key.key_id, annotations=annotations)

    async def _wrap(self, key: KeyVersion, plaintext: bytes, aad: bytes) -> bytes:
        backend = self._keys.backend
        payload = await self._keys.call_backend("wrap", lambda: backend.wrap(key, plaintext, aad))
        if not isinstance(payload, bytes) or not payload or len(payload) > 0xFFFF:
            raise BackendUnavailable(f"the {backend.kind} backend returned a malformed ciphertext")
        return payload

    def _resolve(self, key_set: KeySet, key_id: str) -> KeyVersion:
        key = key_set.usable.get(key_id)
        if key is not None:
            return key
        if key_id in key_set.retired:
            raise RetiredKey(f"key_id {key_id} has been retired; its ciphertexts can no longer be decrypted",
                             fix=self._keys.backend.retired_fix)
        raise UnknownKey(f"key_id {key_id[:128]} was not produced by this kleidi's {self._keys.backend.kind} "
                         "backend (or names a key version it can no longer use)")

    async def decrypt(self, ciphertext: bytes, key_id: str, annotations: Mapping[str, bytes]) -> bytes:
        """KMS v2 Decrypt: every check runs before the backend is called."""
        validation.check_ciphertext(ciphertext)
        validation.check_key_id(key_id)
        validation.check_annotations(annotations)
        sealed = envelope.parse(ciphertext)
        expected = annotations_for(sealed.format)
        if dict(annotations) != expected:
            raise InvalidRequest(f"annotations differ from the ones kleidi returned at Encrypt: "
                                 f"{_annotation_difference(annotations, expected)}")
        try:
            key = self._resolve(self._key_set(), key_id)
        except UnknownKey:
            # Another control-plane node may have seen a rotation before this one: look again, once.
            await self._keys.refresh_soon()
            key = self._resolve(self._key_set(), key_id)
        if sealed.key_version != key.version:
            raise DecryptionFailed()
        aad = envelope.associated_data(sealed.header(), V2, key_id, annotations)
        return await self._open(key, sealed, aad)

    async def _open(self, key: KeyVersion, sealed: envelope.Envelope, aad: bytes) -> bytes:
        if sealed.format == envelope.FORMAT_V1:
            return await self._unwrap(key, sealed.payload, aad)
        wrapped_data_key, sealed_seed = envelope.split_v2(sealed.payload)
        seed = envelope.open_v2(await self._unwrap(key, wrapped_data_key, aad), sealed_seed, aad)
        if not 0 < len(seed) <= validation.MAX_PLAINTEXT_SIZE:
            raise DecryptionFailed()
        return seed

    async def _unwrap(self, key: KeyVersion, payload: bytes, aad: bytes) -> bytes:
        backend = self._keys.backend
        plaintext = await self._keys.call_backend("unwrap", lambda: backend.unwrap(key, payload, aad))
        if not isinstance(plaintext, bytes) or not 0 < len(plaintext) <= validation.MAX_PLAINTEXT_SIZE:
            raise BackendUnavailable(f"the {backend.kind} backend returned a malformed plaintext")
        return plaintext

    async def decrypt_v1beta1(self, ciphertext: bytes) -> bytes:
        """KMS v1 Decrypt: no key_id on the wire, so the envelope's key version selects the KEK."""
        validation.check_ciphertext(ciphertext)
        sealed = envelope.parse(ciphertext)
        key_set = self._key_set()
        key = next((k for k in key_set.usable.values() if k.version == sealed.key_version), None)
        if key is None:
            if any(k.version == sealed.key_version for k in key_set.retired.values()):
                raise RetiredKey(f"KEK version {sealed.key_version} has been retired; its ciphertexts can no "
                                 "longer be decrypted", fix=self._keys.backend.retired_fix)
            raise UnknownKey(f"no KEK version {sealed.key_version} in this kleidi's {self._keys.backend.kind} backend")
        aad = envelope.associated_data(sealed.header(), V1BETA1, key.key_id, {})
        return await self._open(key, sealed, aad)
