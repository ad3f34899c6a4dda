"""Caller authentication on the socket: only allowed processes reach the gRPC server.

File permissions decide who may *connect* to a socket file; they say nothing for an abstract socket
and cannot tell the apiserver from any other process that shares its group. So kleidi asks the kernel
who is on the other end of each connection (``SO_PEERCRED``: the pid, uid and gid of the process that
connected, which the caller cannot forge) and checks it against an allowlist.

grpcio does not expose peer credentials, so the check sits in front of it. :class:`SocketGate` owns
the public socket. On each connection it reads the peer credentials and

* **allows** the caller: relays the connection, byte for byte, to the gRPC server, which listens on
  a socket inside a private 0700 directory (under ``server.runtime_dir``) that only kleidi's user
  (and root) can reach. Each relay connection is bound to a unique socket *file* in that same
  directory, which the gRPC server sees as the call's peer (``unix:<path>``), so the audit record of
  every call can name the calling process (:meth:`SocketGate.caller`). Nobody else can create a name
  there, so nobody can take a relay's name before kleidi binds it (abstract names, which anyone can
  read in /proc/net/unix and bind first, were open to exactly that);
* **refuses** the caller: the gRPC server never sees its bytes. The gate itself answers its first
  call with a gRPC ``PERMISSION_DENIED`` (HTTP/2 via ``h2``) and closes the connection. Every refusal
  is counted in ``kleidi_peer_credential_rejections_total``; the log line and audit record are
  rate-limited per uid (the first at once, the rest as one summary per
  ``server.refusal_report_interval``); at most ``server.max_refused_connections`` refused
  connections are held open at once, each for at most ``server.refused_timeout``.

No exception escapes the gate: whatever goes wrong with one connection closes that connection and
is logged with a neutral message (the exception's type, never its text, which could carry relayed
bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
import struct
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from kleidi import audit, endpoint, telemetry
from kleidi.endpoint import Endpoint, resolve_gid, resolve_uid
from kleidi.errors import ConfigError
from kleidi.runtime import GRPC_SOCKET, PrivateDirectory
from kleidi.tasks import TaskSet

log = logging.getLogger("kleidi.callers")

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_BACKLOG = 1024
_ACCEPT_BATCH = 256  # connections accepted per wake-up, so one busy listener cannot starve the loop
_ACCEPT_PAUSE = 0.25  # seconds without accepting once the process is out of file descriptors
_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RELAY_NAME_MAX = len("r-") + 16  # r-<hex counter>: a 64-bit counter never runs out


@dataclass(frozen=True)
class PeerCredentials:
    """Who is on the other end of a unix socket, as the kernel recorded it at connect time."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket) -> PeerCredentials:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        return cls(pid, uid, gid)

    def audit_fields(self) -> dict[str, int]:
        return {"caller_pid": self.pid, "caller_uid": self.uid, "caller_gid": self.gid}


@dataclass(frozen=True)
class CallerPolicy:
    """A caller is allowed when its uid is in ``uids`` or its (primary) gid is in ``gids``.

    kleidi's own process is always allowed: its /livez probe calls Status through the public socket.
    """

    uids: frozenset[int]
    gids: frozenset[int] = frozenset()

    @classmethod
    def from_settings(cls, uids: Iterable[int | str] | None, gids: Iterable[int | str]) -> CallerPolicy:
        allowed_uids = {os.getuid(), 0} if uids is None else {resolve_uid(u) for u in uids}
        return cls(frozenset(allowed_uids), frozenset(resolve_gid(g) for g in gids))

    def allows(self, peer: PeerCredentials) -> bool:
        return peer.uid in self.uids or peer.gid in self.gids or peer.pid == os.getpid()

    def describe(self) -> str:
        text = "uid " + ", ".join(str(u) for u in sorted(self.uids)) if self.uids else "no uid"
        return text + (" or gid " + ", ".join(str(g) for g in sorted(self.gids)) if self.gids else "")


@dataclass(frozen=True)
class RefusalLimits:
    """How much a refused caller may cost (see ServerSettings for each)."""

    max_open: int = 64
    timeout: float = 2.0
    report_interval: float = 60.0


# ------------------------------------------------------------------------------------------- guarding

class _Failing(Protocol):
    def _fail(self, exc: Exception, where: str) -> None: ...


_S = TypeVar("_S", bound=_Failing)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _guarded(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R | None]:
    """Turn any exception of a gate callback into ``self._fail`` (close and log), so that none reaches
    the event loop, whose handler would log its text (which may quote relayed bytes)."""
    where = method.__qualname__

    @functools.wraps(method)
    def wrapper(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R | None:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self._fail(exc, where)
            return None

    return wrapper


def _report_failure(exc: BaseException, where: str) -> None:
    with contextlib.suppress(Exception):
        log.error("caller gate: internal error (%s) in %s; the connection was closed", type(exc).__name__, where)


def _abort(transport: asyncio.BaseTransport | None) -> None:
    if transport is not None:
        with contextlib.suppress(Exception):
            cast(asyncio.Transport, transport).abort()


# ---------------------------------------------------------------------------------------------- relay

class _Pair:
    """The two sides of one allowed connection; closed as a whole."""

    def __init__(self, gate: SocketGate) -> None:
        self.gate = gate
        self.key: str | None = None  # the upstream's peer address, while the gRPC server may see it
        self.down = _Relay(self)
        self.up = _Relay(self)
        self.down.partner, self.up.partner = self.up, self.down
        self.closed = False

    def close(self) -> None:
        """Both directions are done (or one side is gone): close both, after flushing what is buffered."""
        if self.closed:
            return
        self.closed = True
        for side in (self.down, self.up):
            if side.transport is not None:
                with contextlib.suppress(Exception):
                    side.transport.close()

    def abort(self) -> None:
        self.closed = True
        _abort(self.down.transport)
        _abort(self.up.transport)

    def lost(self, side: _Relay) -> None:
        self.close()
        if side is self.up:  # the gRPC server has seen the last of this peer address
            self.forget()

    def forget(self) -> None:
        self.gate._forget(self)


class _Relay(asyncio.Protocol):
    """One side of an allowed connection; writes what it reads to its partner, with back-pressure."""

    partner: _Relay

    def __init__(self, pair: _Pair) -> None:
        self.pair = pair
        self.transport: asyncio.Transport | None = None
        self._pending: list[bytes] = []  # read before the partner's transport existed
        self.eof = False  # our peer will send nothing more

    def _fail(self, exc: Exception, where: str) -> None:
        _report_failure(exc, where)
        self.pair.abort()

    @_guarded
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        if self.pair.closed:  # the other side is already gone
            self.transport.close()
            return
        if self.partner.transport is None:
            self.transport.pause_reading()  # until the other side exists
            return
        # The partner has waited for us: deliver what it read, then let it read on.
        pending, self.partner._pending = self.partner._pending, []
        for chunk in pending:
            self.transport.write(chunk)
        self.partner.transport.resume_reading()
        if self.partner.eof:
            self.partner._forward_eof()

    @_guarded
    def data_received(self, data: bytes) -> None:
        self._forward(data)

    def _forward(self, data: bytes) -> None:
        if self.partner.transport is None:
            self._pending.append(data)
        else:
            self.partner.transport.write(data)

    @_guarded
    def eof_received(self) -> bool:
        self.eof = True
        if self.partner.transport is not None:
            self._forward_eof()
        return True  # keep our write side open: the other side may still be answering

    def _forward_eof(self) -> None:
        partner = self.partner.transport
        assert partner is not None
        if self.partner.eof or not partner.can_write_eof():
            self.pair.close()  # nothing more can flow either way
        else:
            partner.write_eof()

    @_guarded
    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.lost(self)

    # The partner cannot keep up: stop reading from our own side until it drains.
    @_guarded
    def pause_writing(self) -> None:
        if self.partner.transport is not None:
            self.partner.transport.pause_reading()

    @_guarded
    def resume_writing(self) -> None:
        if self.partner.transport is not None:
            self.partner.transport.resume_reading()


# -------------------------------------------------------------------------------------------- refusal

@dataclass
class _Window:
    last: PeerCredentials
    method: str | None
    count: int  # refusals since the last record, beyond the one logged at once
    timer: asyncio.TimerHandle | None = None


class _RefusalReporter:
    """Counts every refusal; logs and audits each uid's first one at once and the rest as one summary
    per interval, so that a flood costs O(1) log lines and audit records."""

    def __init__(self, policy: CallerPolicy, interval: float) -> None:
        self.policy = policy
        self.interval = interval
        self._windows: dict[int, _Window] = {}

    def refused(self, peer: PeerCredentials, method: str | None) -> None:
        telemetry.PEER_REJECTIONS.inc()  # first, so the count stays exact whatever the writes below do
        window = self._windows.get(peer.uid)
        if window is not None:
            window.count += 1
            window.last, window.method = peer, method
            return
        window = self._windows[peer.uid] = _Window(peer, method, 0)
        window.timer = asyncio.get_running_loop().call_later(self.interval, self._end_interval, peer.uid)
        log.warning("refused a caller: pid %d uid %d gid %d is not allowed (allowed: %s); fix: run the apiserver "
                    "as an allowed user, or add it to server.allowed_uids / server.allowed_gids",
                    peer.pid, peer.uid, peer.gid, self.policy.describe(),
                    extra={"fields": {**peer.audit_fields(), "method": method}})
        audit.note("caller_refused", method=method, outcome="PERMISSION_DENIED", **peer.audit_fields())

    def _end_interval(self, uid: int) -> None:
        try:
            window = self._windows[uid]
            if window.count == 0:  # quiet for a whole interval: the next refusal is news again
                del self._windows[uid]
                return
            self._summarise(window)
            window.timer = asyncio.get_running_loop().call_later(self.interval, self._end_interval, uid)
        except Exception as exc:
            _report_failure(exc, "refusal report")

    def _summarise(self, window: _Window) -> None:
        count, window.count = window.count, 0
        peer = window.last
        log.warning("refused a caller %d more times in the last %.0fs: uid %d (last: pid %d gid %d) is not allowed "
                    "(allowed: %s)", count, self.interval, peer.uid, peer.pid, peer.gid, self.policy.describe(),
                    extra={"fields": {**peer.audit_fields(), "method": window.method, "count": count}})
        audit.note("caller_refused", method=window.method, outcome="PERMISSION_DENIED", count=count,
                   **peer.audit_fields())

    def close(self) -> None:
        """Write what is still counted (at shutdown)."""
        for window in self._windows.values():
            if window.timer is not None:
                window.timer.cancel()
            if window.count:
                try:
                    self._summarise(window)
                except Exception as exc:
                    _report_failure(exc, "refusal report")
        self._windows.clear()


def _printable(raw: bytes) -> str | None:
    return "".join(c if c.isprintable() else "?" for c in raw[:128].decode("ascii", "replace")) or None


def _h2_server() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    return conn


@functools.cache
def _server_preface() -> bytes:
    """The server's SETTINGS frame: the same bytes for every connection."""
    return _h2_server().data_to_send()


class _Refusal(asyncio.Protocol):
    """Speaks just enough HTTP/2 to answer a refused caller's first call with PERMISSION_DENIED."""

    def __init__(self, gate: SocketGate, peer: PeerCredentials) -> None:
        self.gate = gate
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.h2: h2.connection.H2Connection | None = None  # made at the first bytes: most floods send none
        self._method: str | None = None
        self._resolved = False
        self._timer: asyncio.TimerHandle | None = None

    def _fail(self, exc: Exception, where: str) -> None:
        _report_failure(exc, where)
        self._resolve()
        _abort(self.transport)

    def _resolve(self) -> None:
        """Count and report this connection, exactly once."""
        if not self._resolved:
            self._resolved = True
            try:
                self.gate._refusals.refused(self.peer, self._method)
            except Exception as exc:
                _report_failure(exc, "refusal report")

    @_guarded
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._timer = asyncio.get_running_loop().call_later(self.gate.limits.timeout, self._give_up)
        self.transport.write(_server_preface())

    def _give_up(self) -> None:
        self._resolve()
        _abort(self.transport)  # abort: a caller that does not read must not keep the connection by that

    @_guarded
    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self._resolved:
            return
        if self.h2 is None:
            self.h2 = _h2_server()
            self.h2.data_to_send()  # the preface, already sent
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._give_up()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._method = _printable(dict(event.headers or []).get(b":path", b""))
                self.h2.send_headers(event.stream_id, [
                    (":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "7"),
                    ("grpc-message", f"caller uid {self.peer.uid} is not allowed to use this KMS plugin"),
                ], end_stream=True)
                self.h2.close_connection(last_stream_id=event.stream_id)
                self.transport.write(self.h2.data_to_send())
                self._resolve()
                self.transport.close()  # after the buffered answer is flushed; the timer aborts a stuck one
                return
        self.transport.write(self.h2.data_to_send())

    def eof_received(self) -> bool:
        return False  # the caller is done: close

    @_guarded
    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.gate._refused.discard(self)
        self._resolve()  # a caller that left before its first call is refused all the same


# ----------------------------------------------------------------------------------------------- gate

class SocketGate:
    """Owns the public socket; relays allowed callers to the gRPC server on a private socket.

    Life cycle: :meth:`prepare` (private directory), then the gRPC server binds
    :attr:`private_address`, then :meth:`start` (public socket); :meth:`close` undoes whatever of
    that was done.
    """

    def __init__(self, public: Endpoint, policy: CallerPolicy, *, runtime_dir: Path | None = None,
                 max_refused_connections: int = 64, refused_timeout: float = 2.0,
                 refusal_report_interval: float = 60.0) -> None:
        self.public = public
        self.policy = policy
        self.limits = RefusalLimits(max_refused_connections, refused_timeout, refusal_report_interval)
        self._private = PrivateDirectory(public, runtime_dir, longest_entry=_RELAY_NAME_MAX)
        self._listener: socket.socket | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._starved = False
        self._pairs: set[_Pair] = set()
        self._refused: set[_Refusal] = set()
        self._tasks = TaskSet()
        self._callers: dict[str, PeerCredentials] = {}  # relay's peer address ("unix:<path>") -> caller
        self._refusals = _RefusalReporter(policy, self.limits.report_interval)
        self._count = 0
        self.inode: int | None = None

    @property
    def private_path(self) -> Path:
        """The gRPC server's socket (after :meth:`prepare`)."""
        return self._private.path / GRPC_SOCKET

    @property
    def private_address(self) -> str:
        """Where the gRPC server listens (for ``add_insecure_port``)."""
        return f"unix://{self.private_path}"

    def caller(self, peer: str) -> PeerCredentials | None:
        """The credentials of the process behind a gRPC call's peer address, if it came through the gate."""
        return self._callers.get(peer)

    def prepare(self) -> None:
        """Check the public socket's path and create the private directory (:mod:`kleidi.runtime`)."""
        endpoint.prepare_path(self.public)
        self._private.create()

    async def start(self, mode: int, group: str | int | None) -> None:
        """Bind the public socket (never wider than 0600, even for a moment) and start accepting. If
        this fails, :meth:`close` cleans up."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with endpoint.owner_only_umask():
                sock.bind(f"\0{self.public.abstract_name}" if self.public.abstract_name is not None
                          else str(self.public.path))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"server.endpoint: cannot bind {self.public}: {exc.strerror}",
                              fix="check that the directory exists and that kleidi's user may write it") from None
        self.inode = endpoint.inode_of(self.public)  # from here on, close() removes the socket file
        try:
            endpoint.restrict(self.public, mode, group)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
            # The gate accepts by itself (not loop.create_unix_server): it keeps the backlog asked for
            # (uvloop listens again with its own of 100), and it can pause when out of file descriptors
            # instead of spinning on accept.
            asyncio.get_running_loop().add_reader(sock.fileno(), self._on_acceptable)
        except BaseException:
            sock.close()
            raise
        self._listener = sock

    def _fail(self, exc: Exception, where: str) -> None:
        _report_failure(exc, where)

    @_guarded
    def _on_acceptable(self) -> None:
        listener = self._listener
        for _ in range(_ACCEPT_BATCH):
            if listener is None or listener.fileno() < 0:
                return
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._pause_accepting(exc)
                return
            if self._starved:
                self._starved = False
                log.info("caller gate: accepting connections again")
            try:
                self._admit(conn)
            except Exception as exc:
                _report_failure(exc, "SocketGate._admit")
                conn.close()

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of file descriptors (or another accept error): stop accepting for a moment, logged once
        per episode. Callers wait in the listen backlog meanwhile."""
        if not self._starved:
            self._starved = True
            if exc.errno in _OUT_OF_FDS:
                log.error("caller gate: cannot take more connections: %s; pausing, and retrying every %.2fs; fix: "
                          "raise kleidi's open-file limit (LimitNOFILE=) or find what holds connections open",
                          exc.strerror, _ACCEPT_PAUSE)
            else:
                log.error("caller gate: accept failed: %s; retrying every %.2fs", exc.strerror, _ACCEPT_PAUSE)
        if self._resume is not None or self._listener is None:
            return  # paused already, or closed
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._listener.fileno())
        self._resume = loop.call_later(_ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._listener is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().add_reader(self._listener.fileno(), self._on_acceptable)

    def _admit(self, conn: socket.socket) -> None:
        try:
            peer = PeerCredentials.of(conn)
        except OSError:
            conn.close()
            return
        if self.policy.allows(peer):
            self._spawn(self._relay(conn, peer))
        elif len(self._refused) >= self.limits.max_open:
            conn.close()  # too many refused callers waiting already: no answer, but counted
            self._refusals.refused(peer, None)
        else:
            refusal = _Refusal(self, peer)
            self._refused.add(refusal)  # counted from now, so the bound holds while the transport is made
            self._spawn(self._refuse(conn, refusal))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)

    async def _refuse(self, conn: socket.socket, refusal: _Refusal) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: refusal, conn)
        except BaseException as exc:  # also cancelled by close(): the socket is ours to close
            if not isinstance(exc, asyncio.CancelledError):
                _report_failure(exc, "SocketGate._refuse")
            self._refused.discard(refusal)
            if refusal.transport is None:
                conn.close()
            refusal._resolve()
            if not isinstance(exc, Exception):
                raise

    async def _relay(self, conn: socket.socket, peer: PeerCredentials) -> None:
        """Connect the caller's connection to the gRPC server, from a relay socket named for this caller."""
        loop = asyncio.get_running_loop()
        pair = _Pair(self)
        upstream: socket.socket | None = None
        try:
            await loop.connect_accepted_socket(lambda: pair.down, conn)  # reads nothing until upstream exists
            self._pairs.add(pair)
            self._count += 1
            upstream, path = _relay_socket(self.private_path.parent / f"r-{self._count:x}")
            try:
                await loop.sock_connect(upstream, str(self.private_path))
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # the gRPC server keeps the name it accepted; the directory stays clean
            pair.key = f"unix:{path}"  # what grpc's context.peer() reports for this connection
            self._callers[pair.key] = peer
            # Not create_unix_connection(sock=): uvloop ties the socket object to the transport only after
            # connection_made, and a transport closed before that leaves the object to close the fd again.
            await loop.connect_accepted_socket(lambda: pair.up, upstream)
        except OSError as exc:
            if upstream is not None:
                upstream.close()
            if exc.errno in _OUT_OF_FDS:  # no fd for the upstream side: accepting more would only fail too
                self._pause_accepting(exc)
            else:
                log.error("cannot reach the gRPC server on %s: %s", self.private_path, exc.strerror)
            self._drop(pair, conn)
        except Exception as exc:  # never a foreign exception out of the gate
            if upstream is not None:
                upstream.close()
            _report_failure(exc, "SocketGate._relay")
            self._drop(pair, conn)
        except BaseException:  # cancelled by close(): nothing half-made may stay open
            if upstream is not None and pair.up.transport is None:
                upstream.close()
            self._drop(pair, conn)
            raise

    def _drop(self, pair: _Pair, conn: socket.socket) -> None:
        if pair.down.transport is None:
            conn.close()
        pair.abort()
        self._forget(pair)

    def _forget(self, pair: _Pair) -> None:
        if pair.key is not None:
            self._callers.pop(pair.key, None)
        self._pairs.discard(pair)

    def close_listener(self) -> None:
        """Stop accepting new connections; relays already open keep going."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._listener is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None

    async def close(self) -> None:
        """Close every connection, the public socket and the private directory."""
        self.close_listener()
        for task in self._tasks:
            task.cancel()
        for pair in list(self._pairs):
            pair.abort()
        for refusal in list(self._refused):
            _abort(refusal.transport)
        await asyncio.sleep(0)  # let the closed transports call connection_lost
        self._refusals.close()
        if self.inode is not None:  # never a socket that another process bound
            endpoint.remove(self.public, self.inode)
        self._private.remove()


def _relay_socket(path: Path) -> tuple[socket.socket, Path]:
    """A socket bound to ``path``: kleidi's 0700 directory is the only place that name can exist."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    return sock, path
