"""The TPM 2.0 backend: KEK versions that exist only inside TPMs, one TPM per control-plane node.

Each node keeps a key store file (:mod:`kleidi.backends.tpm.store`) of TPM blobs that only its own
TPM can load; a version is created once in one TPM and carried to the others by TPM2_Duplicate /
TPM2_Import (``kleidi tpm enrol-request | enrol | import``), so every node reports the same key_ids
and decrypts what any other wrote. A seed is sealed with a fresh data key (AES-256-GCM, binding the
aad) and the TPM encrypts that data key (:mod:`kleidi.backends.tpm.device`). Docs:
docs/backends/tpm.md.

Importing this module needs no tpm2-pytss: the settings model and doctor's file checks work without
the ``tpm`` extra; the device module is imported at the first TPM call.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from kleidi.backends.base import FileStamp, KeySet, KeyVersion, stat_stamp
from kleidi.backends.batching import Coalescer
from kleidi.backends.threaded import ThreadedBackend
from kleidi.backends.tpm.store import DOCS, RETIRED, KekEntry, KeyStore, check_store_file, read_store, tpm_lock_path
from kleidi.checks import FAIL, PASS, Check, private_file
from kleidi.errors import BackendUnavailable, ConfigError, InvalidValue, KeyringError, KleidiError, RetiredKey
from kleidi.settings.types import BackendSettingsBase

if TYPE_CHECKING:
    from kleidi.backends.tpm.device import Tpm

RETIRED_FIX = ("if the objects stored under it are still needed, restore that version's entry from a key store "
               "backup made on this node before `kleidi tpm retire` (it loads only in this node's TPM, and only "
               "if the TPM was not cleared since); else delete and re-create them")

_TCTI_RE = re.compile(r"(device|swtpm|mssim|tabrmd)(:[^\s]*)?")


def check_tcti(value: Any) -> Any:
    if isinstance(value, str) and not _TCTI_RE.fullmatch(value.strip()):
        raise InvalidValue(f"{value!r} is not a TCTI kleidi supports",
                           fix="use device:/dev/tpmrm0 (the kernel's resource manager), tabrmd, "
                               "swtpm:host=127.0.0.1,port=2321 or mssim:host=127.0.0.1,port=2321")
    return value.strip() if isinstance(value, str) else value


def check_pcrs(value: list[int]) -> list[int]:
    if len(set(value)) != len(value):
        raise InvalidValue("a PCR is listed twice", fix="list each PCR once, e.g. [7]")
    return sorted(value)


Tcti = Annotated[str, BeforeValidator(check_tcti)]
Pcrs = Annotated[list[Annotated[int, Field(ge=0, le=23)]], AfterValidator(check_pcrs)]


class TpmBackendSettings(BackendSettingsBase):
    """KEK versions inside this node's TPM 2.0 (docs/backends/tpm.md)."""

    kind: Literal["tpm"] = "tpm"
    """Backend type."""

    tcti: Tcti = "device:/dev/tpmrm0"
    """How to reach the TPM: device:/dev/tpmrm0 (the kernel resource manager; kleidi's user needs the
    tss group), tabrmd, or swtpm:host=...,port=... / mssim:host=...,port=... for a software TPM."""

    key_store: Path = Path("/var/lib/kleidi/tpm-keystore.json")
    """This node's key store: the KEK versions as blobs only this node's TPM can load. Mode 0600,
    owned by kleidi's user. Create it with `kleidi tpm init` (first node) or `kleidi tpm import`."""

    mechanism: Literal["aes-cfb", "rsa-oaep"] = "aes-cfb"
    """How new versions use the TPM: aes-cfb (an AES-256 key, TPM2_EncryptDecrypt2) or rsa-oaep (an
    RSA-2048 key, TPM2_RSA_Decrypt) for TPMs without the symmetric commands. Existing versions keep theirs."""

    pcrs: Pcrs = []
    """PCRs whose values at key creation new versions are bound to (e.g. [7], the secure boot state);
    empty: no binding. A changed PCR makes the key unusable until the node is re-enrolled."""

    pcr_bank: Literal["sha1", "sha256", "sha384"] = "sha256"
    """The PCR bank `pcrs` are read from."""

    owner_auth_file: Path | None = None
    """File holding the TPM owner hierarchy's auth value (none: the owner auth is empty). Mode 0600."""

    key_auth_file: Path | None = None
    """File holding the auth value new key versions get and every use needs (none: empty). Mode 0600."""


def read_auth_file(path: Path | None, setting: str) -> bytes:
    """An auth value from a private file (one trailing newline dropped); never logged, never in argv."""
    if path is None:
        return b""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"backend.{setting} {path} is not a regular file", fix="point it at the auth file")
        if st.st_mode & 0o077:
            raise ConfigError(f"backend.{setting} {path} has mode {stat.S_IMODE(st.st_mode):04o}, readable by "
                              "others", fix=f"chmod 600 {path}")
        value = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"backend.{setting} {path} cannot be read: {exc.strerror}",
                          fix="create the file or fix the path; kleidi's user must read it") from None
    return value[:-1] if value.endswith(b"\n") else value


def open_tpm(settings: TpmBackendSettings) -> Tpm:
    """The TPM these settings name, with their auth values; nothing is opened until the first call."""
    from kleidi.backends.tpm.device import Auth, Tpm

    auth = Auth(owner=read_auth_file(settings.owner_auth_file, "owner_auth_file"),
                key=read_auth_file(settings.key_auth_file, "key_auth_file"))
    lock = tpm_lock_path(settings.key_store) if settings.key_store.parent.is_dir() else None
    return Tpm(settings.tcti, auth, lock)


def check_primary(store: KeyStore, primary_public: bytes) -> None:
    """The TPM's storage primary is the one the key store's blobs were made under."""
    from kleidi.backends.tpm.device import CLEARED_FIX, primary_name

    if primary_name(primary_public) != store.storage_primary:
        raise KeyringError("the TPM's storage primary is not the one this key store was made under", fix=CLEARED_FIX)


Call = tuple[KeyVersion, bytes, bytes]
"""One wrap or unwrap: the key version, the plaintext or payload, the aad."""


def _fresh(result: bytes | KleidiError) -> bytes | KleidiError:
    """The same result for another caller; an error as a new instance, never one shared between raises."""
    if isinstance(result, KleidiError):
        return type(result)(result.message, result.fix)
    return result


def _result(result: bytes | KleidiError) -> bytes:
    if isinstance(result, KleidiError):
        raise result
    return result


class TpmBackend(ThreadedBackend):
    """KEK versions in this node's TPM, listed by its key store file (re-read whenever it changes)."""

    kind: ClassVar[str] = "tpm"
    settings_model: ClassVar[type[TpmBackendSettings]] = TpmBackendSettings
    requires: ClassVar[tuple[str, ...]] = ("tpm2_pytss",)
    retired_fix: ClassVar[str] = RETIRED_FIX

    def __init__(self, settings: TpmBackendSettings) -> None:
        # One worker: the TPM runs one command at a time anyway. A deep queue: an apiserver starting up
        # unwraps every stored seed at once, a few milliseconds each.
        super().__init__(workers=1, queue=512)
        self.settings = settings
        # Calls that arrive while the TPM is busy go in one transaction: one storage primary and one key
        # load for the lot, and identical unwraps (an apiserver restart's burst) cost one TPM command.
        self._wraps: Coalescer[Call, bytes] = Coalescer(self._wrap_batch, max_in_flight=1, max_batch=256)
        self._unwraps: Coalescer[Call, bytes] = Coalescer(self._unwrap_batch, max_in_flight=1, max_batch=256)
        self._tpm: Tpm | None = None
        self._store: KeyStore | None = None
        self._key_set: KeySet | None = None
        self._stamp: FileStamp | None = None

    def describe(self) -> str:
        return f"tpm {self.settings.tcti} key store {self.settings.key_store}"

    def _device(self) -> Tpm:
        if self._tpm is None:
            self._tpm = open_tpm(self.settings)
        return self._tpm

    def load_keys_blocking(self, force: bool) -> KeySet:
        stamp = stat_stamp(check_store_file(self.settings.key_store))
        if not force and self._key_set is not None and stamp == self._stamp:
            return self._key_set
        store, st = read_store(self.settings.key_store)
        with self._device().transaction() as tx:  # the TPM is there and still the one the blobs belong to
            _, public = tx.primary()
        check_primary(store, public)
        self._store, self._stamp = store, stat_stamp(st)
        self._key_set = store.key_set(generation=self._stamp)
        return self._key_set

    def _entry(self, key: KeyVersion) -> KekEntry:
        assert self._store is not None, "load_keys runs before any wrap or unwrap"
        entry = self._store.versions.get(key.version)
        if entry is None or entry.state == RETIRED:
            raise RetiredKey(f"key_id {key.key_id} (tpm version {key.version}) has been retired", fix=RETIRED_FIX)
        return entry

    async def wrap(self, key: KeyVersion, plaintext: bytes, aad: bytes) -> bytes:
        return await self._wraps.submit((key, plaintext, aad))

    async def unwrap(self, key: KeyVersion, payload: bytes, aad: bytes) -> bytes:
        return await self._unwraps.submit((key, payload, aad))

    async def _wrap_batch(self, calls: Sequence[Call]) -> list[bytes | KleidiError]:
        return await self._run(self._batch_blocking, "seal", calls)

    async def _unwrap_batch(self, calls: Sequence[Call]) -> list[bytes | KleidiError]:
        return await self._run(self._batch_blocking, "open", calls)

    def wrap_blocking(self, key: KeyVersion, plaintext: bytes, aad: bytes) -> bytes:
        return _result(self._batch_blocking("seal", [(key, plaintext, aad)])[0])

    def unwrap_blocking(self, key: KeyVersion, payload: bytes, aad: bytes) -> bytes:
        return _result(self._batch_blocking("open", [(key, payload, aad)])[0])

    def _batch_blocking(self, operation: str, calls: Sequence[Call]) -> list[bytes | KleidiError]:
        """Seal or open every call in one TPM transaction; one result or error per call, in order."""
        from kleidi.backends.tpm.device import open_sealed, seal

        results: list[bytes | KleidiError | None] = [None] * len(calls)
        by_version: dict[int, list[int]] = {}
        for index, (key, _, _) in enumerate(calls):
            try:
                self._entry(key)
                by_version.setdefault(key.version, []).append(index)
            except KleidiError as exc:
                results[index] = exc
        try:
            with self._device().transaction() as tx:
                primary, _ = tx.primary()
                for indexes in by_version.values():
                    entry = self._entry(calls[indexes[0]][0])
                    kek = tx.load_kek(primary, entry)
                    done: dict[tuple[bytes, bytes], bytes | KleidiError] = {}
                    for index in indexes:
                        _, data, aad = calls[index]
                        if operation == "open" and (data, aad) in done:  # the same payload: the same answer
                            results[index] = _fresh(done[data, aad])
                            continue
                        try:
                            results[index] = (seal if operation == "seal" else open_sealed)(tx, kek, entry, data, aad)
                        except KleidiError as exc:
                            results[index] = exc
                        done[data, aad] = results[index]  # type: ignore[assignment]
                    tx.flush(kek)
        except KleidiError as exc:  # the TPM, the primary or a key load failed: every call left gets it
            for index, result in enumerate(results):
                if result is None:
                    results[index] = _fresh(exc)
        return [r if r is not None else BackendUnavailable("the TPM call was not made") for r in results]

    def close_blocking(self) -> None:
        if self._tpm is not None:
            self._tpm.disconnect()

    # -- doctor -----------------------------------------------------------------------------------

    @classmethod
    def file_checks(cls, settings: TpmBackendSettings) -> list[Check]:
        try:
            check_store_file(settings.key_store)
            checks = [Check("TPM key store", PASS, f"{settings.key_store}: regular file, mode 0600 or stricter, ours")]
        except KleidiError as exc:
            checks = [Check("TPM key store", FAIL, exc.message, exc.fix or "")]
        files = (("TPM owner auth file", settings.owner_auth_file), ("TPM key auth file", settings.key_auth_file))
        return checks + [private_file(label, path) for label, path in files if path is not None]

    async def preflight(self) -> list[Check]:
        return await self._run(self._preflight_blocking)

    def _preflight_blocking(self) -> list[Check]:
        from kleidi.backends.tpm.device import required

        try:
            with self._device().transaction() as tx:
                commands, algorithms = tx.supported()
                _, public = tx.primary()
        except KleidiError as exc:
            return [Check("TPM reachable", FAIL, exc.message, exc.fix or "")]
        checks = [Check("TPM reachable", PASS, f"{self.settings.tcti} answers")]
        try:
            store, _ = read_store(self.settings.key_store)
            mechanisms = {e.mechanism for e in store.versions.values() if e.state != RETIRED}
        except KleidiError:
            store, mechanisms = None, set()  # file_checks reports the key store itself
        mechanisms.add(self.settings.mechanism)
        need_commands, need_algorithms = required(mechanisms)
        missing = sorted(need_commands - commands) + sorted(need_algorithms - algorithms)
        if missing:
            checks.append(Check("TPM commands and algorithms", FAIL, f"this TPM lacks {', '.join(missing)}",
                                "aes-cfb needs EncryptDecrypt2; on a TPM without it use mechanism: rsa-oaep "
                                f"({DOCS}#mechanisms)"))
        else:
            checks.append(Check("TPM commands and algorithms", PASS, f"all that {', '.join(sorted(mechanisms))} and "
                                "enrolment need"))
        if store is not None:
            try:
                check_primary(store, public)
                checks.append(Check("TPM storage primary", PASS, "the key store's blobs belong to this TPM"))
            except KleidiError as exc:
                checks.append(Check("TPM storage primary", FAIL, exc.message, exc.fix or ""))
        return checks

    # -- the CLI ----------------------------------------------------------------------------------

    @classmethod
    def cli_commands(cls) -> list[tuple[str, Any]]:
        from kleidi.backends.tpm.cli import tpm

        return [("", tpm)]

    @classmethod
    def lifecycle_hint(cls, command: str, settings: TpmBackendSettings, version: int | None) -> str | None:
        """The `kleidi tpm` command to run instead of a local-keyring command."""
        if command == "rotate":
            return ("on a single node: kleidi tpm rotate; with several nodes: kleidi tpm rotate --stage, enrol the "
                    f"new version on every other node, then kleidi tpm make-current on each ({DOCS}#rotation)")
        if command == "retire":
            return (f"kleidi tpm retire {version or 'VERSION'} on every node, once nothing is encrypted with that "
                    "version any more")
        if command == "keygen":
            return ("kleidi tpm init on the first node; on the others kleidi tpm enrol-request, enrol and import "
                    f"({DOCS}#enrolling-the-other-control-plane-nodes)")
        if command == "keys":
            return "kleidi tpm keys"
        return None
