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
from typing import Any, ClassVar

from kleidi._crypto.keyid import derive_key_id
from kleidi.checks import Check

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

    @classmethod
    def derive(cls, backend: str, identity: str, version: int, created: str) -> KeyVersion:
        """The one way a backend makes its key versions: from what it reports about the key (which
        key, within which store: ``identity``; its ``version``; when that version was ``created``,
        so that a key re-created under the same name never repeats a key_id)."""
        return cls(derive_key_id(backend, identity, version, created), version)


@dataclass(frozen=True)
class UnboundAAD:
    """Why a backend's unwrap cannot check the authenticated data (key_id, annotations, protocol).

    Envelope format 1 relies on the backend for that binding; format 2 binds it in kleidi itself, so
    the service warns only under format 1."""

    what: str
    """The key that cannot bind it, e.g. "Transit key k is of type rsa-2048"."""
    instead: str | None = None
    """What to use instead in the backend, e.g. "prefer aes256-gcm96"."""


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
    unbound_aad: UnboundAAD | None = None
    """Set when unwrap cannot authenticate ``aad`` (see :class:`UnboundAAD`); None when it does."""


class Backend(ABC):
    """A KEK holder. Methods may be called concurrently from many requests.

    All methods are coroutines: a backend that calls a blocking SDK runs it in a thread, so that a
    slow backend never blocks Status.
    """

    kind: ClassVar[str]
    settings_model: ClassVar[type[Any]]
    """The backend's pydantic settings model (a kleidi.settings.types.BackendSettingsBase with
    ``kind: Literal["<kind>"]``): the registry puts it into the config's ``backend`` union."""
    requires: ClassVar[tuple[str, ...]] = ()
    """Modules of the backend's pip extra; if one is missing, the backend is reported unusable
    with the extra's install command."""
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

    def discard_created(self) -> None:  # noqa: B027 - optional hook, most backends create nothing
        """Start-up failed: remove what this backend created for it (a keyring made because
        create_if_missing was set), so that a second try does not silently reuse it."""

    async def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections and key material; idempotent."""

    @classmethod
    def cli_commands(cls) -> list[tuple[str, Any]]:
        """The backend's own ``kleidi`` commands, as (group, click command): group "" for a top-level
        command, or the name of a core group (``policy``)."""
        return []

    @classmethod
    def setting_flags(cls, command: str) -> list[Any]:
        """Flags (click options) this backend adds to the core ``command`` (``serve``, ``config check``);
        each option's name is the backend setting it overrides (``keyring`` sets ``backend.keyring``)."""
        return []

    @classmethod
    def lifecycle_hint(cls, command: str, settings: Any, version: int | None) -> str | None:
        """What to run instead of another backend's key command (``rotate``, ``retire``, ``keygen``,
        ``keys``) under this backend's config; None if there is nothing specific to say."""
        return None

    @classmethod
    def file_checks(cls, settings: Any) -> list[Check]:
        """``kleidi doctor``'s checks of the files this backend's settings name (keyring, credentials);
        runs without the backend's extra."""
        return []

    async def preflight(self) -> list[Check]:
        """``kleidi doctor``'s checks before the first key load (e.g. clock skew against the server)."""
        return []

    def describe(self) -> str:
        """A one-line, non-secret description for logs (e.g. the keyring path)."""
        return self.kind
