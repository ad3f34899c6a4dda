"""key_id derivation: opaque, deterministic, never reused, not secret.

``kleidi:<backend>:v<version>:<digest>`` where digest is the unpadded base64url SHA-256 (first 24
bytes) over the backend kind, the key's identity (for the local backend, the keyring's random id),
the version number and that version's creation time. Two processes with the same key file derive
the same key_id; a re-created key (new identity or creation time) never repeats an old one.
"""

from __future__ import annotations

import base64
import hashlib

_LABEL = b"kleidi key_id v1\x00"


def derive_key_id(backend: str, identity: str, version: int, created: str) -> str:
    h = hashlib.sha256(_LABEL)
    for part in (backend, identity, str(version), created):
        data = part.encode()
        h.update(len(data).to_bytes(4, "big") + data)
    digest = base64.urlsafe_b64encode(h.digest()[:24]).rstrip(b"=").decode()
    return f"kleidi:{backend}:v{version}:{digest}"
