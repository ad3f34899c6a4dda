"""Caller authentication on the socket: only allowed processes reach the gRPC server.

File permissions decide who may *connect* to a socket file; they say nothing for an abstract socket
and cannot tell the apiserver from any other process that shares its group. So kleidi asks the kernel
who is on the other end of each connection (``SO_PEERCRED``: the pid, uid and gid of the process that
connected, which the caller cannot forge) and checks it against an allowlist.

grpcio does not expose peer credentials, so the check sits in front of it. :class:`SocketGate` owns
the public socket. On each connection it reads the peer credentials and

* **allows** the caller: relays the connection, byte for byte, to the gRPC server, which listens on
  a socket inside a private 0700 directory that only kleidi's user (and root) can reach. Each relay
  connection is bound to a unique abstract address, which the gRPC server sees as the call's peer,
  so the audit record of every call can name the calling process (:meth:`SocketGate.caller`);
* **refuses** the caller: the gRPC server never sees its bytes. The gate itself answers its first
  call with a gRPC ``PERMISSION_DENIED`` (HTTP/2 via ``h2``), logs it, writes an audit record,
  counts it in ``kleidi_peer_credential_rejections_total``, and closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from kleidi import audit, endpoint, telemetry
from kleidi.endpoint import Endpoint, resolve_gid, resolve_uid
from kleidi.errors import ConfigError

log = logging.getLogger("kleidi.callers")

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_REFUSED_LINGER = 5.0  # seconds a refused connection may stay open for its first call


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


class _Relay(asyncio.Protocol):
    """One side of an allowed connection; writes what it reads to its partner, with back-pressure."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.partner: _Relay | None = None
        self.on_lost: Callable[[], None] | None = None
        self._pending: list[bytes] = []  # read before the partner existed
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def _send(self, data: bytes) -> None:
        if self.partner is None or self.partner.transport is None:
            self._pending.append(data)
        else:
            self.partner.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self._send(data)

    def eof_received(self) -> bool:
        if self.partner is None or self.partner.transport is None:
            self._eof = True
        elif self.partner.transport.can_write_eof():
            self.partner.transport.write_eof()
        return True  # keep our write side open: the other side may still be answering

    def connection_lost(self, exc: Exception | None) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.close()
        if self.on_lost is not None:
            self.on_lost()

    # The partner cannot keep up: stop reading from our own side until it drains.
    def pause_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.resume_reading()


def _join(a: _Relay, b: _Relay) -> None:
    """Pair two relay sides and deliver whatever either read before the other existed."""
    a.partner, b.partner = b, a
    for side in (a, b):
        pending, side._pending = side._pending, []
        for chunk in pending:
            side._send(chunk)
        if side._eof:
            side.eof_received()


class _Refusal(asyncio.Protocol):
    """Speaks just enough HTTP/2 to answer a refused caller's first call with PERMISSION_DENIED."""

    def __init__(self, peer: PeerCredentials, policy: CallerPolicy) -> None:
        self.peer = peer
        self.policy = policy
        self.transport: asyncio.Transport | None = None
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self._answered = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())
        self._timer = asyncio.get_running_loop().call_later(_REFUSED_LINGER, self._give_up)

    def _give_up(self) -> None:
        if not self._answered:
            self._record(None)
        if self.transport is not None:
            self.transport.close()

    def _record(self, method: str | None) -> None:
        telemetry.PEER_REJECTIONS.inc()
        log.warning("refused a caller: pid %d uid %d gid %d is not allowed (allowed: %s); fix: run the apiserver "
                    "as an allowed user, or add it to server.allowed_uids / server.allowed_gids",
                    self.peer.pid, self.peer.uid, self.peer.gid, self.policy.describe(),
                    extra={"fields": {**self.peer.audit_fields(), "method": method}})
        audit.emit("caller_refused", method=method, outcome="PERMISSION_DENIED", **self.peer.audit_fields())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._give_up()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived) and not self._answered:
                path = dict(event.headers or []).get(b":path", b"")
                method = path[:128].decode("ascii", "replace") or None
                self._answered = True
                self.h2.send_headers(event.stream_id, [
                    (":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "7"),
                    ("grpc-message", f"caller uid {self.peer.uid} is not allowed to use this KMS plugin"),
                ], end_stream=True)
                self.h2.close_connection(last_stream_id=event.stream_id)
                self._record(method)
        self.transport.write(self.h2.data_to_send())
        if self._answered:
            self.transport.close()  # after the buffered answer is flushed

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


class SocketGate:
    """Owns the public socket; relays allowed callers to the gRPC server on a private socket."""

    def __init__(self, public: Endpoint, policy: CallerPolicy) -> None:
        self.public = public
        self.policy = policy
        self._private_dir = Path(tempfile.mkdtemp(prefix="kleidi-", dir=_short_tmp()))  # mode 0700
        self.private_path = self._private_dir / "grpc.sock"
        self._server: asyncio.AbstractServer | None = None
        self._relays: set[_Relay] = set()
        self._connecting: set[asyncio.Future[None]] = set()
        self._callers: dict[str, PeerCredentials] = {}  # relay's abstract peer address -> caller
        self._prefix = f"kleidi-relay-{os.getpid()}-{secrets.token_hex(6)}-"
        self._count = 0
        self.inode: int | None = None

    @property
    def private_address(self) -> str:
        """Where the gRPC server listens (for ``add_insecure_port``)."""
        return f"unix://{self.private_path}"

    def caller(self, peer: str) -> PeerCredentials | None:
        """The credentials of the process behind a gRPC call's peer address, if it came through the gate."""
        return self._callers.get(peer)

    async def start(self, mode: int, group: str | int | None) -> None:
        """Bind the public socket (never wider than 0600, even for a moment) and start accepting. If
        this fails, :meth:`close` cleans up."""
        endpoint.prepare_path(self.public)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with endpoint.owner_only_umask():
                sock.bind(f"\0{self.public.abstract_name}" if self.public.abstract_name is not None
                          else str(self.public.path))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"server.endpoint: cannot bind {self.public}: {exc.strerror}; fix: check that the "
                              "directory exists and is writable") from None
        self.inode = endpoint.inode_of(self.public)  # from here on, close() removes the socket file
        try:
            endpoint.restrict(self.public, mode, group)
            sock.listen(1024)
            sock.setblocking(False)
            self._server = await asyncio.get_running_loop().create_unix_server(self._accept, sock=sock)
        except BaseException:
            sock.close()
            raise

    def _accept(self) -> asyncio.Protocol:
        return _Accepted(self)

    def connect_upstream(self, downstream: _Relay, peer: PeerCredentials) -> None:
        task = asyncio.ensure_future(self._open_upstream(downstream, peer))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _open_upstream(self, downstream: _Relay, peer: PeerCredentials) -> None:
        loop = asyncio.get_running_loop()
        self._count += 1
        name = f"{self._prefix}{self._count}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind(f"\0{name}")  # the gRPC server sees this as the call's peer
            await loop.sock_connect(sock, str(self.private_path))
            _, upstream = await loop.create_unix_connection(_Relay, sock=sock)
        except OSError as exc:
            sock.close()
            log.error("cannot reach the gRPC server on %s: %s", self.private_path, exc.strerror)
            if downstream.transport is not None:
                downstream.transport.close()
            return
        assert downstream.transport is not None and upstream.transport is not None
        if downstream.transport.is_closing():  # the caller left while we connected
            upstream.transport.close()
            return
        key = f"unix-abstract:{name}"
        self._callers[key] = peer
        self._relays.update((downstream, upstream))

        def forget() -> None:
            self._callers.pop(key, None)
            self._relays.discard(downstream)
            self._relays.discard(upstream)

        upstream.on_lost = forget
        _join(downstream, upstream)
        downstream.transport.resume_reading()

    def close_listener(self) -> None:
        """Stop accepting new connections; relays already open keep going."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Close every relay, the public socket and the private directory."""
        self.close_listener()
        for relay in list(self._relays):
            if relay.transport is not None:
                relay.transport.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        if self.inode is not None:  # never a socket that another process bound
            endpoint.remove(self.public, self.inode)
        shutil.rmtree(self._private_dir, ignore_errors=True)


class _Accepted(_Relay):
    """A new connection on the public socket: the caller's side of a relay, or a refusal."""

    def __init__(self, gate: SocketGate) -> None:
        super().__init__()
        self.gate = gate
        self._refusal: _Refusal | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        try:
            peer = PeerCredentials.of(sock)
        except OSError:
            transport.close()
            return
        if self.gate.policy.allows(peer):
            assert self.transport is not None
            self.transport.pause_reading()  # until the upstream side exists
            self.gate.connect_upstream(self, peer)
        else:
            self._refusal = _Refusal(peer, self.gate.policy)
            self._refusal.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            self._refusal.data_received(data)
        else:
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refusal is not None:
            self._refusal.connection_lost(exc)
        super().connection_lost(exc)


def _short_tmp() -> str:
    """A temp dir whose socket paths fit in sun_path (TMPDIR can be long in CI and containers)."""
    base = tempfile.gettempdir()
    return base if len(base) <= 64 else "/tmp"  # noqa: S108 -- mkdtemp makes a fresh 0700 directory there
