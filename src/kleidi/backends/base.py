"""The one interface every backend implements.

A backend wraps and unwraps a seed with a KEK it names by a version number, and lists the key
versions it can use. It knows nothing of gRPC, key_id rules, annotations or the envelope: the
service layer (:mod:`kleidi.service`) owns those.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

FileStamp = tuple[int, int, int, int]

MAX_PLAINTEXT_SIZE = 512
"""The largest seed a backend is asked to wrap (the apiserver sends 32 bytes); an unwrap that
returns more (or nothing) is a malformed answer."""


def stat_stamp(st: os.stat_result) -> FileStamp:
    """What changes when a file is rewritten or replaced: device, inode, mtime, size."""
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def file_stamp(path: Path | None) -> FileStamp | None:
    """:func:`stat_stamp` of a file (following symlinks), or None if it is unset or unreadable."""
    if path is None:
        return None
    try:
        return stat_stamp(path.stat())
    except OSError:
        return None


@dataclass(frozen=True)
class KeyVersion:
    """One KEK version, as the service sees it."""

    key_id: str
    """The opaque id reported to the apiserver (see :func:`kleidi._crypto.keyid.derive_key_id`)."""
    version: int
    """The backend's version number; stored in the envelope header (0 .. 2**32-1)."""


@dataclass(frozen=True)
class KeySet:
    """The backend's keys at one moment."""

    current: KeyVersion
    """The version new seeds are wrapped with; its key_id is what Status reports."""
    usable: Mapping[str, KeyVersion]
    """Every version that can still unwrap, by key_id (includes ``current``)."""
    retired: Mapping[str, KeyVersion] = field(default_factory=dict)
    """Versions that existed but can no longer unwrap, by key_id (kept so errors can say "retired")."""
    generation: object = None
    """Changes whenever the backend's key material changes (e.g. the keyring file's identity)."""


class Backend(ABC):
    """A KEK holder. Methods may be called concurrently from many requests.

    All methods are coroutines: a backend that calls a blocking SDK runs it in a thread, so that a
    slow backend never blocks Status.
    """

    kind: ClassVar[str]
    retired_fix: ClassVar[str] = ("if the objects stored under it are still needed, restore that key version in the "
                                  "backend; else delete and re-create them")
    """What an operator can do about a retired key_id: only they can bring a version back."""

    @abstractmethod
    async def load_keys(self, force: bool = False) -> KeySet:
        """Return the current key set, re-reading the backend only if it changed (always if ``force``).

        Called at start and every ``refresh_interval`` in the background; ``force`` on SIGHUP.

        :raises BackendUnavailable: the backend cannot be reached now.
        :raises KeyringError: the key store is malformed or unsafe.
        """

    @abstractmethod
    async def wrap(self, key: KeyVersion, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt ``plaintext`` (a seed, at most 512 bytes) under ``key``, binding ``aad``.

        :returns: an opaque payload the same backend's :meth:`unwrap` reverses.
        :raises BackendUnavailable: the backend cannot be used now.
        """

    @abstractmethod
    async def unwrap(self, key: KeyVersion, payload: bytes, aad: bytes) -> bytes:
        """Reverse :meth:`wrap`.

        :raises DecryptionFailed: the payload or ``aad`` does not authenticate (opaque by design).
        :raises RetiredKey: the version can no longer unwrap.
        :raises BackendUnavailable: the backend cannot be used now.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections and key material; idempotent."""

    def describe(self) -> str:
        """A one-line, non-secret description for logs (e.g. the keyring path)."""
        return self.kind
