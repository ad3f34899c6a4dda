"""The local backend: AES-256 KEK versions in a keyring file on the node (the embedded default).

The keyring is a JSON file, mode 0600, owned by the user kleidi runs as::

    {"format": "kleidi-keyring", "format_version": 1, "keyring_id": "<uuid4>", "current": 2,
     "versions": [{"version": 1, "created": "...", "state": "retired", "retired": "..."},
                  {"version": 2, "created": "...", "state": "active", "key": "<base64 AES-256>"}]}

Versions only ever grow; a retired version keeps its entry (without key material) so its number
and key_id are never handed out again. Every write goes through a lock file and is atomic
(write a temp file, fsync, rename, fsync the directory): a crash leaves the old file or the new one.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import logging
import os
import stat
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import click

from kleidi._crypto import aead
from kleidi.backends.base import Backend, FileStamp, KeySet, KeyVersion, stat_stamp
from kleidi.checks import FAIL, PASS, Check
from kleidi.cli_support import KeyVersionType, config_option, load, output_option, print_table
from kleidi.errors import ConfigError, InvalidRequest, KeyringError, KleidiError, RetiredKey
from kleidi.settings.types import BackendSettingsBase

log = logging.getLogger("kleidi.backends.local")
F = TypeVar("F", bound=Callable[..., Any])

FORMAT = "kleidi-keyring"
FORMAT_VERSION = 1
ACTIVE = "active"
RETIRED = "retired"
RETIRED_FIX = ("if the objects stored under it are still needed, restore that version from a keyring backup made "
               "before `kleidi retire`; else delete and re-create them")


class LocalBackendSettings(BackendSettingsBase):
    """A software KEK kept in a keyring file on the node (AES-256-GCM)."""

    kind: Literal["local"] = "local"
    """Backend type."""

    keyring: Path = Path("/var/lib/kleidi/keyring.json")
    """Keyring file holding the KEK versions. Must be mode 0600 (or stricter) and owned by the user
    kleidi runs as. Create it with `kleidi keygen`."""

    create_if_missing: bool = False
    """Create a new keyring at start-up if the file does not exist. Convenient for a first try; in
    production create it with `kleidi keygen` and back it up."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class KeyEntry:
    version: int
    created: str
    state: str = ACTIVE
    key: bytes | None = field(default=None, repr=False)
    retired: str | None = None


@dataclass
class Keyring:
    """The keyring file's contents. Mutate only inside :func:`edit_keyring`."""

    keyring_id: str
    current: int
    versions: dict[int, KeyEntry]

    # -- derived views -----------------------------------------------------------------------

    def key_id(self, version: int) -> str:
        entry = self.versions[version]
        return KeyVersion.derive(LocalBackend.kind, self.keyring_id, version, entry.created).key_id

    def key_set(self, generation: object = None) -> KeySet:
        usable = {self.key_id(v): KeyVersion(self.key_id(v), v)
                  for v, e in self.versions.items() if e.state == ACTIVE}
        retired = {self.key_id(v): KeyVersion(self.key_id(v), v)
                   for v, e in self.versions.items() if e.state == RETIRED}
        current = KeyVersion(self.key_id(self.current), self.current)
        return KeySet(current=current, usable=usable, retired=retired, generation=generation)

    # -- changes -----------------------------------------------------------------------------

    @classmethod
    def new(cls) -> Keyring:
        return cls(keyring_id=str(uuid.uuid4()), current=1,
                   versions={1: KeyEntry(version=1, created=_now(), key=aead.new_key())})

    def rotate(self) -> KeyEntry:
        """Add a new version and make it current."""
        version = max(self.versions) + 1
        entry = KeyEntry(version=version, created=_now(), key=aead.new_key())
        self.versions[version] = entry
        self.current = version
        return entry

    def retire(self, version: int) -> KeyEntry:
        """Destroy a version's key material; ciphertexts wrapped with it can no longer be decrypted."""
        entry = retirable(self.versions, version, self.current, "keyring", "kleidi")
        entry.state, entry.key, entry.retired = RETIRED, None, _now()
        return entry

    # -- (de)serialisation -------------------------------------------------------------------

    def to_json(self) -> str:
        versions = []
        for v in sorted(self.versions):
            e = self.versions[v]
            item: dict[str, Any] = {"version": v, "created": e.created, "state": e.state}
            if e.key is not None:
                item["key"] = base64.b64encode(e.key).decode()
            if e.retired is not None:
                item["retired"] = e.retired
            versions.append(item)
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "keyring_id": self.keyring_id,
               "current": self.current, "versions": versions}
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, path: Path) -> Keyring:
        def bad(why: str) -> KeyringError:
            return KeyringError(f"keyring {path} is malformed: {why}", fix="restore it from your backup")

        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise bad(f"not JSON (line {exc.lineno})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise bad(f"not a kleidi keyring (no \"format\": \"{FORMAT}\")")
        if doc.get("format_version") != FORMAT_VERSION:
            raise KeyringError(f"keyring {path} has format_version {doc.get('format_version')!r}; this kleidi "
                               f"reads {FORMAT_VERSION}", fix="upgrade kleidi to the version that wrote the keyring")
        try:
            versions: dict[int, KeyEntry] = {}
            for item in doc["versions"]:
                version = int(item["version"])
                if not 0 < version < 2**32 or version in versions:
                    raise bad(f"version {version} is out of range or repeated")
                state = item["state"]
                if state == ACTIVE:
                    key = base64.b64decode(item["key"], validate=True)
                    if len(key) != aead.KEY_SIZE:
                        raise bad(f"version {version} key is not {aead.KEY_SIZE} bytes")
                elif state == RETIRED:
                    key = None
                else:
                    raise bad(f"version {version} has unknown state {state!r}")
                versions[version] = KeyEntry(version=version, created=str(item["created"]), state=state,
                                             key=key, retired=item.get("retired"))
            keyring = cls(keyring_id=str(doc["keyring_id"]), current=int(doc["current"]), versions=versions)
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            if isinstance(exc, KeyringError):
                raise
            raise bad(f"missing or invalid field ({type(exc).__name__}: {exc})") from None
        current = versions.get(keyring.current)
        if current is None or current.state != ACTIVE:
            raise bad(f"current version {keyring.current} is missing or retired")
        return keyring


def check_file_safety(path: Path) -> os.stat_result:
    """Refuse a keyring that is a symlink, not a regular file, readable by others, or not ours."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise KeyringError(f"keyring {path} does not exist", fix=f"create it with `kleidi keygen --keyring {path}` "
                           "(or set backend.create_if_missing: true for a first try)") from None
    if stat.S_ISLNK(st.st_mode):
        raise KeyringError(f"keyring {path} is a symbolic link", fix="point backend.keyring at the real file")
    if not stat.S_ISREG(st.st_mode):
        raise KeyringError(f"keyring {path} is not a regular file",
                           fix="point backend.keyring at the keyring file that `kleidi keygen` wrote")
    if st.st_mode & 0o077:
        raise KeyringError(f"keyring {path} has mode {stat.S_IMODE(st.st_mode):04o}, readable or writable by "
                           "others", fix=f"chmod 600 {path}")
    parent = os.stat(path.parent)
    if parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX:
        raise KeyringError(f"keyring directory {path.parent} is writable by others, who could replace the keyring",
                           fix=f"chmod go-w {path.parent}")
    if st.st_uid != os.geteuid():
        raise KeyringError(f"keyring {path} is owned by uid {st.st_uid}, not by uid {os.geteuid()} that kleidi "
                           "runs as", fix=f"chown {os.geteuid()} {path}")
    return st


def read_private_file(path: Path, what: str,
                      check: Callable[[Path], os.stat_result] = check_file_safety) -> tuple[str, os.stat_result]:
    """The text of a key file (``what``: "keyring") once ``check`` found it safe, and its stat."""
    st = check(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeyringError(f"{what} {path} cannot be read: {exc.strerror}",
                           fix="let kleidi's user read it (it should own the file, mode 0600)") from None
    return text, st


def read_keyring(path: Path) -> tuple[Keyring, os.stat_result]:
    text, st = read_private_file(path, "keyring")
    return Keyring.from_json(text, path), st


class _Versioned(Protocol):
    state: str


E = TypeVar("E", bound=_Versioned)


def retirable(versions: Mapping[int, E], version: int, current: int, store: str, commands: str) -> E:
    """The entry of ``version``, once the checks every store of key versions makes before retiring one
    pass; ``commands`` is how its key commands start (``kleidi``, ``kleidi tpm``)."""
    entry = versions.get(version)
    if entry is None:
        raise InvalidRequest(f"{store} has no version {version}", fix=f"give a version that `{commands} keys` lists")
    if version == current:
        raise InvalidRequest(f"version {version} is current",
                             fix=f"rotate first (`{commands} rotate`), re-encrypt, then retire it")
    if entry.state == RETIRED:
        raise InvalidRequest(f"version {version} is already retired",
                             fix=f"check the version: `{commands} keys` lists the ones still active")
    return entry


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def locked_file(path: Path) -> Iterator[None]:
    lock_path = path.with_name(f".{path.name}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def create_keyring(path: Path) -> Keyring:
    """Create a new keyring with one version. Never overwrites an existing file."""
    if path.parent.exists() and not path.parent.is_dir():
        raise KeyringError(f"cannot create keyring {path}: {path.parent} is not a directory",
                           fix="choose a keyring path inside a directory")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with locked_file(path):
            if os.path.lexists(path):
                raise KeyringError(f"keyring {path} already exists; kleidi never overwrites a keyring",
                                   fix="use `kleidi rotate` to add a version, or choose another path")
            keyring = Keyring.new()
            write_atomically(path, keyring.to_json())
    except OSError as exc:
        # e.g. keygen run as kleidi's own user (uid 10001) in a directory only root may enter
        raise KeyringError(f"cannot create keyring {path}: {exc.strerror or type(exc).__name__}",
                           fix=f"run as a user who may write {path.parent}, or create that directory for this "
                               "user first (it must be writable only by kleidi's user)") from None
    return keyring


class _Stored(Protocol):
    def to_json(self) -> str: ...


S = TypeVar("S", bound=_Stored)


@contextlib.contextmanager
def edit_locked(path: Path, read: Callable[[Path], tuple[S, os.stat_result]]) -> Iterator[S]:
    """Read a key file with ``read``, let the caller change it, and atomically write it back, under
    an exclusive lock (the keyring; the TPM backend's key store)."""
    with locked_file(path):
        stored, _ = read(path)
        yield stored
        write_atomically(path, stored.to_json())


def edit_keyring(path: Path) -> contextlib.AbstractContextManager[Keyring]:
    """Read, let the caller change, and atomically write back the keyring, under an exclusive lock."""
    return edit_locked(path, read_keyring)


@dataclass
class _Created:
    """What creating a keyring makes: the file, its lock file and the directories above it."""

    keyring: Path
    lock: Path | None
    directories: list[Path]  # deepest first

    @classmethod
    def before_creating(cls, path: Path) -> _Created:
        lock = path.with_name(f".{path.name}.lock")
        missing = []
        for parent in path.parents:
            if os.path.lexists(parent):
                break
            missing.append(parent)
        return cls(path, None if os.path.lexists(lock) else lock, missing)

    def remove(self) -> bool:
        """Remove it all, unless the keyring is no longer only what was created (e.g. rotated since)."""
        try:
            ring, _ = read_keyring(self.keyring)
        except (KleidiError, OSError):
            return False  # gone, or not a keyring kleidi would recognise: leave it alone
        if list(ring.versions) != [1]:
            return False
        for path in (self.keyring, self.lock):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for directory in self.directories:
            with contextlib.suppress(OSError):
                directory.rmdir()
        return True


class LocalBackend(Backend):
    """KEK versions from a local keyring file; re-read whenever the file changes."""

    kind: ClassVar[str] = "local"
    settings_model: ClassVar[type[LocalBackendSettings]] = LocalBackendSettings
    retired_fix: ClassVar[str] = RETIRED_FIX

    @classmethod
    def file_checks(cls, settings: LocalBackendSettings) -> list[Check]:
        try:
            check_file_safety(settings.keyring)
        except KleidiError as exc:
            return [Check("keyring file", FAIL, exc.message, exc.fix or "")]
        return [Check("keyring file", PASS, f"{settings.keyring}: regular file, mode 0600 or stricter, ours")]

    @classmethod
    def cli_commands(cls) -> list[tuple[str, Any]]:
        return [("", command) for command in _COMMANDS]

    @classmethod
    def setting_flags(cls, command: str) -> list[Any]:
        flags = [_keyring_flag()]
        if command == "serve":
            flags.append(click.Option(["--create-keyring", "create_if_missing"], is_flag=True, default=None,
                                      help="Create the local keyring if it is missing (backend.create_if_missing); "
                                           "nothing is created if start-up fails."))
        return flags

    def __init__(self, settings: LocalBackendSettings) -> None:
        self._path = settings.keyring
        self._create_if_missing = settings.create_if_missing  # at the first load: no I/O in the constructor
        self._created: _Created | None = None
        self._keys: dict[int, bytes] = {}
        self._key_set: KeySet | None = None
        self._file_identity: FileStamp | None = None

    def describe(self) -> str:
        return f"local keyring {self._path}"

    async def load_keys(self, force: bool = False) -> KeySet:
        if self._create_if_missing:
            self._create_if_missing = False
            if not os.path.lexists(self._path):
                created = _Created.before_creating(self._path)
                create_keyring(self._path)
                self._created = created
        identity = stat_stamp(check_file_safety(self._path))
        if not force and self._key_set is not None and identity == self._file_identity:
            return self._key_set
        keyring, st = read_keyring(self._path)
        self._keys = {v: e.key for v, e in keyring.versions.items() if e.key is not None}
        self._file_identity = stat_stamp(st)
        self._key_set = keyring.key_set(generation=self._file_identity)
        return self._key_set

    def _key(self, key: KeyVersion) -> bytes:
        material = self._keys.get(key.version)
        if material is None:
            raise RetiredKey(f"key_id {key.key_id} (local version {key.version}) has been retired",
                             fix=RETIRED_FIX)
        return material

    def discard_created(self) -> None:
        created, self._created = self._created, None
        if created is not None and created.remove():
            log.warning("start-up failed: removed the keyring %s that create_if_missing (--create-keyring) had just "
                        "made", created.keyring)

    async def wrap(self, key: KeyVersion, plaintext: bytes, aad: bytes) -> bytes:
        return aead.seal(self._key(key), plaintext, aad)

    async def unwrap(self, key: KeyVersion, payload: bytes, aad: bytes) -> bytes:
        return aead.open_sealed(self._key(key), payload, aad)

    async def close(self) -> None:
        self._keys = {}


# -- CLI commands: the keyring's lifecycle ---------------------------------------------------------


def _local_keyring_path(config_file: Path | None, keyring: Path | None, command: str,
                        version: int | None = None) -> Path:
    from kleidi.registry import registered_class

    settings = load(config_file, **{"backend.keyring": keyring})
    backend = settings.backend
    if backend.kind != "local":
        hint = registered_class(backend.kind).lifecycle_hint(command, backend, version)
        raise ConfigError(f"`kleidi {command}` manages the local backend's keyring; this config's backend is "
                          f"{backend.kind}", fix=hint or f"manage the keys with the {backend.kind} backend's own tools")
    path: Path = backend.keyring
    return path


def _keyring_flag() -> click.Option:
    return click.Option(["--keyring"], type=click.Path(dir_okay=False, path_type=Path),
                        help="Local backend keyring file (overrides backend.keyring).")


def keyring_options(func: F) -> F:
    """--config and --keyring, on every command of the keyring's lifecycle."""
    func.__click_params__ = [*getattr(func, "__click_params__", []), _keyring_flag()]  # type: ignore[attr-defined]
    return config_option(func)


@click.command()
@keyring_options
def keygen(config_file: Path | None, keyring: Path | None) -> None:
    """Create a new local keyring (mode 0600) with one KEK version."""
    path = _local_keyring_path(config_file, keyring, "keygen")
    created = create_keyring(path)
    click.echo(f"created keyring {path}\ncurrent version {created.current}, key_id {created.key_id(created.current)}"
               "\nBack this file up: without it nothing encrypted with it can be read.")


@click.command()
@keyring_options
def rotate(config_file: Path | None, keyring: Path | None) -> None:
    """Add a new KEK version to the local keyring and make it current."""
    path = _local_keyring_path(config_file, keyring, "rotate")
    with edit_keyring(path) as ring:
        entry = ring.rotate()
    click.echo(f"rotated {path}: version {entry.version} is current, key_id {ring.key_id(entry.version)}\n"
               "Running servers pick it up within backend.refresh_interval (or at once on SIGHUP); older versions "
               "keep decrypting until you retire them.")


@click.command()
@keyring_options
@click.argument("version", type=KeyVersionType())
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def retire(config_file: Path | None, keyring: Path | None, version: int, yes: bool) -> None:
    """Destroy the key material of an old KEK VERSION (v1 or 1, as `kleidi keys` shows it). Ciphertexts
    wrapped with it stop decrypting."""
    path = _local_keyring_path(config_file, keyring, "retire", version)
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("retiring destroys a key; pass --yes to confirm when not at a terminal")
        click.confirm(f"Destroy version {version} of {path}? Data still encrypted with it becomes unreadable",
                      abort=True)
    with edit_keyring(path) as ring:
        ring.retire(version)
    click.echo(f"retired version {version} of {path} (key_id {ring.key_id(version)})")


@click.command()
@keyring_options
@output_option
def keys(config_file: Path | None, keyring: Path | None, output: str) -> None:
    """List the local keyring's versions and their key_ids (no key material)."""
    path = _local_keyring_path(config_file, keyring, "keys")
    ring, _ = read_keyring(path)
    rows = [{"version": v, "key_id": ring.key_id(v), "state": e.state, "current": v == ring.current,
             "created": e.created, "retired": e.retired} for v, e in sorted(ring.versions.items())]
    if output == "json":
        click.echo(json.dumps({"keyring": str(path), "keyring_id": ring.keyring_id, "versions": rows}, indent=2))
        return
    print_table(f"keyring {path}", ("version", "state", "current", "created", "retired", "key_id"),
                 [(f"v{row['version']}", row["state"], "current" if row["current"] else "", row["created"],
                   row["retired"], row["key_id"]) for row in rows])


_COMMANDS = (keygen, rotate, retire, keys)
