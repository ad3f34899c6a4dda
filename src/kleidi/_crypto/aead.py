"""AES-256-GCM with a fresh random 96-bit nonce per seal.

Invariant: a (key, nonce) pair is never used twice. Nonces are 12 random bytes from the OS CSPRNG;
with a KEK that wraps one seed per apiserver start or rotation, the birthday bound (2**32 seals per
key for a 2**-32 collision chance) is out of reach.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kleidi.errors import DecryptionFailed

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE


def new_key() -> bytes:
    """A fresh AES-256 key from the OS CSPRNG."""
    return os.urandom(KEY_SIZE)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt and authenticate; returns ``nonce(12) ‖ ciphertext ‖ tag(16)``."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`seal`. Raises :class:`DecryptionFailed` on any integrity failure."""
    if len(sealed) < OVERHEAD:
        raise DecryptionFailed()
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)
    except InvalidTag:
        raise DecryptionFailed() from None
