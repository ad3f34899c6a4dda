"""The TPM backend's key store file: which KEK versions this node's TPM holds, as TPM blobs.

One file per node, mode 0600, owned by kleidi's user, written atomically under a lock (the same
helpers as the local keyring)::

    {"format": "kleidi-tpm-keystore", "format_version": 1, "store_id": "<uuid4>", "current": 2,
     "storage_primary": "<Name of this TPM's storage primary, hex>",
     "versions": [{"version": 1, "created": "...", "state": "retired", "name": "<hex>", ...},
                  {"version": 2, "created": "...", "state": "active", "mechanism": "aes-cfb",
                   "name": "<hex>", "public": "<b64 TPM2B_PUBLIC>", "private": "<b64 TPM2B_PRIVATE>",
                   "policy": ["<use branch hex>", "<duplication branch hex>"], "pcrs": [7], "pcr_bank": "sha256"}]}

``private`` is encrypted by this TPM's storage primary: the file is useless without that TPM.
``store_id`` and each version's ``name`` (the TPM Name, a hash of the key's public area, the same
after duplication) are identical on every enrolled node, so key_ids are too. A retired version keeps
its entry without blobs: its number and key_id are never handed out again.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kleidi.backends.base import KeySet, KeyVersion
from kleidi.backends.local import (
    check_file_safety,
    edit_locked,
    locked_file,
    read_private_file,
    retirable,
    write_atomically,
)
from kleidi.errors import InvalidRequest, KeyringError

KIND = "tpm"
FORMAT = "kleidi-tpm-keystore"
ENROL_REQUEST_FORMAT = "kleidi-tpm-enrol-request"
ENROLMENT_FORMAT = "kleidi-tpm-enrolment"
FORMAT_VERSION = 1
ACTIVE = "active"
RETIRED = "retired"
MECHANISMS = ("aes-cfb", "rsa-oaep")
DOCS = "docs/backends/tpm.md"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


@dataclass
class KekEntry:
    """One KEK version. ``public``/``private`` are marshalled TPM2B_PUBLIC / TPM2B_PRIVATE."""

    version: int
    created: str
    name: str
    mechanism: str
    state: str = ACTIVE
    public: bytes | None = field(default=None, repr=False)
    private: bytes | None = field(default=None, repr=False)
    policy: tuple[str, str] = ("", "")
    pcrs: tuple[int, ...] = ()
    pcr_bank: str = "sha256"
    retired: str | None = None

    def to_dict(self, blobs: bool = True) -> dict[str, Any]:
        item: dict[str, Any] = {"version": self.version, "created": self.created, "state": self.state,
                                "name": self.name, "mechanism": self.mechanism}
        if self.state == ACTIVE:
            item.update(public=_b64(self.public), policy=list(self.policy), pcrs=list(self.pcrs),
                        pcr_bank=self.pcr_bank)
            if blobs:
                item["private"] = _b64(self.private)
        if self.retired is not None:
            item["retired"] = self.retired
        return item

    @classmethod
    def from_dict(cls, item: dict[str, Any], blobs: bool = True) -> KekEntry:
        """Raises KeyError, TypeError, ValueError or binascii.Error on a malformed item."""
        version = int(item["version"])
        if not 0 < version < 2**32:
            raise ValueError(f"version {version} is out of range")
        state, mechanism = str(item["state"]), str(item["mechanism"])
        if state not in (ACTIVE, RETIRED):
            raise ValueError(f"version {version} has unknown state {state!r}")
        if mechanism not in MECHANISMS:
            raise ValueError(f"version {version} has unknown mechanism {mechanism!r}")
        entry = cls(version=version, created=str(item["created"]), name=str(item["name"]), mechanism=mechanism,
                    state=state, retired=item.get("retired"))
        bytes.fromhex(entry.name)
        if state == ACTIVE:
            entry.public = base64.b64decode(item["public"], validate=True)
            if blobs:
                entry.private = base64.b64decode(item["private"], validate=True)
            use, dup = item["policy"]
            entry.policy = (bytes.fromhex(use).hex(), bytes.fromhex(dup).hex())
            entry.pcrs = tuple(int(p) for p in item["pcrs"])
            entry.pcr_bank = str(item["pcr_bank"])
        return entry


@dataclass
class KeyStore:
    """The key store file's contents. Mutate only inside :func:`edit_store`."""

    store_id: str
    current: int
    storage_primary: str
    versions: dict[int, KekEntry]

    def key_version(self, version: int) -> KeyVersion:
        entry = self.versions[version]
        # The Name, not the timestamp alone, makes `created`: unique per key made, and the same on every node.
        return KeyVersion.derive(KIND, self.store_id, version, f"{entry.created}/{entry.name}")

    def key_set(self, generation: object = None) -> KeySet:
        def of(state: str) -> dict[str, KeyVersion]:
            keys = (self.key_version(v) for v, e in self.versions.items() if e.state == state)
            return {k.key_id: k for k in keys}

        return KeySet(current=self.key_version(self.current), usable=of(ACTIVE), retired=of(RETIRED),
                      generation=generation)

    @classmethod
    def new(cls, storage_primary: str, first: KekEntry) -> KeyStore:
        return cls(store_id=str(uuid.uuid4()), current=first.version, storage_primary=storage_primary,
                   versions={first.version: first})

    def next_version(self) -> int:
        return max(self.versions) + 1

    def make_current(self, version: int) -> None:
        entry = self.versions.get(version)
        if entry is None or entry.state != ACTIVE:
            raise InvalidRequest(f"the key store has no active version {version}",
                                 fix="give a version that `kleidi tpm keys` lists as active")
        self.current = version

    def retire(self, version: int) -> KekEntry:
        """Forget a version's blobs; its number and key_id stay taken."""
        entry = retirable(self.versions, version, self.current, "the key store", "kleidi tpm")
        entry.state, entry.public, entry.private, entry.retired = RETIRED, None, None, now()
        return entry

    def to_json(self) -> str:
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "store_id": self.store_id,
               "current": self.current, "storage_primary": self.storage_primary,
               "versions": [self.versions[v].to_dict() for v in sorted(self.versions)]}
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, path: Path) -> KeyStore:
        doc = parse_document(text, FORMAT, f"TPM key store {path}", "restore it from your backup, or re-enrol this "
                             f"node from another node ({DOCS})")
        try:
            versions = entries(doc["versions"], blobs=True)
            store = cls(store_id=str(uuid.UUID(str(doc["store_id"]))), current=int(doc["current"]),
                        storage_primary=bytes.fromhex(str(doc["storage_primary"])).hex(), versions=versions)
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise malformed(f"TPM key store {path}", f"missing or invalid field ({type(exc).__name__}: {exc})",
                            "restore it from your backup") from None
        current = versions.get(store.current)
        if current is None or current.state != ACTIVE:
            raise malformed(f"TPM key store {path}", f"current version {store.current} is missing or retired",
                            "restore it from your backup")
        return store


def malformed(what: str, why: str, fix: str) -> KeyringError:
    return KeyringError(f"{what} is malformed: {why}", fix=fix)


def parse_document(text: str, expected: str, what: str, fix: str) -> dict[str, Any]:
    """A JSON document of one of this backend's formats, or a KeyringError that says what it is instead."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise malformed(what, f"not JSON (line {exc.lineno})", fix) from None
    if not isinstance(doc, dict) or doc.get("format") != expected:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise malformed(what, f"expected \"format\": \"{expected}\", found {found!r}", fix)
    if doc.get("format_version") != FORMAT_VERSION:
        raise KeyringError(f"{what} has format_version {doc.get('format_version')!r}; this kleidi reads "
                           f"{FORMAT_VERSION}", fix="use the kleidi version that wrote it")
    return doc


def entries(items: Any, blobs: bool) -> dict[int, KekEntry]:
    versions: dict[int, KekEntry] = {}
    for item in items:
        entry = KekEntry.from_dict(item, blobs=blobs)
        if entry.version in versions:
            raise ValueError(f"version {entry.version} is repeated")
        versions[entry.version] = entry
    return versions


def check_store_file(path: Path) -> os.stat_result:
    """The key store exists, is a regular file of ours and nobody else can read or replace it."""
    if not os.path.lexists(path):
        raise KeyringError(f"TPM key store {path} does not exist",
                           fix="create it with `kleidi tpm init` on the first node, or `kleidi tpm import` on a "
                               f"node enrolled from another ({DOCS})")
    return check_file_safety(path)


def read_store(path: Path) -> tuple[KeyStore, os.stat_result]:
    text, st = read_private_file(path, "TPM key store", check_store_file)
    return KeyStore.from_json(text, path), st


def create_store(path: Path, store: KeyStore) -> None:
    """Write a new key store. Never overwrites an existing file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with locked_file(path):
        if os.path.lexists(path):
            raise KeyringError(f"TPM key store {path} already exists; kleidi never overwrites a key store",
                               fix="use `kleidi tpm rotate` to add a version, or choose another backend.key_store")
        write_atomically(path, store.to_json())


def edit_store(path: Path) -> contextlib.AbstractContextManager[KeyStore]:
    """Read, let the caller change, and atomically write back the key store, under its lock."""
    return edit_locked(path, read_store)


def tpm_lock_path(path: Path) -> Path:
    """The lock every kleidi process using this key store holds while it has objects in the TPM: without a
    resource manager (swtpm, mssim) the TPM's three transient slots are shared by every process."""
    return path.with_name(f"{path.name}.tpm")
