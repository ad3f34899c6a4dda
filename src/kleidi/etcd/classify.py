"""How one etcd value is stored, from its provider prefix alone (kms-protocol.md §4.1).

Classes: ``plaintext`` (identity: protobuf ``k8s\\0`` or JSON), ``aescbc``, ``aesgcm``, ``secretbox``,
``kms-v1``, ``kms-v2`` (with the EncryptedObject's key_id, and the kleidi key version when the key_id is
one kleidi made), and ``unknown`` (another ``k8s:enc:`` prefix, a KMS v2 value whose EncryptedObject
does not decode, or bytes that are none of these). Nothing is decrypted.

Provider and key names are read up to the next ``:``. KMS v2 names cannot contain one (the apiserver
validates that); an aescbc/aesgcm/secretbox key name or a KMS v1 name that does would be cut short.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from kleidi._crypto import kmsv2_storage
from kleidi.errors import InvalidRequest

PLAINTEXT, AESCBC, AESGCM, SECRETBOX, KMS_V1, KMS_V2, UNKNOWN = (
    "plaintext", "aescbc", "aesgcm", "secretbox", "kms-v1", "kms-v2", "unknown")
CLASSES = (PLAINTEXT, AESCBC, AESGCM, SECRETBOX, KMS_V1, KMS_V2, UNKNOWN)

_PREFIXES = ((b"k8s:enc:aescbc:v1:", AESCBC), (b"k8s:enc:aesgcm:v1:", AESGCM),
             (b"k8s:enc:secretbox:v1:", SECRETBOX), (b"k8s:enc:kms:v1:", KMS_V1))
# kleidi._crypto.keyid.derive_key_id: kleidi:<backend>:v<version>:<base64url of 24 bytes, unpadded>
_KLEIDI_KEY_ID = re.compile(r"kleidi:[^:]+:v([0-9]+):[A-Za-z0-9_-]{32}")


class KeyState(StrEnum):
    """A KMS v2 key_id compared with what kleidi reports (``kleidi scan --endpoint/--config``)."""

    CURRENT = "current"
    """The key_id kleidi encrypts with now."""
    OLD = "old"
    """A version kleidi can still decrypt, but not the current one: migrate these objects."""
    RETIRED = "retired"
    """A version that was retired: these objects can no longer be read."""
    UNKNOWN = "unknown"
    """Not a key_id this kleidi knows: another plugin, another keyring, or a deleted version."""
    UNCHECKED = "unchecked"
    """No kleidi to compare with was given."""


@dataclass(frozen=True)
class Stored:
    """What the stored bytes say about one value; never any of its content."""

    cls: str
    provider: str | None = None
    """The provider (KMS) or key (aescbc, aesgcm, secretbox) name from the prefix."""
    key_id: str | None = None
    """KMS v2 only: the EncryptedObject's keyID."""
    encoding: str | None = None
    """plaintext only: ``protobuf`` or ``json``."""


def kleidi_key_version(key_id: str) -> int | None:
    """The KEK version in a key_id kleidi derived (:func:`kleidi._crypto.keyid.derive_key_id`), else None."""
    match = _KLEIDI_KEY_ID.fullmatch(key_id)
    return int(match.group(1)) if match else None


def _name(rest: bytes) -> str | None:
    name, sep, _ = rest.partition(b":")
    return name.decode(errors="replace") if sep and name else None


def classify(value: bytes) -> Stored:
    """Classify one stored value by its prefix (and, for KMS v2, its EncryptedObject)."""
    if value.startswith(b"k8s\x00"):
        return Stored(PLAINTEXT, encoding="protobuf")
    if value[:1] == b"{":
        return Stored(PLAINTEXT, encoding="json")
    if value.startswith(kmsv2_storage.PREFIX):
        try:
            obj = kmsv2_storage.parse_etcd_value(value)
        except InvalidRequest:
            return Stored(UNKNOWN, provider=_name(value[len(kmsv2_storage.PREFIX):]))
        return Stored(KMS_V2, provider=obj.provider, key_id=obj.key_id)
    for prefix, cls in _PREFIXES:
        if value.startswith(prefix):
            provider = _name(value[len(prefix):])
            return Stored(cls, provider=provider) if provider else Stored(UNKNOWN)
    return Stored(UNKNOWN)


def resource_of(key: bytes, prefix: bytes) -> tuple[str, str]:
    """``(resource, group)`` of an etcd key: ``/registry/secrets/ns/name`` is ``("secrets", "")``;
    ``/registry/apiregistration.k8s.io/apiservices/name`` is ``("apiservices", "apiregistration.k8s.io")``.

    The group is known only where the apiserver puts it into the path (a first segment with a dot:
    CRDs and some aggregated types); built-in types of named groups (deployments) are stored under
    their resource alone and are reported so."""
    rest = key[len(prefix):].lstrip(b"/") if key.startswith(prefix) else key.lstrip(b"/")
    parts = rest.split(b"/", 2)
    first = parts[0].decode(errors="replace")
    if "." in first and len(parts) > 2:
        return parts[1].decode(errors="replace"), first
    return first, ""
