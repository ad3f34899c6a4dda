"""kleidi's private runtime directory: where the gRPC server behind the caller gate listens.

``<runtime_dir>/.kleidi-<pid>-<8 random characters>/`` (mode 0700) holds ``grpc.sock`` and, for a
moment each, the relay sockets of :mod:`kleidi.callers`. Only kleidi's user (and root) can create
anything in it, which is what makes a relay's name impossible for anyone else to take first.

``server.runtime_dir`` defaults to systemd's ``$RUNTIME_DIRECTORY``, else the public socket's own
directory, else (abstract socket) the temporary directory: never a shared ``/tmp`` when there is a
better place, and always somewhere writable under a read-only root filesystem. The directory is
locked (``flock``) while kleidi lives; at start, the directories of kleidis that were killed are
removed, and nothing else: not another user's, not a live kleidi's, never through a symlink.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from kleidi import endpoint
from kleidi.endpoint import Endpoint
from kleidi.errors import ConfigError

log = logging.getLogger("kleidi.runtime")

GRPC_SOCKET = "grpc.sock"
"""The gRPC server's socket inside the private directory."""
_PREFIX = ".kleidi-"
_NAME = re.compile(r"\.kleidi-(\d+)-[a-z0-9_]{8}")  # .kleidi-<pid>-<mkdtemp's 8 random characters>
_LOCK_WAIT = 5.0  # seconds to wait for another starting kleidi to finish with the runtime directory


class PrivateDirectory:
    """One kleidi's private directory: :meth:`create` at start-up, :meth:`remove` at shutdown."""

    def __init__(self, public: Endpoint, configured: Path | None, longest_entry: int) -> None:
        """``longest_entry``: the longest name kleidi will bind inside (for the sun_path check)."""
        self.base, self._setting = _runtime_base(public, configured)
        self._longest_entry = max(longest_entry, len(GRPC_SOCKET))
        self._path: Path | None = None
        self._lock_fd: int | None = None  # flock held on the private directory for kleidi's life

    @property
    def path(self) -> Path:
        if self._path is None:
            raise RuntimeError("PrivateDirectory.create() has not run")
        return self._path

    def create(self) -> Path:
        """Check the runtime directory, remove private directories that killed kleidis left behind in
        it, and create this one's (0700, locked while kleidi lives)."""
        base = self.base
        name_len = len(_PREFIX) + len(str(os.getpid())) + 1 + 8
        longest = len(os.fsencode(base)) + 1 + name_len + 1 + self._longest_entry
        if longest > endpoint.MAX_SOCKET_PATH:
            raise ConfigError(f"{self._setting}: {base} is too long for kleidi's private sockets (their paths "
                              f"would be up to {longest} bytes; unix sockets allow {endpoint.MAX_SOCKET_PATH})",
                              fix="set server.runtime_dir to a shorter directory, e.g. /run/kleidi")
        endpoint.check_ancestors(base, self._setting)  # else someone could swap in a directory of theirs
        try:
            base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"{self._setting}: cannot use {base}: {exc.strerror}",
                              fix="create it, writable by kleidi's user, or set server.runtime_dir to such a "
                              "directory") from None
        try:
            # Serialise with other kleidis starting in the same directory: none removes a directory that
            # another has created but not locked yet.
            if _lock(base_fd, _LOCK_WAIT):
                _remove_stale(base, base_fd)
            else:
                log.warning("runtime directory %s stayed locked for %.0fs; left stale private directories in it",
                            base, _LOCK_WAIT)
            try:
                private = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base))  # 0700
            except OSError as exc:
                raise ConfigError(f"{self._setting}: cannot create kleidi's private directory in {base}: "
                                  f"{exc.strerror}", fix=f"let kleidi's user write {base}, or set server.runtime_dir "
                                  "to a directory it can write (a tmpfs works under a read-only root)") from None
            self._path = private
            self._lock_fd = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(base_fd)  # releases the runtime directory's lock
        return private

    def remove(self) -> None:
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _runtime_base(public: Endpoint, configured: Path | None) -> tuple[Path, str]:
    """Where the private directory goes, and the setting to name in an error about it."""
    if configured is not None:
        base, setting = configured, "server.runtime_dir"
    elif os.environ.get("RUNTIME_DIRECTORY"):
        # systemd lists several directories with ':'
        base, setting = Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]), "server.runtime_dir ($RUNTIME_DIRECTORY)"
    elif public.path is not None:
        base, setting = public.path.parent, "server.runtime_dir (unset: the directory of server.endpoint)"
    else:
        base, setting = Path(tempfile.gettempdir()), "server.runtime_dir (unset: the temporary directory)"
    if not base.is_absolute():
        raise ConfigError(f"{setting}: {base} is not absolute", fix="use an absolute path")
    return base, setting


def _lock(fd: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _listened(path: Path) -> bool:
    """Whether a process accepts connections on ``path`` (in doubt: yes)."""
    try:
        return endpoint.is_listening(path)
    except OSError:
        return True


def _remove_stale(base: Path, base_fd: int) -> None:
    """Remove private directories of kleidis that were killed: ours (same uid), named like ours, not
    a symlink, not locked by a live kleidi, and with no live process or no listener behind them."""
    uid = os.getuid()
    for name in os.listdir(base_fd):
        match = _NAME.fullmatch(name)
        if match is None:
            continue
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=base_fd)
        except OSError:
            continue  # a symlink, not a directory, or gone
        try:
            if os.fstat(fd).st_uid != uid or not stat.S_ISDIR(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live kleidi holds it
            pid = int(match.group(1))
            if pid != os.getpid() and _pid_alive(pid) and _listened(base / name / GRPC_SOCKET):
                continue
            if os.stat(name, dir_fd=base_fd, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
                continue  # replaced since we opened it
            shutil.rmtree(name, dir_fd=base_fd)  # never follows symlinks inside
            log.info("removed the private directory %s of a kleidi that did not shut down (pid %d)",
                     base / name, pid)
        except OSError as exc:
            log.warning("could not remove the stale private directory %s: %s", base / name, exc.strerror)
        finally:
            os.close(fd)
