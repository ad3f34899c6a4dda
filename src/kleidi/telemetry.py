"""Prometheus metrics and the /livez, /readyz and /metrics endpoints.

Label values are bounded by construction: gRPC method names, gRPC status code names, backend kinds
and operation names. No uid, error text, raw key name or key_id is ever a label; the current key
is exposed only as a hash (``kleidi_current_key_info{key_id_hash="sha256:..."}``), as the apiserver
does for its own metrics.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger("kleidi.telemetry")

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

REQUESTS = Counter("kleidi_requests_total", "gRPC calls answered, by method and gRPC status code.",
                   ["method", "code"], registry=REGISTRY)
REQUEST_SECONDS = Histogram("kleidi_request_duration_seconds", "Time to answer a gRPC call.",
                            ["method", "code"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
IN_FLIGHT = Gauge("kleidi_requests_in_flight", "gRPC calls being answered now.", registry=REGISTRY)
BACKEND_CALLS = Counter("kleidi_backend_calls_total", "Calls to the KEK backend, by operation and outcome.",
                        ["backend", "operation", "outcome"], registry=REGISTRY)
BACKEND_SECONDS = Histogram("kleidi_backend_call_duration_seconds", "Time of one call to the KEK backend.",
                            ["backend", "operation"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
HEALTHY = Gauge("kleidi_healthy", "1 when Status reports healthz ok, else 0.", registry=REGISTRY)
CURRENT_KEY = Gauge("kleidi_current_key_info", "The current KEK, by the SHA-256 of its key_id.",
                    ["key_id_hash"], registry=REGISTRY)
ROTATIONS = Counter("kleidi_key_rotations_observed_total", "Changes of the current key_id seen at refresh.",
                    registry=REGISTRY)
PEER_REJECTIONS = Counter("kleidi_peer_credential_rejections_total",
                          "Connections refused because the caller's uid/gid (SO_PEERCRED) is not allowed.",
                          registry=REGISTRY)
AUDIT_RECORDS = Counter("kleidi_audit_records_total", "Records written to the audit log.", registry=REGISTRY)
AUDIT_WRITE_FAILURES = Counter("kleidi_audit_write_failures_total",
                               "Audit records that could not be written (lost; counted in the next audit_gap record).",
                               registry=REGISTRY)
AUDIT_HEALTHY = Gauge("kleidi_audit_healthy", "1 when audit records are written (or there is no audit log), "
                      "0 while they are being lost.", registry=REGISTRY)
AUDIT_HEALTHY.set(1)
VAULT_LOGINS = Counter("kleidi_vault_logins_total", "Logins to Vault (first, after expiry or refusal).",
                       registry=REGISTRY)
VAULT_RENEWALS = Counter("kleidi_vault_token_renewals_total", "Vault token renewals.", registry=REGISTRY)
VAULT_TOKEN_EXPIRY = Gauge("kleidi_vault_token_expiry_timestamp_seconds",
                           "Unix time at which the current Vault token expires (0: never).", registry=REGISTRY)


def key_id_hash(key_id: str) -> str:
    return "sha256:" + hashlib.sha256(key_id.encode()).hexdigest()


def set_current_key(key_id: str) -> None:
    CURRENT_KEY.clear()
    CURRENT_KEY.labels(key_id_hash(key_id)).set(1)


@contextmanager
def backend_call(backend: str, operation: str) -> Iterator[None]:
    started = time.perf_counter()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    finally:
        BACKEND_SECONDS.labels(backend, operation).observe(time.perf_counter() - started)
        BACKEND_CALLS.labels(backend, operation, outcome).inc()


TELEMETRY_OPEN = Gauge("kleidi_telemetry_connections_open", "Connections to the metrics and health listener open now.",
                       registry=REGISTRY)
TELEMETRY_REJECTED = Counter("kleidi_telemetry_connections_rejected_total",
                             "Connections to the metrics and health listener closed by kleidi, by reason: limit "
                             "(telemetry.max_connections were open), timeout (telemetry.request_timeout passed).",
                             ["reason"], registry=REGISTRY)
TELEMETRY_REQUESTS = Counter("kleidi_telemetry_requests_total",
                             "Answers of the metrics and health listener, by endpoint (metrics, livez, readyz, other) "
                             "and HTTP status code.", ["endpoint", "code"], registry=REGISTRY)
METRICS_RENDERS = Counter("kleidi_metrics_renders_total",
                          "Renderings of /metrics: at most one a second, shared by every scrape waiting for it.",
                          registry=REGISTRY)
for _reason in ("limit", "timeout"):
    TELEMETRY_REJECTED.labels(_reason)

_MAX_HEAD = 8 * 1024  # request line and headers; probes and scrapers send a few hundred bytes
_MAX_HEADER_LINES = 100
_RENDER_INTERVAL = 1.0  # seconds between renderings of /metrics, however many scrapes arrive
_LIVE_MAX_AGE = 1.0  # seconds a /livez answer is reused
LIVE_TIMEOUT = 2.0  # seconds for the Status call behind /livez (Server._live)
# kleidi's own share of an answer: the wait for the next rendering, or one Status call. It is not the
# client's time, so it does not come out of request_timeout.
_ANSWER_BOUND = max(_RENDER_INTERVAL, LIVE_TIMEOUT) + 1.0
_WARN_INTERVAL = 60.0  # seconds between warnings that the connection limit was hit
_ENDPOINTS = {"/metrics": "metrics", "/livez": "livez", "/readyz": "readyz"}
_TEXT = "text/plain; charset=utf-8"
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class _Refusal(Exception):
    """A request kleidi answers with an error status (and one debug line)."""

    def __init__(self, status: HTTPStatus, why: str) -> None:
        super().__init__(why)
        self.status, self.why = status, why


def _request_line(line: bytes) -> tuple[str, str, int]:
    """(method, path without query, HTTP minor version) of a GET or HEAD request line."""
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise _Refusal(HTTPStatus.BAD_REQUEST, "not an HTTP request line")
    method, target, major, minor = match.groups()
    if major != b"1":
        raise _Refusal(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "only HTTP/1.x is served")
    if method not in (b"GET", b"HEAD"):
        raise _Refusal(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD are served")
    if not target.startswith(b"/"):
        raise _Refusal(HTTPStatus.BAD_REQUEST, "the request target must be a path")
    return method.decode(), target.split(b"?", 1)[0].decode(), int(minor)


def _check_headers(lines: list[bytes], minor: int) -> None:
    hosts = 0
    for line in lines:
        name, colon, value = line.partition(b":")
        # A name must be a bare token: this also refuses folded lines and "Name :" (smuggling tricks).
        if not colon or not _TOKEN.fullmatch(name) or _CONTROL.search(value):
            raise _Refusal(HTTPStatus.BAD_REQUEST, "malformed header line")
        name = name.lower()
        if name == b"host":
            hosts += 1
        elif name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            raise _Refusal(HTTPStatus.BAD_REQUEST, "a request body is not accepted")
    if minor >= 1 and hosts != 1:
        raise _Refusal(HTTPStatus.BAD_REQUEST, "HTTP/1.1 needs exactly one Host header")


class _State(enum.Enum):
    READING = "reading"  # waiting for the request line and headers
    ANSWERING = "answering"  # working on the answer
    LINGERING = "lingering"  # answered; reading on until the client closes, so no reset loses the answer
    CLOSED = "closed"


class _Connection(asyncio.Protocol):
    """One client connection: one request, one answer, then close."""

    def __init__(self, server: HealthServer) -> None:
        self._server = server
        self._state = _State.READING
        self._buffer = bytearray()
        self._scanned = 0
        self._request: tuple[str, str, int] | None = None
        self._headers: list[bytes] = []
        self._peer_eof = False
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    # asyncio callbacks: none may raise (the loop would log a traceback per connection).

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._transport = transport
        if self._server.admit(self):
            self._arm(self._server.request_timeout)
        else:
            self._state = _State.CLOSED
            transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._state is not _State.READING:
            return  # after the request: whatever else the client sends is dropped
        self._buffer += data
        try:
            self._parse()
        except _Refusal as refusal:
            self._refuse(refusal)
        except Exception as exc:  # a bug of ours: one line, not a traceback per connection
            log.warning("telemetry: dropped a connection on an internal error: %r", exc)
            self.abort()

    def eof_received(self) -> bool:
        self._peer_eof = True
        if self._state is _State.READING and self._buffer.strip():
            log.debug("telemetry: %s closed its side with an incomplete request", self._peer())
        return self._state is _State.ANSWERING  # keep the transport open only to send the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _State.CLOSED
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
        self._server.forget(self)

    # parsing and answering

    def _parse(self) -> None:
        buffer = self._buffer
        while (end := buffer.find(b"\n", self._scanned)) >= 0:
            if end >= _MAX_HEAD:
                break
            line = bytes(buffer[self._scanned:end]).removesuffix(b"\r")
            self._scanned = end + 1
            if self._request is None:
                if line:  # an empty line before the request line is tolerated (RFC 9112 2.2)
                    self._request = _request_line(line)
            elif line:
                if len(self._headers) >= _MAX_HEADER_LINES:
                    raise _Refusal(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many header lines")
                self._headers.append(line)
            else:
                _check_headers(self._headers, self._request[2])
                self._start_answer(*self._request[:2])
                return
        if len(buffer) >= _MAX_HEAD:
            if self._request is None:
                raise _Refusal(HTTPStatus.REQUEST_URI_TOO_LONG, f"the request line is over {_MAX_HEAD} bytes")
            raise _Refusal(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"the request head is over {_MAX_HEAD} bytes")

    def _start_answer(self, method: str, path: str) -> None:
        self._state = _State.ANSWERING
        self._buffer = bytearray()
        self._server.busy(self)
        assert self._transport is not None
        self._transport.pause_reading()  # nothing more is read until the answer is out
        self._arm(_ANSWER_BOUND)
        self._task = asyncio.get_running_loop().create_task(self._answer(method, path))

    async def _answer(self, method: str, path: str) -> None:
        endpoint = _ENDPOINTS.get(path, "other")
        try:
            status, body, content_type = await self._produce(endpoint)
        except Exception as exc:  # logged where it happened (the rendering); answered here
            log.debug("telemetry: cannot answer %s: %r", path, exc)
            status, body, content_type = HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", _TEXT
        try:
            self._send(status, body, content_type, endpoint, head_only=method == "HEAD")
        except Exception as exc:  # a task's exception would be logged with a traceback at exit
            log.debug("telemetry: cannot send the answer to %s: %r", self._peer(), exc)
            self.abort()

    async def _produce(self, endpoint: str) -> tuple[HTTPStatus, bytes, str]:
        if endpoint == "metrics":
            return HTTPStatus.OK, await self._server.metrics(), CONTENT_TYPE_LATEST
        if endpoint == "other":
            return HTTPStatus.NOT_FOUND, b"not found: try /metrics, /livez or /readyz\n", _TEXT
        ok, detail = await self._server.livez() if endpoint == "livez" else self._server.ready()
        return HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, (detail + "\n").encode(), _TEXT

    def _refuse(self, refusal: _Refusal) -> None:
        log.debug("telemetry: %d to %s: %s", refusal.status, self._peer(), refusal.why)
        allow = "Allow: GET, HEAD\r\n" if refusal.status == HTTPStatus.METHOD_NOT_ALLOWED else ""
        self._send(refusal.status, (refusal.why + "\n").encode(), _TEXT, "other", extra=allow)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, endpoint: str, head_only: bool = False,
              extra: str = "") -> None:
        if self._state not in (_State.READING, _State.ANSWERING) or self._transport is None:
            return
        TELEMETRY_REQUESTS.labels(endpoint, str(int(status))).inc()
        head = (f"HTTP/1.1 {int(status)} {status.phrase}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n")
        transport = self._transport
        transport.writelines([head.encode("latin-1"), b"" if head_only else body])
        self._arm(self._server.request_timeout)  # for the client to take its answer, then it is cut off
        self._state = _State.LINGERING
        self._server.idle(self)
        if self._peer_eof:
            transport.close()  # sends what is buffered first
            return
        # Half-close and read on: closing with unread input would reset the connection, and a reset
        # can reach the client before the answer it has not read yet.
        transport.write_eof()
        transport.resume_reading()

    def _timed_out(self) -> None:
        transport, state = self._transport, self._state
        if transport is None or state is _State.CLOSED:
            return
        if state is _State.READING:
            TELEMETRY_REJECTED.labels("timeout").inc()
            log.debug("telemetry: %s sent no complete request in time", self._peer())
            self._send(HTTPStatus.REQUEST_TIMEOUT, b"no complete request in time\n", _TEXT, "other")
            self.abort(flush=True)  # no lingering: this client already had its time
            return
        if state is _State.ANSWERING:
            TELEMETRY_REJECTED.labels("timeout").inc()
            log.debug("telemetry: no answer ready for %s within %.0fs", self._peer(), _ANSWER_BOUND)
        elif transport.get_write_buffer_size():
            TELEMETRY_REJECTED.labels("timeout").inc()
            log.debug("telemetry: %s did not take its answer in time", self._peer())
        self.abort()

    def abort(self, flush: bool = False) -> None:
        """Close now (after the few bytes already queued, with ``flush``); the client gets no more."""
        if self._transport is not None and self._state is not _State.CLOSED:
            self._state = _State.CLOSED
            if flush and not self._transport.get_write_buffer_size():
                self._transport.close()
            else:
                self._transport.abort()
        self._server.forget(self)

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._timed_out)

    def _peer(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "a client"


def _listen(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket; OSError (with the system's strerror) if it cannot bind."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    # IPv4 first for a name such as localhost, as before; [::1] gets IPv6.
    family, _, proto, _, address = min(infos, key=lambda info: info[0] != socket.AF_INET)
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart must not wait out TIME_WAIT
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class HealthServer:
    """Plain HTTP on a loopback address: /livez, /readyz, /metrics, served on kleidi's event loop.

    Each connection carries one GET (or HEAD) and is closed after the answer. No thread per
    connection: at most ``max_connections`` are open (at the limit, the oldest connection that is not
    being answered makes room, or else the new one is closed); each has ``request_timeout`` to send
    its request and again to take its answer. /metrics is rendered at most once a second, and every
    answer is rendered after its request arrived; /livez runs at most one Status call at a time.
    """

    def __init__(self, address: str, live: Callable[[], Awaitable[tuple[bool, str]]],
                 ready: Callable[[], tuple[bool, str]], *, max_connections: int = 32,
                 request_timeout: float = 5.0) -> None:
        host, _, port = address.rpartition(":")
        self.live, self.ready = live, ready
        self.max_connections, self.request_timeout = max_connections, request_timeout
        self._sock = _listen(host.strip("[]"), int(port))  # bound now, so a busy port fails start-up
        self._server: asyncio.AbstractServer | None = None
        self._open: set[_Connection] = set()
        self._idle: dict[_Connection, None] = {}  # connections not being answered, oldest first
        self._render: asyncio.Task[bytes] | None = None
        self._rendered_at = -_RENDER_INTERVAL
        self._live_check: asyncio.Task[tuple[bool, str]] | None = None
        self._live_answer: tuple[bool, str] | None = None
        self._live_at = 0.0
        self._warned_at = -_WARN_INTERVAL
        self._at_limit = 0

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), sock=self._sock)

    async def stop(self) -> None:
        if self._server is None:
            self._sock.close()
        else:
            self._server.close()
        for conn in list(self._open):
            conn.abort()
        for task in (self._render, self._live_check):
            if task is not None:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    # connection bookkeeping

    def admit(self, conn: _Connection) -> bool:
        if len(self._open) >= self.max_connections:
            TELEMETRY_REJECTED.labels("limit").inc()
            self._note_limit()
            victim = next(iter(self._idle), None)
            if victim is None:
                return False  # every open connection is being answered: the new one waits its turn elsewhere
            victim.abort()
        self._open.add(conn)
        self._idle[conn] = None
        TELEMETRY_OPEN.set(len(self._open))
        return True

    def busy(self, conn: _Connection) -> None:
        self._idle.pop(conn, None)

    def idle(self, conn: _Connection) -> None:
        if conn in self._open:
            self._idle.pop(conn, None)  # to the end: it became idle last
            self._idle[conn] = None

    def forget(self, conn: _Connection) -> None:
        self._idle.pop(conn, None)
        if conn in self._open:
            self._open.discard(conn)
            TELEMETRY_OPEN.set(len(self._open))

    def _note_limit(self) -> None:
        self._at_limit += 1
        now = time.monotonic()
        if now - self._warned_at >= _WARN_INTERVAL:
            log.warning("telemetry: %d connection(s) closed at the limit of %d open connections since the last "
                        "warning; fix: find the local process that opens them (ss -tnp), or raise "
                        "telemetry.max_connections", self._at_limit, self.max_connections)
            self._warned_at, self._at_limit = now, 0

    # answers shared between connections

    async def metrics(self) -> bytes:
        """The rendering of the registry, started after this call: a scrape sees everything done before it."""
        if self._render is None:
            self._render = asyncio.ensure_future(self._render_next())
            self._render.add_done_callback(_retrieve)
        return await asyncio.shield(self._render)

    async def _render_next(self) -> bytes:
        wait = self._rendered_at + _RENDER_INTERVAL - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._render = None  # scrapes arriving from now on need a rendering that starts after them
        self._rendered_at = time.monotonic()
        METRICS_RENDERS.inc()
        try:
            return generate_latest(REGISTRY)
        except Exception as exc:
            log.error("telemetry: rendering /metrics failed: %r", exc)
            raise

    async def livez(self) -> tuple[bool, str]:
        if self._live_answer is not None and time.monotonic() - self._live_at < _LIVE_MAX_AGE:
            return self._live_answer
        if self._live_check is None:
            self._live_check = asyncio.ensure_future(self._check_live())
            self._live_check.add_done_callback(_retrieve)
        return await asyncio.shield(self._live_check)

    async def _check_live(self) -> tuple[bool, str]:
        try:
            answer = await self.live()
        except Exception as exc:
            log.error("telemetry: the liveness check failed: %r", exc)
            answer = (False, f"liveness check failed: {type(exc).__name__}")
        finally:
            self._live_check = None
        self._live_answer, self._live_at = answer, time.monotonic()
        return answer


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a shared task's outcome as seen: its waiters may all have gone (no 'never retrieved' log)."""
    if not task.cancelled():
        task.exception()
