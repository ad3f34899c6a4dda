"""The apiserver's rules for what crosses the socket (kms-protocol.md §2), checked on both sides."""

from __future__ import annotations

import re
from collections.abc import Mapping

from kleidi.backends import base as backends
from kleidi.errors import InvalidRequest

MAX_CIPHERTEXT_SIZE = 1024
"""EncryptResponse.ciphertext and DecryptRequest.ciphertext: 1..1024 bytes (encryptedDEKSourceMaxSize)."""
MAX_KEY_ID_SIZE = 1024
"""key_id: 1..1024 bytes (KeyIDMaxSize)."""
MAX_ANNOTATIONS_SIZE = 32 * 1024
"""Sum of len(key) + len(value) over all annotations (annotationsMaxSize)."""
MAX_PLAINTEXT_SIZE = backends.MAX_PLAINTEXT_SIZE
"""The apiserver sends a 32-byte seed (v1beta1: a 32-byte DEK, or "ping"); 512 leaves room for
longer seeds while keeping every envelope under the 1024-byte ciphertext limit."""

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")


def is_fqdn(name: str) -> bool:
    """apimachinery IsFullyQualifiedDomainName: lowercase RFC 1123 subdomain with >= 2 labels."""
    name = name[:-1] if name.endswith(".") else name
    if not name or len(name) > 253 or not _SUBDOMAIN.fullmatch(name):
        return False
    labels = name.split(".")
    return len(labels) >= 2 and all(len(label) <= 63 for label in labels)


def check_plaintext(plaintext: bytes) -> None:
    if not plaintext:
        raise InvalidRequest("plaintext is empty; the apiserver sends a 32-byte seed")
    if len(plaintext) > MAX_PLAINTEXT_SIZE:
        raise InvalidRequest(f"plaintext is {len(plaintext)} bytes; kleidi wraps at most {MAX_PLAINTEXT_SIZE} "
                             "(the apiserver sends 32)")


def check_ciphertext(ciphertext: bytes) -> None:
    if not ciphertext:
        raise InvalidRequest("ciphertext is empty")
    if len(ciphertext) > MAX_CIPHERTEXT_SIZE:
        raise InvalidRequest(f"ciphertext is {len(ciphertext)} bytes, over the apiserver's limit of "
                             f"{MAX_CIPHERTEXT_SIZE}")


def check_key_id(key_id: str) -> None:
    size = len(key_id.encode())
    if size == 0:
        raise InvalidRequest("key_id is empty")
    if size > MAX_KEY_ID_SIZE:
        raise InvalidRequest(f"key_id is {size} bytes, over the limit of {MAX_KEY_ID_SIZE}")


def check_annotations(annotations: Mapping[str, bytes]) -> None:
    total = 0
    for key, value in annotations.items():
        if not is_fqdn(key):
            raise InvalidRequest(f"annotation key {key[:64]!r} is not a lowercase fully qualified domain name "
                                 "with at least two labels")
        total += len(key.encode()) + len(value)
    if total > MAX_ANNOTATIONS_SIZE:
        raise InvalidRequest(f"annotations total {total} bytes, over the limit of {MAX_ANNOTATIONS_SIZE}")


MAX_LOGGED_FIELD = 128
"""Request-supplied text (the apiserver's uid, a key_id) is logged and audited up to this length: the
apiserver sends a 36-character UUID and kleidi's key_ids are shorter than this."""


def loggable(text: str, limit: int = MAX_LOGGED_FIELD) -> str:
    """``text`` as kleidi logs and audits it: at most ``limit`` characters, with control and other
    non-printable characters escaped, so that a caller can neither flood the logs nor forge lines."""
    clipped = text[:limit]
    if not clipped.isprintable():
        clipped = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in clipped)
    return clipped if len(text) <= limit else f"{clipped}...(+{len(text) - limit} chars)"
