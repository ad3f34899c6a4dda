"""The unix socket kube-apiserver dials: parsing its endpoint, preparing the path, locking it down."""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import socket as _socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from kleidi.errors import ConfigError, InvalidValue

MAX_SOCKET_PATH = 107
"""sun_path is 108 bytes including the terminating NUL (for an abstract name, the leading NUL)."""


@dataclass(frozen=True)
class Endpoint:
    """A parsed ``unix://`` endpoint: a filesystem path, or a Linux abstract socket name."""

    url: str
    path: Path | None = None
    abstract_name: str | None = None

    @property
    def grpc_address(self) -> str:
        """The address grpcio understands for this endpoint."""
        if self.abstract_name is not None:
            return f"unix-abstract:{self.abstract_name}"
        return f"unix://{self.path}"

    def __str__(self) -> str:
        return self.url


def parse_endpoint(url: str) -> Endpoint:
    """Parse an endpoint the way the apiserver does (kms-protocol.md §1.1).

    ``unix:///var/run/kms.sock`` is the path ``/var/run/kms.sock``; ``unix:///@name`` is the abstract
    socket ``name``. Anything else raises :class:`InvalidValue` (a ValueError) with the fix.
    """
    parsed = urlparse(url)
    if "@" in parsed.netloc:
        # Not echoed: whatever is before the @ may be a credential.
        raise InvalidValue("endpoint holds a user name or password (user@); a unix socket has neither",
                           fix="use unix:///absolute/path")
    if parsed.scheme != "unix":
        raise InvalidValue(f"endpoint must start with unix:// (the apiserver only speaks to unix sockets), got {url!r}",
                           fix="use unix:///absolute/path, e.g. unix:///var/run/kleidi/kleidi.sock")
    if parsed.netloc:
        raise InvalidValue(f"endpoint {url!r} has a host part {parsed.netloc!r}",
                           fix=f"use three slashes: unix:///{parsed.netloc}{parsed.path}")
    if not parsed.path or parsed.path == "/":
        raise InvalidValue(f"endpoint {url!r} names no socket path",
                           fix="add the socket's path, e.g. unix:///var/run/kleidi/kleidi.sock")
    if not parsed.path.startswith("/"):
        raise InvalidValue(f"endpoint {url!r} is relative", fix="use an absolute path: unix:///absolute/path")
    if len(parsed.path.encode()) > MAX_SOCKET_PATH:
        raise InvalidValue(f"socket path {parsed.path[:40]}... is {len(parsed.path.encode())} bytes; unix sockets "
                           f"allow at most {MAX_SOCKET_PATH}", fix=f"use a path of at most {MAX_SOCKET_PATH} bytes")
    if parsed.path.startswith("/@"):
        name = parsed.path[2:]
        if not name:
            raise InvalidValue(f"endpoint {url!r} names an empty abstract socket",
                               fix="name it after the @, e.g. unix:///@kleidi")
        return Endpoint(url=url, abstract_name=name)
    return Endpoint(url=url, path=Path(parsed.path))


def check_endpoint_flag(url: str, flag: str) -> Endpoint:
    """:func:`parse_endpoint` for a command-line flag: a refusal is a ConfigError naming ``flag``."""
    try:
        return parse_endpoint(url)
    except InvalidValue as exc:
        raise ConfigError(f"{flag}: {exc.message}", fix=exc.fix) from None


def is_listening(path: Path) -> bool:
    """Whether a process accepts connections on the unix socket ``path``.

    :raises OSError: it cannot be told (e.g. no permission to connect).
    """
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        probe.close()
    return True


_MAX_SYMLINKS = 40  # as the kernel's own limit for one path lookup


def check_ancestors(path: Path, what: str) -> None:
    """Refuse ``path`` if anyone but root or kleidi's own user could replace it or a directory above it.

    Whoever can rename a directory on the way (even one of kleidi's own 0700 ones, by writing its
    parent) can move it away and put their own in its place: a socket of theirs then receives the
    apiserver's seeds. So, as OpenSSH does for key files, every directory from / down to ``path``
    (and ``path`` itself if it is a directory) must be owned by root or kleidi's user, and not
    writable by group or others unless sticky (like /tmp's 1777, where only an entry's owner may
    rename it). A group-writable directory is refused even when root owns it, as OpenSSH does: who
    is in a group is beyond kleidi's control. The walk uses lstat, component by component: a
    symlink on the way must be owned by root or kleidi's user (its directory is already checked,
    so no one else can swap it), then its target is walked the same way. The walk ends at the first
    missing component (only root or kleidi can create it there) or at a non-directory (the socket
    itself: the caller decides about it). Raises :class:`ConfigError` naming ``what`` (the
    setting), the directory and the fix.
    """
    if not path.is_absolute():
        raise ConfigError(f"{what}: {path} must be an absolute path", fix="give it from /")
    uid = os.geteuid()
    current = Path("/")
    _check_entry(current, _lstat(current, what), uid, what)
    pending = list(reversed(path.parts[1:]))  # still to walk, the next one last
    links = 0
    while pending:
        part = pending.pop()
        if part == "..":
            current = current.parent  # current is always a real directory, so its parent is its real parent
            continue
        candidate = current / part
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ConfigError(f"{what}: cannot check {candidate}: {exc.strerror}",
                              fix="let kleidi's user search every directory on the path (chmod +x)") from None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                raise ConfigError(f"{what}: {path} goes through more than {_MAX_SYMLINKS} symbolic links",
                                  fix="give the path without symbolic links")
            _check_entry(candidate, st, uid, what)
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                current = Path("/")
            pending.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
            continue
        if not stat.S_ISDIR(st.st_mode):
            return
        _check_entry(candidate, st, uid, what)
        current = candidate


def _lstat(path: Path, what: str) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot check {path}: {exc.strerror}",
                          fix="let kleidi's user search every directory on the path (chmod +x)") from None


def _check_entry(path: Path, st: os.stat_result, uid: int, what: str) -> None:
    """One directory (or symlink) on the way: owned by root or us; a directory also not writable by others."""
    if st.st_uid not in (0, uid):
        try:
            owner = f"{pwd.getpwuid(st.st_uid).pw_name} (uid {st.st_uid})"
        except KeyError:
            owner = f"uid {st.st_uid}"
        ours = "root" if uid == 0 else f"root or kleidi's user (uid {uid})"
        kind, chown = ("symbolic link", "chown -h") if stat.S_ISLNK(st.st_mode) else ("directory", "chown")
        raise ConfigError(f"{what}: {kind} {path} is owned by {owner}, not by {ours}: that user could replace what "
                          "is below it and receive what kleidi serves there",
                          fix=f"{chown} root {path}, or choose a path under directories owned by root")
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode) and mode & 0o022 and not mode & stat.S_ISVTX:
        raise ConfigError(f"{what}: directory {path} is writable by others (mode {mode:04o}: group- or "
                          "world-writable without the sticky bit), who could move what is below it away and put "
                          "their own files (a socket that receives the apiserver's seeds) in its place",
                          fix=f"chmod go-w {path}, or choose a path under directories only root can write")


def _make_parents(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each 0700 (Path.mkdir gives parents the umask's mode)."""
    missing = []
    while not os.path.lexists(directory):
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)


def prepare_path(endpoint: Endpoint) -> None:
    """Make the socket path ready to bind, or refuse with the reason.

    Refuses a path under a directory others could replace (:func:`check_ancestors`), a symlink, a
    regular file or any other non-socket at the path, and a socket another process is listening
    on. Removes a stale socket left by a dead process. Creates missing directories with mode 0700.
    """
    path = endpoint.path
    if path is None:
        return
    if not path.is_absolute():
        raise ConfigError(f"server.endpoint: socket path {path} must be absolute", fix="use unix:///absolute/path")
    check_ancestors(path, "server.endpoint")  # before creating anything under a directory others control
    try:
        _make_parents(path.parent)
        check_ancestors(path, "server.endpoint")  # again, with the directories just created
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"server.endpoint: cannot use {path}: {exc.strerror} ({path.parent} must be a directory "
                          "kleidi can create and write)", fix="create the directory, or choose another path") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"server.endpoint: {path} is a symbolic link; kleidi will not follow it",
                          fix="remove the link or choose another path")
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"server.endpoint: {path} exists and is not a socket; kleidi will not replace it",
                          fix="remove it or choose another path")
    try:
        listening = is_listening(path)
    except OSError as exc:
        raise ConfigError(f"server.endpoint: cannot check whether {path} is in use: {exc.strerror}",
                          fix="let kleidi's user connect to the socket and search its directory") from None
    if listening:
        raise ConfigError(f"server.endpoint: another process is already serving on {path}",
                          fix="stop it, or choose another path")
    path.unlink()


def _resolve_id(value: int | str, lookup: Callable[[str], int], what: str) -> int:
    """A numeric id from a number or a name (a string of digits counts as a number)."""
    if isinstance(value, int) or value.isdigit():
        return int(value)
    try:
        return lookup(value)
    except KeyError:
        raise InvalidValue(f"no {what} named {value!r} on this host",
                           fix=f"use an existing {what} name or a numeric id") from None


def resolve_uid(value: int | str) -> int:
    return _resolve_id(value, lambda name: pwd.getpwnam(name).pw_uid, "user")


def resolve_gid(value: int | str) -> int:
    return _resolve_id(value, lambda name: grp.getgrnam(name).gr_gid, "group")


@contextlib.contextmanager
def owner_only_umask() -> Iterator[None]:
    """Create files (sockets) with mode 0600 at most: a socket must never exist with a wider mode,
    even for the moment between bind and :func:`restrict`."""
    old_umask = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old_umask)


def restrict(endpoint: Endpoint, mode: int, group: str | int | None) -> None:
    """Apply the configured mode and group to a bound socket file."""
    if endpoint.path is None:
        return
    if group is not None:
        try:
            gid = resolve_gid(group)
        except InvalidValue as exc:
            raise ConfigError(f"server.socket_group: {exc.message}", fix=exc.fix) from None
        os.chown(endpoint.path, -1, gid)
    os.chmod(endpoint.path, mode)


def remove(endpoint: Endpoint, inode: int | None) -> None:
    """Remove our socket file at shutdown, but never one that another process has since bound."""
    if endpoint.path is None:
        return
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(endpoint.path)
        if stat.S_ISSOCK(st.st_mode) and (inode is None or st.st_ino == inode):
            endpoint.path.unlink()


def inode_of(endpoint: Endpoint) -> int | None:
    if endpoint.path is None:
        return None
    try:
        return os.lstat(endpoint.path).st_ino
    except FileNotFoundError:
        return None
