"""Everything that talks to the TPM (tpm2-pytss's ESAPI), and the one place its errors become kleidi's.

Each operation is a :class:`Transaction`: it creates the storage primary, loads the objects it needs,
and flushes every one of them when it ends, on errors too, so that nothing stays in the TPM's few
transient slots (swtpm and mssim have no resource manager; other kleidi processes share the slots). A
lock file next to the key store serialises transactions across processes.

Key objects (one per KEK version), under the storage primary, never fixedTPM so they can be
duplicated, always encryptedDuplication so a duplicate is wrapped for a named new parent, with
``authPolicy = PolicyOR(use, duplicate)``:

* use: PolicyCommandCode(EncryptDecrypt2 or RSA_Decrypt) [+ PolicyPCR(values at creation)] + PolicyAuthValue
* duplicate: PolicyCommandCode(Duplicate) + PolicySecret(owner hierarchy)

A key without PCR binding also has userWithAuth, so that a use costs one command (its auth value in a
password session) instead of five; duplication needs a policy session whatever the attributes say.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kleidi._crypto import aead
from kleidi.backends.local import locked_file
from kleidi.backends.tpm.store import ACTIVE, DOCS, KekEntry
from kleidi.errors import BackendUnavailable, DecryptionFailed, KeyringError, KleidiError

os.environ.setdefault("TSS2_LOG", "all+none")  # the library otherwise prints every TPM error to stderr

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_CC,
    TPM2_RC,
    TPM2_SE,
    TPMA_OBJECT,
)
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_AUTH,
    TPM2B_DATA,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST,
    TPML_PCR_SELECTION,
    TPMS_SENSITIVE_CREATE,
    TPMT_RSA_DECRYPT,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMU_ASYM_SCHEME,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

CLEARED_FIX = f"this TPM was cleared or is another TPM; re-enrol this node from another node ({DOCS})"
PCR_MESSAGE = "the PCR values changed (secure boot state?) since the key was created, so the TPM refuses to use it"
PCR_FIX = ("boot the configuration the key was bound to; if the change is meant to stay, re-enrol this node from "
           f"another node whose versions are bound to the new values, or rotate after restoring ({DOCS}#pcr-binding)")

# The commands and algorithms each mechanism needs (preflight checks them with GetCapability).
COMMON_COMMANDS = ("CreatePrimary", "Create", "Load", "LoadExternal", "StartAuthSession", "PolicyOR",
                   "PolicyCommandCode", "PolicyAuthValue", "PolicySecret", "PolicyPCR", "FlushContext")
MECHANISM_COMMANDS = {"aes-cfb": ("EncryptDecrypt2",), "rsa-oaep": ("RSA_Encrypt", "RSA_Decrypt")}
ENROL_COMMANDS = ("Duplicate", "Import")
MECHANISM_ALGORITHMS = {"aes-cfb": ("ECC", "AES", "CFB", "SHA256"), "rsa-oaep": ("ECC", "AES", "CFB", "SHA256",
                                                                             "RSA", "OAEP")}

AES_IV_SIZE = 16
RSA_CIPHERTEXT_SIZE = 256
# The payload's first byte names the mechanism, so a payload can never be read with the other one.
PAYLOAD_TAG = {"aes-cfb": 1, "rsa-oaep": 2}
OAEP_LABEL = b"kleidi tpm data key\0"  # the TPM wants the terminating NUL in the label

_SYM_NULL = TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL)
# Inner wrapping of a duplicate (required by encryptedDuplication); its key travels in the enrol file, the
# outer wrapping to the new node's storage primary is what makes the blob importable only there.
_INNER_WRAP = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128),
                                  mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB))
_OAEP = TPMT_RSA_DECRYPT(scheme=TPM2_ALG.OAEP, details=TPMU_ASYM_SCHEME())
_OAEP.details.oaep.hashAlg = TPM2_ALG.SHA256

# The TCG's standard ECC storage key template (SRK), so that the primary is the same at every start.
_PRIMARY_ATTRIBUTES = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                       | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA)
_KEK_ATTRIBUTES = TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.ENCRYPTEDDUPLICATION | TPMA_OBJECT.DECRYPT
_BUSY = {TPM2_RC.OBJECT_MEMORY, TPM2_RC.SESSION_MEMORY, TPM2_RC.OBJECT_HANDLES, TPM2_RC.SESSION_HANDLES,
         TPM2_RC.RETRY, TPM2_RC.YIELDED, TPM2_RC.TESTING, TPM2_RC.NV_RATE}
_AUTH_REFUSED = {TPM2_RC.AUTH_FAIL, TPM2_RC.BAD_AUTH}


@dataclass(frozen=True)
class Auth:
    """Authorization values, read from files; never shown."""

    owner: bytes = b""
    key: bytes = b""

    def __repr__(self) -> str:
        return "Auth(<hidden>)"


def _tpm_layer(exc: TSS2_Exception) -> bool:
    return (int(exc.rc) >> 16) & 0xFF == 0


def translate(exc: TSS2_Exception, during: str, tcti: str, pcr_bound: bool = False) -> KleidiError:
    """The one mapping from a tpm2-pytss error to kleidi's, by what was being done when it came.

    ``during`` is one of: connect, primary, load, policy, decrypt, encrypt, duplicate, import, other.
    """
    code = f"TPM rc 0x{int(exc.rc):x}"
    if not _tpm_layer(exc):  # TCTI, SYS or ESAPI layer: the connection or the device is gone
        return BackendUnavailable(f"TPM {tcti} cannot be reached ({code}: {exc})",
                                  fix="check that the TPM (or swtpm) runs and backend.tcti names it; kleidi "
                                      "reconnects on the next call")
    error = exc.error
    if error == TPM2_RC.LOCKOUT:
        return BackendUnavailable(f"TPM {tcti} is in dictionary-attack lockout ({code})",
                                  fix="wait for the lockout to expire, or reset it with tpm2_dictionarylockout; "
                                      "then check backend.key_auth_file")
    if error in _BUSY:
        return BackendUnavailable(f"TPM {tcti} is busy ({code}: {exc})", fix="retry; if it persists, check which "
                                  "other processes use this TPM without a resource manager")
    if error in _AUTH_REFUSED:
        if during in ("primary", "duplicate"):
            return KeyringError(f"the TPM refused the owner authorization ({code})",
                                fix="put the owner hierarchy's auth value in backend.owner_auth_file")
        return KeyringError(f"the TPM refused the key's authorization ({code})",
                            fix="put the auth value the key store was created with in backend.key_auth_file")
    if during == "load" and error in (TPM2_RC.INTEGRITY, TPM2_RC.BINDING, TPM2_RC.SIZE, TPM2_RC.KEY):
        return KeyringError(f"the TPM cannot load the key store's key blob ({code})", fix=CLEARED_FIX)
    if during == "import" and error in (TPM2_RC.INTEGRITY, TPM2_RC.BINDING, TPM2_RC.VALUE, TPM2_RC.SIZE):
        return KeyringError(f"the TPM cannot import the enrolment ({code}): it was made for another TPM, or this "
                            "TPM was cleared since `kleidi tpm enrol-request`",
                            fix="run `kleidi tpm enrol-request` on this node again and enrol that request")
    if during == "policy" and error == TPM2_RC.VALUE:
        if pcr_bound:
            return KeyringError(PCR_MESSAGE, fix=PCR_FIX)
        return KeyringError(f"the key's policy does not match its key store entry ({code})",
                            fix="restore the key store from your backup, or re-enrol this node")
    if during == "decrypt" and not exc.handle and not exc.session:
        return DecryptionFailed()  # the data key did not decrypt: the payload is not one of this key's
    return BackendUnavailable(f"TPM {tcti} refused {during} ({code}: {exc})", fix=f"see {DOCS}#troubleshooting")


class Transaction:
    """One use of the TPM: objects created or loaded through it are flushed when it ends."""

    def __init__(self, tpm: Tpm, esapi: Any) -> None:
        self.tpm = tpm
        self.esapi = esapi
        self._loaded: list[Any] = []

    @contextlib.contextmanager
    def step(self, during: str, pcr_bound: bool = False) -> Iterator[None]:
        try:
            yield
        except TSS2_Exception as exc:
            if not _tpm_layer(exc):
                self.tpm.disconnect()
            raise translate(exc, during, self.tpm.tcti, pcr_bound) from None

    def track(self, handle: Any) -> Any:
        self._loaded.append(handle)
        return handle

    def flush(self, handle: Any) -> None:
        if handle in self._loaded:
            self._loaded.remove(handle)
            with contextlib.suppress(TSS2_Exception):
                self.esapi.flush_context(handle)

    def flush_all(self) -> None:
        while self._loaded:
            self.flush(self._loaded[-1])

    # -- the storage primary ----------------------------------------------------------------------

    def primary(self) -> tuple[Any, bytes]:
        """Create the storage primary (deterministic: same template, same owner seed, same key)."""
        template = TPM2B_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=_PRIMARY_ATTRIBUTES)
        self.esapi.tr_set_auth(ESYS_TR.OWNER, self.tpm.auth.owner)
        with self.step("primary"):
            handle, public, *_ = self.esapi.create_primary(None, template, ESYS_TR.OWNER)
        self.track(handle)
        return handle, public.marshal()

    # -- policies ---------------------------------------------------------------------------------

    def _session(self, trial: bool) -> Any:
        kind = TPM2_SE.TRIAL if trial else TPM2_SE.POLICY
        with self.step("policy"):
            return self.track(self.esapi.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, kind, _SYM_NULL,
                                                            TPM2_ALG.SHA256))

    def _use_branch(self, session: Any, mechanism: str, pcrs: tuple[int, ...], bank: str) -> None:
        command = TPM2_CC.EncryptDecrypt2 if mechanism == "aes-cfb" else TPM2_CC.RSA_Decrypt
        self.esapi.policy_command_code(session, command)
        if pcrs:  # a real session checks the PCRs now against the digest the trial session recorded
            self.esapi.policy_pcr(session, None, TPML_PCR_SELECTION.parse(_pcr_selection(pcrs, bank)))
        self.esapi.policy_auth_value(session)

    def _duplicate_branch(self, session: Any) -> None:
        self.esapi.policy_command_code(session, TPM2_CC.Duplicate)
        self.esapi.tr_set_auth(ESYS_TR.OWNER, self.tpm.auth.owner)
        self.esapi.policy_secret(ESYS_TR.OWNER, session)

    def _trial(self, branch: Any) -> bytes:
        session = self._session(trial=True)
        try:
            with self.step("policy"):
                branch(session)
                return bytes(self.esapi.policy_get_digest(session))
        finally:
            self.flush(session)

    def _policy_session(self, entry: KekEntry, use: bool) -> Any:
        session = self._session(trial=False)
        try:
            with self.step("policy" if use else "duplicate", pcr_bound=bool(entry.pcrs)):
                if use:
                    self._use_branch(session, entry.mechanism, entry.pcrs, entry.pcr_bank)
                else:
                    self._duplicate_branch(session)
                self.esapi.policy_or(session, TPML_DIGEST([bytes.fromhex(entry.policy[0]),
                                                           bytes.fromhex(entry.policy[1])]))
        except BaseException:
            self.flush(session)  # three session slots: never keep a failed one
            raise
        return session

    # -- key versions -----------------------------------------------------------------------------

    def create_kek(self, primary: Any, version: int, created: str, mechanism: str, pcrs: tuple[int, ...],
                   bank: str) -> KekEntry:
        """A new KEK inside the TPM, returned as its key store entry (blobs, Name, policy branches)."""
        use = self._trial(lambda s: self._use_branch(s, mechanism, pcrs, bank))
        dup = self._trial(self._duplicate_branch)
        authorize = self._trial(lambda s: self.esapi.policy_or(s, TPML_DIGEST([use, dup])))
        if mechanism == "aes-cfb":
            template = TPM2B_PUBLIC.parse("aes256cfb", objectAttributes=_KEK_ATTRIBUTES | TPMA_OBJECT.SIGN_ENCRYPT)
        else:
            template = TPM2B_PUBLIC.parse("rsa2048:oaep-sha256:null", objectAttributes=_KEK_ATTRIBUTES)
        template.publicArea.authPolicy = authorize
        if not pcrs:  # no PCR binding: the auth value alone authorizes a use (duplication still needs the policy)
            template.publicArea.objectAttributes |= TPMA_OBJECT.USERWITHAUTH
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=TPM2B_AUTH(self.tpm.auth.key)))
        with self.step("create"):
            private, public, *_ = self.esapi.create(primary, sensitive, template)
        return KekEntry(version=version, created=created, name=bytes(public.get_name()).hex(), mechanism=mechanism,
                        public=public.marshal(), private=private.marshal(), policy=(use.hex(), dup.hex()),
                        pcrs=pcrs, pcr_bank=bank)

    def load_kek(self, primary: Any, entry: KekEntry) -> Any:
        assert entry.state == ACTIVE and entry.public is not None and entry.private is not None
        public, _ = TPM2B_PUBLIC.unmarshal(entry.public)
        private, _ = TPM2B_PRIVATE.unmarshal(entry.private)
        if bytes(public.get_name()).hex() != entry.name:
            raise KeyringError(f"key store version {entry.version}'s public area does not match its name",
                               fix="restore the key store from your backup, or re-enrol this node")
        with self.step("load"):
            handle = self.track(self.esapi.load(primary, private, public))
        self.esapi.tr_set_auth(handle, self.tpm.auth.key)
        return handle

    @contextlib.contextmanager
    def _use_authorization(self, entry: KekEntry) -> Iterator[Any]:
        """The session that authorizes a use of the key: its auth value alone (userWithAuth) for a key
        without PCR binding, one command per use; else a policy session, flushed after the use."""
        assert entry.public is not None
        public, _ = TPM2B_PUBLIC.unmarshal(entry.public)
        if public.publicArea.objectAttributes & TPMA_OBJECT.USERWITHAUTH:  # what the key says, not the settings
            yield ESYS_TR.PASSWORD
            return
        session = self._policy_session(entry, use=True)
        try:
            yield session
        finally:
            self.flush(session)

    def encrypt_data_key(self, kek: Any, entry: KekEntry, data_key: bytes) -> bytes:
        if entry.mechanism == "aes-cfb":
            iv = os.urandom(AES_IV_SIZE)
            with self._use_authorization(entry) as session, self.step("encrypt"):
                out, _ = self.esapi.encrypt_decrypt_2(kek, False, TPM2_ALG.CFB, iv, data_key, session1=session)
            return iv + bytes(out)
        with self.step("encrypt"):  # a public-key operation: no authorization
            return bytes(self.esapi.rsa_encrypt(kek, data_key, _OAEP, OAEP_LABEL))

    def decrypt_data_key(self, kek: Any, entry: KekEntry, wrapped: bytes) -> bytes:
        with self._use_authorization(entry) as session, self.step("decrypt"):
            if entry.mechanism == "aes-cfb":
                out, _ = self.esapi.encrypt_decrypt_2(kek, True, TPM2_ALG.CFB, wrapped[:AES_IV_SIZE],
                                                      wrapped[AES_IV_SIZE:], session1=session)
            else:
                out = self.esapi.rsa_decrypt(kek, wrapped, _OAEP, OAEP_LABEL, session1=session)
        return bytes(out)

    # -- enrolment --------------------------------------------------------------------------------

    def duplicate(self, primary: Any, entry: KekEntry, new_parent_public: bytes) -> tuple[bytes, bytes, bytes]:
        """The KEK wrapped for the TPM whose storage primary is ``new_parent_public``: (inner key,
        duplicate, encrypted seed)."""
        parent, _ = TPM2B_PUBLIC.unmarshal(new_parent_public)
        with self.step("duplicate"):
            new_parent = self.track(self.esapi.load_external(parent, None, ESYS_TR.NULL))
        kek = self.load_kek(primary, entry)
        try:
            session = self._policy_session(entry, use=False)
            try:
                with self.step("duplicate"):
                    inner, duplicate, seed = self.esapi.duplicate(kek, new_parent, TPM2B_DATA(), _INNER_WRAP,
                                                                  session1=session)
            finally:
                self.flush(session)
        finally:  # three object slots: the primary, the new parent and this key
            self.flush(kek)
            self.flush(new_parent)
        return bytes(inner), duplicate.marshal(), seed.marshal()

    def import_kek(self, primary: Any, entry: KekEntry, inner: bytes, duplicate: bytes, seed: bytes) -> bytes:
        """This TPM's own private blob for a duplicated KEK."""
        assert entry.public is not None
        public, _ = TPM2B_PUBLIC.unmarshal(entry.public)
        if bytes(public.get_name()).hex() != entry.name:
            raise KeyringError(f"the enrolment's version {entry.version} public area does not match its name",
                               fix="make the enrolment again with `kleidi tpm enrol`")
        with self.step("import"):
            private = self.esapi.import_(primary, inner, public, TPM2B_PRIVATE.unmarshal(duplicate)[0],
                                         TPM2B_ENCRYPTED_SECRET.unmarshal(seed)[0], _INNER_WRAP)
        return bytes(private.marshal())

    # -- capabilities -----------------------------------------------------------------------------

    def supported(self) -> tuple[set[str], set[str]]:
        """The names of the commands and algorithms this TPM implements."""
        with self.step("other"):
            _, commands = self.esapi.get_capability(TPM2_CAP.COMMANDS, TPM2_CC.FIRST, 256)
            _, algorithms = self.esapi.get_capability(TPM2_CAP.ALGS, TPM2_ALG.FIRST, 256)
        codes = {int(cc) & 0xFFFF for cc in commands.data.command}
        names = {name for name in dir(TPM2_CC) if name.isidentifier() and not name.startswith("_")}
        found_commands = {n for n in names if isinstance(getattr(TPM2_CC, n), int)
                          and int(getattr(TPM2_CC, n)) in codes and n not in ("FIRST", "LAST")}
        alg_ids = {int(a.alg) for a in algorithms.data.algorithms}
        found_algorithms = {n for n in dir(TPM2_ALG) if not n.startswith("_")
                            and isinstance(getattr(TPM2_ALG, n), int) and int(getattr(TPM2_ALG, n)) in alg_ids}
        return found_commands, found_algorithms


def _pcr_selection(pcrs: tuple[int, ...], bank: str) -> str:
    return f"{bank}:{','.join(str(p) for p in pcrs)}"


class Tpm:
    """One ESAPI connection, opened on first use and again after the TPM went away."""

    def __init__(self, tcti: str, auth: Auth, lock_path: Path | None) -> None:
        self.tcti = tcti
        self.auth = auth
        self._lock_path = lock_path
        self._esapi: Any = None

    def connect(self) -> Any:
        if self._esapi is None:
            try:
                self._esapi = ESAPI(self.tcti)
            except TSS2_Exception as exc:
                raise translate(exc, "connect", self.tcti) from None
        return self._esapi

    def disconnect(self) -> None:
        esapi, self._esapi = self._esapi, None
        if esapi is not None:
            with contextlib.suppress(TSS2_Exception):
                esapi.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        lock = locked_file(self._lock_path) if self._lock_path is not None else contextlib.nullcontext()
        with lock:
            tx = Transaction(self, self.connect())
            try:
                yield tx
            finally:
                tx.flush_all()


def seal(tx: Transaction, kek: Any, entry: KekEntry, plaintext: bytes, aad: bytes) -> bytes:
    """A fresh data key seals ``plaintext`` (AES-256-GCM, binding ``aad``); the TPM key ``kek`` (loaded
    from ``entry``) encrypts the data key."""
    data_key = aead.new_key()
    wrapped = tx.encrypt_data_key(kek, entry, data_key)
    return bytes([PAYLOAD_TAG[entry.mechanism]]) + wrapped + aead.seal(data_key, plaintext, aad)


def wrapped_key_size(mechanism: str) -> int:
    return AES_IV_SIZE + aead.KEY_SIZE if mechanism == "aes-cfb" else RSA_CIPHERTEXT_SIZE


def open_sealed(tx: Transaction, kek: Any, entry: KekEntry, payload: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`seal`; anything but this key's untampered payload and aad is DecryptionFailed."""
    size = wrapped_key_size(entry.mechanism)
    if len(payload) < 1 + size + aead.OVERHEAD or payload[0] != PAYLOAD_TAG[entry.mechanism]:
        raise DecryptionFailed()
    data_key = tx.decrypt_data_key(kek, entry, payload[1:1 + size])
    if len(data_key) != aead.KEY_SIZE:
        raise DecryptionFailed()
    # A tampered wrapped key decrypts (CFB has no integrity) to another key, which fails here.
    return aead.open_sealed(data_key, payload[1 + size:], aad)


def primary_name(public: bytes) -> str:
    """The TPM Name (nameAlg ‖ hash of the public area) of a marshalled TPM2B_PUBLIC, hex."""
    return bytes(TPM2B_PUBLIC.unmarshal(public)[0].get_name()).hex()


def required(mechanisms: set[str]) -> tuple[set[str], set[str]]:
    """The TPM2_CC and TPM2_ALG names the given mechanisms and enrolment need."""
    commands = set(COMMON_COMMANDS) | set(ENROL_COMMANDS)
    algorithms: set[str] = set()
    for mechanism in mechanisms:
        commands |= set(MECHANISM_COMMANDS[mechanism])
        algorithms |= set(MECHANISM_ALGORITHMS[mechanism])
    return commands, algorithms
