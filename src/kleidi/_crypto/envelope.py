"""kleidi's ciphertext envelope: what Encrypt returns to the apiserver and etcd stores.

Format 1, big-endian::

    offset 0  magic        1 byte   0x6B ("k"): tells a kleidi envelope from anything else
    offset 1  format       1 byte   0x01; a reader refuses formats it does not know
    offset 2  key version  4 bytes  the backend's KEK version that wrapped the seed
    offset 6  payload      rest     the backend's wrapped seed (local: nonce(12) ‖ ciphertext ‖ tag(16))

The header, the protocol (v2 or v1beta1), the key_id and every annotation are bound into the
backend's authenticated data (:func:`associated_data`), so a ciphertext moved to another key_id,
given other annotations, replayed across protocols or with an edited header fails to decrypt.

.. warning:: Changing this layout breaks every ciphertext already in etcd. Add a new format number.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from kleidi.errors import InvalidRequest

MAGIC = 0x6B
FORMAT_V1 = 1
KNOWN_FORMATS = frozenset({FORMAT_V1})
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
