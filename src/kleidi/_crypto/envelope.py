"""kleidi's ciphertext envelope: what Encrypt returns to the apiserver and etcd stores.

Big-endian::

    offset 0  magic        1 byte   0x6B ("k"): tells a kleidi envelope from anything else
    offset 1  format       1 byte   0x01 or 0x02; a reader refuses formats it does not know
    offset 2  key version  4 bytes  the backend's KEK version that wrapped the seed (format 1) or
                                    the data key (format 2)
    offset 6  payload      rest     format 1: the backend's wrapped seed (local: nonce ‖ ciphertext ‖ tag)
                                    format 2: length(2) ‖ the backend's wrapped data key ‖
                                              nonce(12) ‖ the seed under the data key ‖ tag(16)

The header, the protocol (v2 or v1beta1), the key_id and every annotation make the authenticated
data (:func:`associated_data`), so a ciphertext moved to another key_id, given other annotations,
replayed across protocols or with an edited header fails to decrypt. In format 1 the backend binds
it, so the binding is only as good as the backend's (a Transit key that is not AEAD, a TPM or an
RSA key cannot). In format 2 kleidi binds it itself: the seed is sealed with AES-256-GCM under a
fresh 256-bit data key with that authenticated data, and the backend wraps only the data key (with
the same authenticated data where it can bind it). Every kleidi reads both; which one Encrypt
writes is ``server.envelope_format``.

.. warning:: Changing this layout breaks every ciphertext already in etcd. Add a new format number.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from kleidi._crypto import aead
from kleidi.errors import DecryptionFailed, InvalidRequest

MAGIC = 0x6B
FORMAT_V1 = 1
FORMAT_V2 = 2
KNOWN_FORMATS = frozenset({FORMAT_V1, FORMAT_V2})
_WRAPPED_LENGTH = struct.Struct(">H")
HEADER = struct.Struct(">BBI")
HEADER_SIZE = HEADER.size
MAX_KEY_VERSION = 2**32 - 1
_AAD_LABEL = b"kleidi envelope aad\x00"


@dataclass(frozen=True)
class Envelope:
    """A parsed envelope. ``payload`` is opaque to everything but the backend that wrote it."""

    format: int
    key_version: int
    payload: bytes

    def header(self) -> bytes:
        return HEADER.pack(MAGIC, self.format, self.key_version)

    def to_bytes(self) -> bytes:
        return self.header() + self.payload


def parse(ciphertext: bytes) -> Envelope:
    """Split a ciphertext into its envelope fields; :class:`InvalidRequest` if it is not one."""
    if len(ciphertext) <= HEADER_SIZE:
        raise InvalidRequest(f"ciphertext is {len(ciphertext)} bytes, too short for a kleidi envelope")
    magic, fmt, key_version = HEADER.unpack_from(ciphertext)
    if magic != MAGIC:
        raise InvalidRequest("ciphertext is not a kleidi envelope (bad magic byte)")
    if fmt not in KNOWN_FORMATS:
        raise InvalidRequest(f"ciphertext uses envelope format {fmt}, which this kleidi cannot read "
                             f"(known: {sorted(KNOWN_FORMATS)}); upgrade kleidi")
    return Envelope(format=fmt, key_version=key_version, payload=ciphertext[HEADER_SIZE:])


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def associated_data(envelope_header: bytes, protocol: str, key_id: str,
                    annotations: Mapping[str, bytes]) -> bytes:
    """The authenticated data for one envelope: every field length-prefixed, annotations sorted."""
    parts = [_AAD_LABEL, _field(envelope_header), _field(protocol.encode()), _field(key_id.encode()),
             struct.pack(">I", len(annotations))]
    for key in sorted(annotations):
        parts.append(_field(key.encode()))
        parts.append(_field(bytes(annotations[key])))
    return b"".join(parts)


def new_data_key() -> bytes:
    """A fresh data key for one format-2 envelope."""
    return aead.new_key()


def seal_v2(data_key: bytes, wrapped_data_key: bytes, seed: bytes, aad: bytes) -> bytes:
    """A format-2 payload: the backend's wrapped data key, then the seed sealed under the data key."""
    if not 0 < len(wrapped_data_key) <= 0xFFFF:
        raise ValueError("a wrapped data key is 1 to 65535 bytes")
    return _WRAPPED_LENGTH.pack(len(wrapped_data_key)) + wrapped_data_key + aead.seal(data_key, seed, aad)


def split_v2(payload: bytes) -> tuple[bytes, bytes]:
    """(wrapped data key, sealed seed) of a format-2 payload; :class:`DecryptionFailed` if it does not
    parse (an edited length is tampering like any other)."""
    if len(payload) < _WRAPPED_LENGTH.size:
        raise DecryptionFailed()
    (length,) = _WRAPPED_LENGTH.unpack_from(payload)
    rest = payload[_WRAPPED_LENGTH.size:]
    if length == 0 or len(rest) < length + aead.OVERHEAD + 1:
        raise DecryptionFailed()
    return rest[:length], rest[length:]


def open_v2(data_key: bytes, sealed_seed: bytes, aad: bytes) -> bytes:
    """The seed of a format-2 payload; :class:`DecryptionFailed` unless it authenticates."""
    if len(data_key) != aead.KEY_SIZE:
        raise DecryptionFailed()
    return aead.open_sealed(data_key, sealed_seed, aad)
