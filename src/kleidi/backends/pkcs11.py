"""The PKCS#11 backend: AES-256 KEK versions on an HSM or token; the KEK never leaves the device.

What kleidi keeps on the token (docs/backends/pkcs11.md says it for the token's admin):

* version N of ``key_label`` L is a secret key object, CKA_LABEL ``L/vN``: AES, 32 bytes, CKA_TOKEN,
  CKA_PRIVATE, CKA_SENSITIVE, not CKA_EXTRACTABLE, with a random CKA_ID set when it is created. The
  CKA_ID (hex) is the version's ``created`` in its key_id, so a key re-created under the same label
  never repeats a key_id, and every kleidi on the token reports the same ones;
* a retired version N is a data object, CKA_LABEL ``L/vN``, CKA_APPLICATION ``kleidi retired``,
  CKA_VALUE the destroyed key's CKA_ID: its key_id stays known (so unwrap says "retired") and its
  number is never handed out again.

Payloads start with a format byte:

* ``1``: CKM_AES_GCM on the token: ``nonce(12) || ciphertext || tag(16)``, the request's aad as GCM AAD;
* ``2``: for tokens without GCM (``mechanism: aes_key_wrap_pad``): a fresh data key seals the seed
  with AES-256-GCM in software, binding the aad, and the token wraps that data key with
  CKM_AES_KEY_WRAP_PAD: ``len(2) || wrapped data key || nonce || ciphertext || tag``.

The device is shared by the process: C_Initialize, the login and the session handles belong to the
process, not to one backend (a reload makes a second backend on the same token). So one
:class:`_Library` per library path holds them; each backend has its own pool of sessions, one per
worker thread. A session that the device no longer knows (the token went away, the library was
re-initialised) is dropped and reopened; CKR_USER_NOT_LOGGED_IN logs in again; a token that does
not answer at all makes kleidi finalise and re-initialise the library, which is what it takes to
see a token come back (SoftHSM2, and most network HSM clients).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import click
from pydantic import Field, field_validator, model_validator

try:  # the pkcs11 extra: the settings below import without it, the backend needs it
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11 import exceptions as p11
    from pkcs11.mechanisms import GCMParams
except ImportError:  # pragma: no cover - exercised by tests/test_cli_extras.py in a subprocess
    pkcs11 = None  # type: ignore[assignment]

from kleidi._crypto import aead
from kleidi.backends.base import MAX_PLAINTEXT_SIZE, KeySet, KeyVersion
from kleidi.backends.threaded import ThreadedBackend
from kleidi.checks import FAIL, PASS, Check, private_file
from kleidi.cli_support import KeyVersionType, config_option, load, output_option, print_table
from kleidi.errors import (
    BackendUnavailable,
    ConfigError,
    DecryptionFailed,
    InvalidRequest,
    InvalidValue,
    KeyringError,
    KleidiError,
    RetiredKey,
)
from kleidi.settings.types import BackendSettingsBase, OptionalEnvName

log = logging.getLogger("kleidi.backends.pkcs11")

T = TypeVar("T")

RETIRED_APPLICATION = "kleidi retired"
GCM_FORMAT, WRAPPED_FORMAT = 1, 2
KEY_BITS = 256
ID_BYTES = 16
RESET_HOLD_OFF = 1.0  # seconds between re-initialisations of a library that did not bring the token back
RETIRED_FIX = ("if the objects stored under it are still needed, restore that version's key object from the HSM's "
               "backup and delete its `kleidi retired` data object; else delete and re-create them")


class Pkcs11BackendSettings(BackendSettingsBase):
    """A KEK on a PKCS#11 token or HSM (AES-256, sensitive, never extractable)."""

    kind: Literal["pkcs11"] = "pkcs11"
    """Backend type."""

    library: Path = Field(examples=["/usr/lib/softhsm/libsofthsm2.so"])
    """The token vendor's PKCS#11 module (a .so file), e.g. /usr/lib/softhsm/libsofthsm2.so."""

    token_label: str | None = None
    """Label of the token (HSM partition) that holds the KEK. Set exactly one of token_label,
    token_serial and slot."""

    token_serial: str | None = None
    """Serial number of the token, where several tokens share a label."""

    slot: int | None = Field(default=None, ge=0)
    """Slot id of the token. Slot ids can change when tokens are added; prefer token_label."""

    pin_file: Path | None = None
    """File holding the user PIN (mode 0600 or stricter, owned by kleidi's user). Re-read at every
    login. Set exactly one of pin_file and pin_env."""

    pin_env: OptionalEnvName = None
    """Name of an environment variable holding the user PIN (if pin_file is not set)."""

    key_label: str = "kleidi-kek"
    """Name of the KEK: version N is the secret key object labelled "<key_label>/vN" on the token."""

    mechanism: Literal["aes_gcm", "aes_key_wrap_pad"] = "aes_gcm"
    """How the token protects the seeds. aes_gcm: CKM_AES_GCM on the token, binding each seed to its
    key_id and annotations. aes_key_wrap_pad, for tokens without GCM: the token wraps a fresh data
    key (CKM_AES_KEY_WRAP_PAD) that seals the seed with AES-256-GCM in kleidi, which binds them just
    as well. Either way ciphertexts written under the other mechanism keep decrypting."""

    sessions: int = Field(default=4, ge=1, le=256)
    """Sessions kleidi keeps open on the token, one per worker thread: the calls it makes at once."""

    max_waiting: int = Field(default=1024, ge=0, le=65536)
    """Calls that may wait for a free session; one more fails at once with UNAVAILABLE, so that a
    stuck token cannot pile up calls without bound. An apiserver starting up or re-encrypting sends
    hundreds at once."""

    allow_extractable: bool = False
    """Accept KEK objects that are extractable or not sensitive (the device would let the key out).
    Only for tests and migrations: such a key is only as safe as every session on the token."""

    @model_validator(mode="after")
    def _one_token_and_one_pin(self) -> Pkcs11BackendSettings:
        _exactly_one(self, ("token_label", "token_serial", "slot"), "the token",
                     'set token_label to the label the token was initialised with (e.g. "kleidi")')
        _exactly_one(self, ("pin_file", "pin_env"), "the user PIN",
                     "set pin_file to a file (mode 0600) that holds the PIN, or pin_env to the name of an "
                     "environment variable")
        return self

    @field_validator("key_label")
    @classmethod
    def _key_label(cls, value: str) -> str:
        if not value or not value.isprintable() or len(value) > 100:
            raise InvalidValue("key_label must be 1 to 100 printable characters",
                               fix='use a plain name such as "kleidi-kek"')
        return value


def _exactly_one(settings: Pkcs11BackendSettings, names: tuple[str, ...], what: str, fix: str) -> None:
    given = [name for name in names if getattr(settings, name) is not None]
    if len(given) != 1:
        listed = " and ".join(given) if given else f"none of {', '.join(names)}"
        raise InvalidValue(f"{listed} {'are' if given else 'is'} set: kleidi needs exactly one way to find {what}",
                           fix=fix if not given else f"keep one of {', '.join(given)}")


def _read_pin(settings: Pkcs11BackendSettings) -> str:
    """The user PIN, from its file (checked like a keyring) or its environment variable; never logged."""
    if settings.pin_file is not None:
        check = private_file("PIN file", settings.pin_file)
        if check.result == FAIL:
            raise ConfigError(f"backend.pin_file: {check.detail}", fix=check.fix)
        try:
            pin = settings.pin_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"backend.pin_file: cannot read {settings.pin_file}: {exc.strerror}",
                              fix="let kleidi's user read it (it should own the file, mode 0600)") from None
        where = f"the file {settings.pin_file}"
    else:
        assert settings.pin_env is not None
        pin, where = os.environ.get(settings.pin_env, "").strip(), f"environment variable {settings.pin_env}"
    if not pin:
        raise ConfigError(f"backend: {where} (the token's user PIN) is empty or not set",
                          fix=f"put the PIN in {where}")
    return pin


def _version_label(key_label: str, version: int) -> str:
    return f"{key_label}/v{version}"


def _label_version(key_label: str, label: str) -> int | None:
    match = re.fullmatch(re.escape(key_label) + r"/v([1-9][0-9]{0,9})", label)
    version = int(match.group(1)) if match else None
    return version if version is not None and version < 2**32 else None


# -- the error mapping: the one place pkcs11's exceptions become kleidi's -------------------------------

STALE, LOGGED_OUT, FATAL = "stale", "logged out", "fatal"


def _classify(exc: Exception) -> str:
    """STALE: the session, a handle or the token is gone (reconnect, then retry); LOGGED_OUT: log in
    again, then retry; FATAL: map with :func:`_kleidi_error`."""
    if isinstance(exc, p11.UserNotLoggedIn):
        return LOGGED_OUT
    if isinstance(exc, p11.SessionHandleInvalid | p11.SessionClosed | p11.ObjectHandleInvalid | p11.KeyHandleInvalid
                  | p11.DeviceRemoved | p11.DeviceError | p11.TokenNotPresent | p11.TokenNotRecognised
                  | p11.SlotIDInvalid | p11.GeneralError | p11.NoSuchToken | p11.DeviceMemory
                  | p11.SessionCount | p11.FunctionFailed):
        return STALE
    if type(exc) is p11.PKCS11Error:  # what python-pkcs11 raises for codes it has no class for
        return STALE  # e.g. CKR_CRYPTOKI_NOT_INITIALIZED after a failed re-initialisation
    return FATAL


# Raised by a token for a ciphertext or wrapped key that does not authenticate. SoftHSM2 says
# CKR_GENERAL_ERROR for a GCM tag mismatch, which a failing device says too: _CiphertextRejected
# is only believed after the token has answered a question about itself.
_CIPHERTEXT_ERRORS = ("EncryptedDataInvalid", "EncryptedDataLenRange", "DataInvalid", "DataLenRange",
                      "WrappedKeyInvalid", "WrappedKeyLenRange", "GeneralError", "FunctionFailed")


class _CiphertextRejected(Exception):
    """The token refused to decrypt a payload (the cause is a pkcs11 exception)."""


class _PinRefusedBefore(Exception):
    """The PIN kleidi would log in with is one the token already refused: not tried again."""


def _kleidi_error(exc: Exception, settings: Pkcs11BackendSettings, operation: str) -> KleidiError:
    """A new kleidi error for a pkcs11 exception (never a shared instance; nothing secret in it)."""
    name = type(exc).__name__
    where = f"token {_token_name(settings)}"
    if isinstance(exc, _CiphertextRejected):
        return DecryptionFailed()
    if isinstance(exc, _PinRefusedBefore):
        return ConfigError(f"{where} refused the user PIN before; kleidi does not try the same PIN again (a token "
                           "locks the PIN after a few wrong tries)",
                           fix=f"put the token's user PIN in {_pin_source(settings)}")
    if isinstance(exc, p11.PinIncorrect | p11.PinInvalid | p11.PinLenRange):
        return ConfigError(f"{where} refused the user PIN ({name})",
                           fix=f"put the token's user PIN in {_pin_source(settings)}")
    if isinstance(exc, p11.PinLocked | p11.PinExpired):
        return ConfigError(f"{where}: the user PIN is {'locked' if isinstance(exc, p11.PinLocked) else 'expired'}",
                           fix="have the token's security officer reset the user PIN, then update "
                               f"{_pin_source(settings)}")
    if isinstance(exc, p11.UserPinNotInitialized):
        return ConfigError(f"{where} has no user PIN yet",
                           fix="initialise it (softhsm2-util --init-token ... --pin, or the HSM's admin tool)")
    if isinstance(exc, p11.MechanismInvalid | p11.MechanismParamInvalid):
        return ConfigError(f"{where} does not support {settings.mechanism} with caller-chosen parameters "
                           f"({name}) during {operation}",
                           fix="set backend.mechanism: aes_key_wrap_pad if the token lacks CKM_AES_GCM (or allows "
                               "only its own GCM nonces), or enable the mechanism on the HSM")
    if isinstance(exc, p11.KeyTypeInconsistent | p11.WrappingKeyTypeInconsistent | p11.UnwrappingKeyTypeInconsistent
                  | p11.TemplateInconsistent | p11.TemplateIncomplete | p11.AttributeValueInvalid):
        return KeyringError(f"{where}: key {settings.key_label} may not be used for {operation} ({name})",
                            fix="give its versions CKA_ENCRYPT and CKA_DECRYPT (mechanism aes_gcm) or CKA_WRAP and "
                                "CKA_UNWRAP (aes_key_wrap_pad); `kleidi pkcs11 rotate` creates such a version")
    if isinstance(exc, p11.TokenWriteProtected | p11.SessionReadOnly):
        return ConfigError(f"{where} is read-only ({name}): cannot {operation}",
                           fix="create or destroy the key objects with the HSM's admin tools")
    if isinstance(exc, p11.MultipleTokensReturned):
        return ConfigError(f"several tokens match {where}", fix="select the token by backend.token_serial")
    return BackendUnavailable(f"{where} failed during {operation} ({name})",
                              fix="check the token or HSM and its connection; kleidi reconnects by itself")


def _token_name(settings: Pkcs11BackendSettings) -> str:
    if settings.token_label is not None:
        return repr(settings.token_label)
    return f"serial {settings.token_serial}" if settings.token_serial is not None else f"in slot {settings.slot}"


def _pin_source(settings: Pkcs11BackendSettings) -> str:
    return f"backend.pin_file ({settings.pin_file})" if settings.pin_file else f"${settings.pin_env}"


def _load_library(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"backend.library: {path} does not exist or is not a file",
                          fix="install the token's PKCS#11 module (e.g. apt install softhsm2) and give its path")
    try:
        module = pkcs11.lib(str(path))
        module.finalize()  # initialised again below, for threads
        _initialise_for_threads(path)
    except (p11.PKCS11Error, OSError, AttributeError) as exc:
        # The text is dlerror()'s (which file, which symbol), or an initialisation failure.
        raise ConfigError(f"backend.library: cannot load {path} as a PKCS#11 module: {str(exc)[:300]}",
                          fix="give the vendor's PKCS#11 .so for this machine's architecture") from None
    return module


class _InitializeArgs(ctypes.Structure):
    _fields_ = [("create_mutex", ctypes.c_void_p), ("destroy_mutex", ctypes.c_void_p),
                ("lock_mutex", ctypes.c_void_p), ("unlock_mutex", ctypes.c_void_p),
                ("flags", ctypes.c_ulong), ("reserved", ctypes.c_void_p)]


CKF_OS_LOCKING_OK = 0x2
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191


def _initialise_for_threads(path: Path) -> None:
    """C_Initialize with CKF_OS_LOCKING_OK. python-pkcs11 0.10 passes NULL, which tells the module that
    no two threads call it at once (PKCS#11 3.0 section 5.4): SoftHSM2 then takes no locks and crashes
    under the session pool. The module is the one python-pkcs11 loaded (dlopen of the same path
    returns the same handle), so python-pkcs11's sessions use what this initialises."""
    module = ctypes.CDLL(str(path))
    args = _InitializeArgs(flags=CKF_OS_LOCKING_OK)
    result = module.C_Initialize(ctypes.byref(args))
    if result not in (0, CKR_CRYPTOKI_ALREADY_INITIALIZED):
        raise p11.PKCS11Error(f"C_Initialize returned 0x{result:x}")


def _finalise(path: Path) -> None:
    ctypes.CDLL(str(path)).C_Finalize(None)


# -- the process-wide device state --------------------------------------------------------------------


class _SharedLock:
    """Many calls use the library at once; re-initialising it waits for them and stops new ones."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0
        self._resetting = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._resetting)
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._resetting)
            self._resetting = True
            self._cond.wait_for(lambda: self._users == 0)
        try:
            yield
        finally:
            with self._cond:
                self._resetting = False
                self._cond.notify_all()


class _Library:
    """One PKCS#11 module as the process sees it: loaded once, logged in once per token."""

    _loaded: ClassVar[dict[Path, _Library]] = {}
    _loaded_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = _SharedLock()
        self.generation = 0  # +1 at each re-initialisation: every session and handle from before is void
        self._module: Any = None
        self._logins: dict[bytes, Any] = {}  # token serial -> the session that logged in
        self._login_lock = threading.Lock()
        self._hold_off_until = 0.0
        self._refused_pins: set[bytes] = set()  # sha256(serial, PIN) of PINs the token refused

    @classmethod
    def of(cls, path: Path) -> _Library:
        with cls._loaded_lock:
            return cls._loaded.setdefault(path, cls(path))

    def module(self) -> Any:
        if self._module is None:
            self._module = _load_library(self.path)
        return self._module

    def reset(self, seen_generation: int) -> None:
        """C_Finalize and C_Initialize, unless another thread did since ``seen_generation``."""
        with self.lock.exclusive():
            if self.generation != seen_generation:
                return
            if time.monotonic() < self._hold_off_until:
                raise BackendUnavailable(f"the PKCS#11 library {self.path} was re-initialised less than "
                                         f"{RESET_HOLD_OFF:.0f}s ago and the token was still missing",
                                         fix="check the token or HSM; kleidi keeps trying")
            self.generation += 1
            self._logins.clear()  # C_Finalize logged every token out
            log.warning("re-initialising the PKCS#11 library %s to reach the token again", self.path)
            try:
                self.module()
                _finalise(self.path)
                _initialise_for_threads(self.path)
            except p11.PKCS11Error as exc:
                self.hold_off()
                raise BackendUnavailable(f"the PKCS#11 library {self.path} failed to initialise "
                                         f"({type(exc).__name__}): the token or its configuration is unreachable",
                                         fix="check the token or HSM (and, for SoftHSM2, its token directory); "
                                             "kleidi keeps trying") from None

    def hold_off(self) -> None:
        """A reset did not help: do not re-initialise again at once (every worker would)."""
        self._hold_off_until = time.monotonic() + RESET_HOLD_OFF

    def log_in(self, token: Any, pin: Callable[[], str]) -> None:
        """Log the process in to ``token`` unless it is already."""
        with self._login_lock:
            if token.serial in self._logins:
                return
            value = pin()
            digest = hashlib.sha256(token.serial + b"\0" + value.encode()).digest()
            if digest in self._refused_pins:
                raise _PinRefusedBefore()
            try:
                self._logins[token.serial] = token.open(user_pin=value)
            except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange):
                # Every refresh would try again, and the token would lock the PIN: remember it (hashed).
                self._refused_pins.add(digest)
                raise
            except p11.UserAlreadyLoggedIn:
                # Logged in by code outside this registry. python-pkcs11 leaves that attempt's session
                # open: one handle, until the library is re-initialised.
                self._logins[token.serial] = None

    def logged_out(self, token: Any) -> None:
        """The token says we are not logged in (a C_Logout elsewhere in the process): log in again.
        The old login session is left open, not closed: closing it would C_Logout once more."""
        with self._login_lock:
            self._logins.pop(token.serial, None)

    def login_session(self, token: Any) -> Any:
        """The session that logged in to ``token`` (tests log out through it)."""
        return self._logins.get(token.serial)


def _retired(key: KeyVersion) -> RetiredKey:
    return RetiredKey(f"key_id {key.key_id} (pkcs11 version {key.version}) has been retired", fix=RETIRED_FIX)


# -- the backend ------------------------------------------------------------------------------------------


@dataclass
class _Session:
    """One of a backend's sessions, with the key objects it has found (handles are per session)."""

    handle: Any
    generation: int
    keys: dict[tuple[int, bytes], Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Version:
    version: int
    object_id: bytes  # the key's CKA_ID, or for a retired version the destroyed key's
    key: KeyVersion


class Pkcs11Backend(ThreadedBackend):
    """KEK versions as AES-256 key objects on a PKCS#11 token, used through a pool of sessions."""

    kind: ClassVar[str] = "pkcs11"
    settings_model: ClassVar[type[Pkcs11BackendSettings]] = Pkcs11BackendSettings
    requires: ClassVar[tuple[str, ...]] = ("pkcs11",)
    retired_fix: ClassVar[str] = RETIRED_FIX

    def __init__(self, settings: Pkcs11BackendSettings) -> None:
        super().__init__(workers=settings.sessions, queue=settings.max_waiting)
        self.settings = settings
        self._library = _Library.of(settings.library)  # no I/O: the module loads at the first call
        self._token: Any = None
        self._token_generation = -1
        self._identity: str | None = None
        self._ever_connected = False
        self._idle: list[_Session] = []
        self._pool_lock = threading.Lock()
        self._usable: dict[int, _Version] = {}
        self._retired: dict[int, _Version] = {}

    def describe(self) -> str:
        return f"pkcs11 {self.settings.library} token {_token_name(self.settings)} key {self.settings.key_label}"

    # -- sessions ------------------------------------------------------------------------------------------

    def _find_token(self) -> Any:
        s = self.settings
        module = self._library.module()
        if s.slot is not None:
            tokens = [slot.get_token() for slot in module.get_slots(token_present=True) if slot.slot_id == s.slot]
        else:
            tokens = list(module.get_tokens(token_label=s.token_label,
                                            token_serial=s.token_serial.encode() if s.token_serial else None))
        if len(tokens) > 1:
            raise p11.MultipleTokensReturned()
        if not tokens:
            raise p11.NoSuchToken()
        return tokens[0]

    def _connected_token(self) -> Any:
        generation = self._library.generation
        if self._token is None or self._token_generation != generation:
            self._token, self._token_generation = self._find_token(), generation
            self._identity = f"{self._token.label}/{self.settings.key_label}"
            self._ever_connected = True
        self._library.log_in(self._token, lambda: _read_pin(self.settings))
        return self._token

    def _checkout(self) -> _Session:
        token = self._connected_token()
        generation = self._library.generation
        with self._pool_lock:
            while self._idle:
                session = self._idle.pop()
                if session.generation == generation:
                    return session
        return _Session(token.open(), generation)

    def _checkin(self, session: _Session) -> None:
        with self._pool_lock:
            if not self._closed:
                self._idle.append(session)
                return
        self._close_session(session)

    def _forget_token(self) -> None:
        """The token stopped answering: close its sessions (if it still can) and find it again."""
        self._token = None
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for session in idle:
            self._close_session(session)

    def _close_session(self, session: _Session) -> None:
        """Close a session, under the library's shared lock. Not one from before a re-initialisation:
        its handle number may belong to a new session by now."""
        if session.generation == self._library.generation:
            with contextlib.suppress(p11.PKCS11Error):
                session.handle.close()  # opened without a PIN: closing logs nobody out

    def _on_token(self, operation: str, work: Callable[[_Session], T]) -> T:
        """``work`` on a session of the pool, reconnecting (and logging in) as the token needs."""
        failure: Exception | None = None
        for attempt in range(3):
            generation = self._library.generation
            with self._library.lock.shared():
                session = None
                try:
                    session = self._checkout()
                    result = work(session)
                except KleidiError:  # RetiredKey, DecryptionFailed from software, a PIN file error
                    if session is not None:
                        self._checkin(session)
                    raise
                except (p11.PKCS11Error, _CiphertextRejected, _PinRefusedBefore) as exc:
                    failure = exc
                else:
                    self._checkin(session)
                    return result
                kind = _classify(failure)
                if kind == LOGGED_OUT and session is not None:
                    session.keys.clear()  # handles of private objects may not survive a logout
                    self._checkin(session)
                    self._library.logged_out(self._token)
                    continue
                if kind != STALE or attempt == 2:
                    break
                if session is not None:
                    self._close_session(session)
                self._forget_token()
            if attempt == 1:  # reopening the token did not help: only re-initialising the library may
                self._library.reset(generation)
        assert failure is not None
        if isinstance(failure, p11.NoSuchToken) and not self._ever_connected:
            self._library.hold_off()
            raise self._missing_token() from None
        if _classify(failure) == STALE:
            self._library.hold_off()
        raise _kleidi_error(failure, self.settings, operation) from None

    def _missing_token(self) -> ConfigError:
        try:
            seen = sorted(repr(t.label) for t in self._library.module().get_tokens())
        except p11.PKCS11Error:
            seen = []
        return ConfigError(f"no token {_token_name(self.settings)} in {self.settings.library} (tokens seen: "
                           f"{', '.join(seen) or 'none'})",
                           fix="check backend.token_label (softhsm2-util --show-slots, or pkcs11-tool --module "
                               "<library> --list-token-slots), and that the token is initialised")

    # -- key objects -----------------------------------------------------------------------------------

    def _scan(self, session: _Session) -> tuple[dict[int, _Version], dict[int, _Version]]:
        """Every version on the token: (usable, retired), checked."""
        s, handle = self.settings, session.handle
        assert self._identity is not None
        keys: dict[int, Any] = {}
        for key in handle.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
            version = _label_version(s.key_label, key.label)
            if version is None:
                continue
            if version in keys:
                raise KeyringError(f"token {_token_name(s)} has two key objects labelled "
                                   f"{_version_label(s.key_label, version)}",
                                   fix="destroy the one kleidi did not create (compare their CKA_ID with "
                                       "`kleidi pkcs11 keys`), or relabel it")
            keys[version] = key
        retired: dict[int, _Version] = {}
        for data in handle.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: RETIRED_APPLICATION}):
            version = _label_version(s.key_label, data[Attribute.LABEL])
            if version is not None:
                object_id = bytes(data[Attribute.VALUE])
                retired[version] = _Version(version, object_id, self._key_version(version, object_id))
                if keys.pop(version, None) is not None:
                    log.warning("version %d of %s is retired but its key object is on the token again; kleidi "
                                "keeps it retired (delete the `kleidi retired` data object to use it)",
                                version, s.key_label)
        usable = {v: _Version(v, self._checked(v, key), self._key_version(v, key.id)) for v, key in keys.items()}
        return usable, retired

    def _key_version(self, version: int, object_id: bytes) -> KeyVersion:
        assert self._identity is not None
        return KeyVersion.derive(self.kind, self._identity, version, object_id.hex())

    def _checked(self, version: int, key: Any) -> bytes:
        """A version's CKA_ID, once its key object is what a KEK must be."""
        s = self.settings
        label = _version_label(s.key_label, version)
        if key.key_type != KeyType.AES or key[Attribute.VALUE_LEN] != KEY_BITS // 8:
            raise KeyringError(f"key object {label} is not an AES-256 key",
                               fix="create the version with `kleidi pkcs11 rotate` (or as AES, 32 bytes)")
        if not key.id:
            raise KeyringError(f"key object {label} has no CKA_ID; kleidi needs a random one to tell a re-created "
                               "key from the old one", fix="set a random CKA_ID on it (16 bytes, e.g. pkcs11-tool "
                               "--id $(openssl rand -hex 16)) before kleidi uses it")
        if not s.allow_extractable and (key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]):
            raise KeyringError(f"key object {label} is extractable or not sensitive: the token would let the KEK "
                               "out", fix="create the version with CKA_SENSITIVE true and CKA_EXTRACTABLE false "
                               "(`kleidi pkcs11 rotate` does), or set backend.allow_extractable: true for a test")
        return bytes(key.id)

    def _key_object(self, session: _Session, version: _Version) -> Any:
        cache_key = (version.version, version.object_id)
        key = session.keys.get(cache_key)
        if key is None:
            found = list(session.handle.get_objects({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: version.object_id,
                Attribute.LABEL: _version_label(self.settings.key_label, version.version)}))
            if len(found) != 1:
                label = _version_label(self.settings.key_label, version.version)
                if any(session.handle.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label,
                                                   Attribute.APPLICATION: RETIRED_APPLICATION})):
                    raise _retired(version.key)  # retired since the last scan
                raise p11.ObjectHandleInvalid()  # gone since the last scan: scan again after a reconnect
            key = session.keys[cache_key] = found[0]
        return key

    def _version(self, key: KeyVersion) -> _Version:
        version = self._usable.get(key.version)
        if version is None or version.key.key_id != key.key_id:
            raise _retired(key)
        return version

    # -- the blocking Backend methods --------------------------------------------------------------------

    def load_keys_blocking(self, force: bool) -> KeySet:
        usable, retired = self._on_token("load_keys", self._scan)
        if not usable:
            raise KeyringError(f"token {_token_name(self.settings)} has no usable version of key "
                               f"{self.settings.key_label}",
                               fix="create one: kleidi pkcs11 rotate --config <this config>")
        self._usable, self._retired = usable, retired
        current = usable[max(usable)].key
        generation = tuple(sorted((v.version, v.object_id, v.version in usable) for v in (*usable.values(),
                                                                                          *retired.values())))
        return KeySet(current=current, usable={v.key.key_id: v.key for v in usable.values()},
                      retired={v.key.key_id: v.key for v in retired.values()}, generation=generation)

    def wrap_blocking(self, key: KeyVersion, plaintext: bytes, aad: bytes) -> bytes:
        version = self._version(key)

        def work(session: _Session) -> bytes:
            kek = self._key_object(session, version)
            if self.settings.mechanism == "aes_gcm":
                nonce = os.urandom(aead.NONCE_SIZE)
                sealed = kek.encrypt(plaintext, mechanism=Mechanism.AES_GCM,
                                     mechanism_param=GCMParams(nonce, aad, aead.TAG_SIZE * 8))
                return bytes([GCM_FORMAT]) + nonce + bytes(sealed)
            data_key = aead.new_key()
            temporary = session.handle.create_object({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES, Attribute.VALUE: data_key,
                Attribute.TOKEN: False, Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False})
            try:
                wrapped = bytes(kek.wrap_key(temporary, mechanism=Mechanism.AES_KEY_WRAP_PAD))
            finally:
                temporary.destroy()
            return bytes([WRAPPED_FORMAT]) + len(wrapped).to_bytes(2, "big") + wrapped + aead.seal(data_key,
                                                                                                   plaintext, aad)

        return self._on_token("wrap", work)

    def unwrap_blocking(self, key: KeyVersion, payload: bytes, aad: bytes) -> bytes:
        version = self._version(key)
        form = payload[:1]
        if form == bytes([GCM_FORMAT]) and len(payload) > 1 + aead.OVERHEAD:
            nonce, sealed = payload[1:1 + aead.NONCE_SIZE], payload[1 + aead.NONCE_SIZE:]
            wrapped = b""
        elif form == bytes([WRAPPED_FORMAT]) and len(payload) > 3:
            size = int.from_bytes(payload[1:3], "big")
            wrapped, sealed = payload[3:3 + size], payload[3 + size:]
            if len(wrapped) != size or len(sealed) <= aead.OVERHEAD:
                raise DecryptionFailed()
        else:
            raise DecryptionFailed()

        def work(session: _Session) -> bytes:
            kek = self._key_object(session, version)
            try:
                if wrapped:
                    data_key = self._unwrapped(kek, wrapped)
                else:
                    plain = bytes(kek.decrypt(sealed, mechanism=Mechanism.AES_GCM,
                                              mechanism_param=GCMParams(nonce, aad, aead.TAG_SIZE * 8)))
            except p11.PKCS11Error as exc:
                if type(exc).__name__ not in _CIPHERTEXT_ERRORS:
                    raise
                session.handle.token.slot.get_token()  # the token answers: the ciphertext was refused, not us
                raise _CiphertextRejected() from None
            if wrapped:
                plain = aead.open_sealed(data_key, sealed, aad)
            if not 0 < len(plain) <= MAX_PLAINTEXT_SIZE:
                raise DecryptionFailed()
            return plain

        return self._on_token("unwrap", work)

    @staticmethod
    def _unwrapped(kek: Any, wrapped: bytes) -> bytes:
        temporary = kek.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped, mechanism=Mechanism.AES_KEY_WRAP_PAD,
                                   store=False, template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False})
        try:
            return bytes(temporary[Attribute.VALUE])
        finally:
            temporary.destroy()

    def close_blocking(self) -> None:
        with self._pool_lock:
            idle, self._idle = self._idle, []
        with self._library.lock.shared():
            for session in idle:
                self._close_session(session)
        self._usable, self._retired = {}, {}

    # -- what the CLI does to the token (admin work: read-write sessions) ---------------------------------

    def versions(self) -> tuple[dict[int, _Version], dict[int, _Version]]:
        return self._on_token("list keys", self._scan)

    def create_version(self) -> _Version:
        """Generate the next version on the token (one past every version ever used)."""

        def work(session: _Session) -> _Version:
            usable, retired = self._scan(session)
            version = max((*usable, *retired), default=0) + 1
            object_id = os.urandom(ID_BYTES)
            gcm = self.settings.mechanism == "aes_gcm"
            writer = session.handle.token.open(rw=True)
            try:
                writer.generate_key(KeyType.AES, KEY_BITS, id=object_id, store=True,
                                    label=_version_label(self.settings.key_label, version),
                                    template={Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                                              Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: gcm,
                                              Attribute.DECRYPT: gcm, Attribute.WRAP: not gcm,
                                              Attribute.UNWRAP: not gcm, Attribute.SIGN: False,
                                              Attribute.VERIFY: False, Attribute.DERIVE: False})
            finally:
                writer.close()
            return _Version(version, object_id, self._key_version(version, object_id))

        return self._on_token("rotate", work)

    def retire_version(self, version: int) -> _Version:
        """Destroy a version's key object and leave the data object that keeps its number and key_id."""

        def work(session: _Session) -> _Version:
            usable, retired = self._scan(session)
            if version in retired:
                raise InvalidRequest(f"version {version} is already retired",
                                     fix="check the version: `kleidi pkcs11 keys` lists the usable ones")
            if version not in usable:
                raise InvalidRequest(f"token {_token_name(self.settings)} has no version {version} of "
                                     f"{self.settings.key_label}", fix="give a version `kleidi pkcs11 keys` lists")
            if version == max(usable):
                raise InvalidRequest(f"version {version} is current",
                                     fix="rotate first (`kleidi pkcs11 rotate`), re-encrypt, then retire it")
            entry = usable[version]
            label = _version_label(self.settings.key_label, version)
            writer = session.handle.token.open(rw=True)
            try:
                # The marker first: a crash between the two steps leaves a retired version, not a lost number.
                writer.create_object({Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True,
                                      Attribute.PRIVATE: True, Attribute.LABEL: label,
                                      Attribute.APPLICATION: RETIRED_APPLICATION, Attribute.VALUE: entry.object_id})
                for key in writer.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label,
                                               Attribute.ID: entry.object_id}):
                    key.destroy()
            finally:
                writer.close()
            session.keys.clear()
            return entry

        return self._on_token("retire", work)

    # -- what kleidi's own commands say, doctor checks, the CLI -----------------------------------------

    @classmethod
    def lifecycle_hint(cls, command: str, settings: Pkcs11BackendSettings, version: int | None) -> str | None:
        if command in ("rotate", "keygen"):
            return ("create the next KEK version on the token with `kleidi pkcs11 rotate --config <this config>` "
                    "(on an empty token it creates v1); running servers pick it up within backend.refresh_interval")
        if command == "retire":
            return f"retire it on the token with `kleidi pkcs11 retire {version or 'N'} --config <this config>`"
        return "list the token's KEK versions with `kleidi pkcs11 keys --config <this config>`"

    @classmethod
    def cli_commands(cls) -> list[tuple[str, Any]]:
        return [("", pkcs11_group)]

    @classmethod
    def file_checks(cls, settings: Pkcs11BackendSettings) -> list[Check]:
        library = (Check("PKCS#11 library", PASS, f"{settings.library}: a file") if settings.library.is_file()
                   else Check("PKCS#11 library", FAIL, f"{settings.library} does not exist or is not a file",
                              "install the token's PKCS#11 module and set backend.library to its path"))
        checks = [library]
        if settings.pin_file is not None:
            checks.append(private_file("PIN file", settings.pin_file))
        return checks


# -- CLI commands: the token's KEK versions -----------------------------------------------------------


@contextlib.contextmanager
def _backend_of(config_file: Path | None, command: str) -> Iterator[Pkcs11Backend]:
    settings = load(config_file).backend
    if settings.kind != "pkcs11":
        raise ConfigError(f"`kleidi pkcs11 {command}` manages a pkcs11 backend's keys; this config's backend is "
                          f"{settings.kind}", fix="pass a config whose backend is kind: pkcs11 (--config)")
    backend = Pkcs11Backend(settings)
    try:
        yield backend
    finally:
        backend.close_blocking()


@click.group("pkcs11")
def pkcs11_group() -> None:
    """Manage the KEK versions on a PKCS#11 token (HSM)."""


@pkcs11_group.command("rotate")
@config_option
def rotate_command(config_file: Path | None) -> None:
    """Create the next KEK version on the token (v1 on an empty one) and make it current."""
    with _backend_of(config_file, "rotate") as backend:
        entry = backend.create_version()
    click.echo(f"created {_version_label(backend.settings.key_label, entry.version)} on the token: version "
               f"{entry.version} is current, key_id {entry.key.key_id}\nRunning servers pick it up within "
               "backend.refresh_interval (or at once on SIGHUP); older versions keep decrypting until you retire them.")


@pkcs11_group.command("retire")
@config_option
@click.argument("version", type=KeyVersionType())
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def retire_command(config_file: Path | None, version: int, yes: bool) -> None:
    """Destroy an old KEK VERSION's key object on the token (v1 or 1, as `kleidi pkcs11 keys` shows it).
    Ciphertexts wrapped with it stop decrypting."""
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("retiring destroys a key; pass --yes to confirm when not at a terminal")
        click.confirm(f"Destroy version {version} on the token? Data still encrypted with it becomes unreadable "
                      "(unless the HSM's backup has it)", abort=True)
    with _backend_of(config_file, "retire") as backend:
        entry = backend.retire_version(version)
    click.echo(f"retired version {version} (key_id {entry.key.key_id}); its key object is destroyed")


@pkcs11_group.command("keys")
@config_option
@output_option
def keys_command(config_file: Path | None, output: str) -> None:
    """List the KEK versions on the token and their key_ids (no key material)."""
    with _backend_of(config_file, "keys") as backend:
        usable, retired = backend.versions()
    current = max(usable, default=None)
    rows = [{"version": v.version, "key_id": v.key.key_id, "state": "retired" if v.version in retired else "active",
             "current": v.version == current, "label": _version_label(backend.settings.key_label, v.version),
             "object_id": v.object_id.hex()}
            for v in sorted((*usable.values(), *retired.values()), key=lambda v: v.version)]
    if output == "json":
        click.echo(json.dumps({"token": backend.settings.token_label or backend.settings.token_serial,
                               "key_label": backend.settings.key_label, "versions": rows}, indent=2))
        return
    print_table(f"token {_token_name(backend.settings)}, key {backend.settings.key_label}",
                ("version", "state", "current", "label", "CKA_ID", "key_id"),
                [(f"v{r['version']}", r["state"], "current" if r["current"] else "", r["label"], r["object_id"],
                  r["key_id"]) for r in rows])
