"""The core sections of the settings: the gRPC server, logging, the audit log, telemetry.

A backend's own settings live in its module (e.g. :class:`kleidi.backends.local.LocalBackendSettings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kleidi.endpoint import parse_endpoint, resolve_gid, resolve_uid
from kleidi.errors import InvalidValue
from kleidi.settings.types import Duration, Settings, SocketMode


class ServerSettings(Settings):
    """The gRPC server that kube-apiserver calls."""

    endpoint: str = "unix:///var/run/kleidi/kleidi.sock"
    """Socket the plugin listens on: unix:///absolute/path, or unix:///@name for a Linux abstract
    socket. Use the same value as `endpoint` in the EncryptionConfiguration."""

    # The schema's default is what a file holds ("0600"); pydantic would put the parsed 384 there.
    socket_mode: SocketMode = Field(default=0o600, json_schema_extra={"default": "0600"})
    """Permission bits of the socket file, as a quoted octal string ("0600"; an unquoted YAML number
    is refused, since 0600 and 600 would both be misread). The apiserver runs as root, so 0600 is
    enough; widen only together with socket_group, e.g. "0660". Read and write bits only (no
    execute, setuid, setgid or sticky bits). Bits for others ("0666") only with
    authenticate_callers: true, where the caller check decides who may call; without it the file
    mode is the only check and must be a subset of "0660"."""

    socket_group: str | int | None = None
    """Group (name or gid) given to the socket file; null keeps kleidi's own group."""

    enable_v1beta1: bool = False
    """Also serve the deprecated KMS v1 API on the same socket, for providers configured with
    kms apiVersion v1 (since Kubernetes 1.29 only with --feature-gates=KMSv1=true)."""

    status_version: Literal["v2", "v2beta1"] = "v2"
    """The version Status reports. v2 for Kubernetes 1.29 and later; v2beta1 for 1.27 and 1.28,
    which accept nothing else. The apiserver refuses a change while it runs, so set it once."""

    shutdown_timeout: Duration = 10.0
    """On SIGTERM/SIGINT, how long in-flight calls may take to finish before they are cancelled."""

    envelope_format: Literal[1, 2] = 1
    """The envelope format Encrypt writes; every kleidi reads both. 1: the backend binds key_id,
    annotations and protocol as authenticated data, so the binding is only as good as the backend's
    (a non-AEAD Transit key, a TPM or an RSA key cannot bind it). 2: kleidi seals the seed itself
    with AES-256-GCM under a fresh data key bound to them, and the backend wraps only the data key,
    so every backend gets the same binding. Set 2 once every node runs a kleidi that reads it (this
    version on): a node that cannot read format 2 fails its Decrypts. Takes effect on restart."""

    authenticate_callers: bool = True
    """Check who connects (the kernel's SO_PEERCRED uid/gid of the calling process) against
    allowed_uids and allowed_gids; others get PERMISSION_DENIED, a log line and an audit record.
    false: the socket's file permissions are the only check (an abstract socket then has none)."""

    allowed_uids: list[int | str] | None = None
    """Users (uids or names) allowed to call. null: root and the user kleidi runs as."""

    allowed_gids: list[int | str] = []
    """Also allow callers whose primary group (gid or name) is one of these."""

    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """The asyncio event loop: uvloop (faster: more calls per CPU second) or the standard library's."""

    lock_memory: bool = False
    """Lock kleidi's memory in RAM (mlockall), so that no seed or key is ever written to swap.
    Needs CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK; if the lock fails, kleidi does not start."""

    runtime_dir: Path | None = None
    """Directory for kleidi's private runtime files (the gRPC server's socket behind the caller
    gate, and its relay sockets), in a fresh 0700 subdirectory that is removed at shutdown and, if
    kleidi was killed, at the next start. null: $RUNTIME_DIRECTORY (systemd's RuntimeDirectory=)
    if set, else the socket's own directory (for an abstract socket: the temporary directory).
    Must be writable by kleidi's user; it may be on a tmpfs under a read-only root filesystem."""

    max_refused_connections: int = Field(default=64, ge=1, le=65536)
    """Connections from refused callers held open at once (each is kept only until its
    PERMISSION_DENIED answer is sent); more are closed at once, and counted."""

    refused_timeout: Duration = 2.0
    """How long a refused caller's connection may stay open waiting for its first call."""

    refusal_report_interval: Duration = 60.0
    """Refusals are logged and audited once per caller (uid) per interval: the first one at once,
    the rest as one record with their count at the end of the interval, so that a flood of refused
    connections cannot flood the log or push legitimate records out of the audit log."""

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_unix(cls, value: str) -> str:
        parse_endpoint(value)
        return value

    @model_validator(mode="after")
    def _socket_mode_is_safe(self) -> ServerSettings:
        if self.socket_mode & 0o007 and not self.authenticate_callers:
            raise InvalidValue(f"socket_mode {self.socket_mode:04o} lets every user on the node connect, and with "
                               "authenticate_callers: false nothing else checks who calls Decrypt",
                               fix='use "0600", or "0660" with socket_group, or set authenticate_callers: true')
        return self

    @field_validator("allowed_uids")
    @classmethod
    def _users_exist(cls, value: list[int | str] | None) -> list[int | str] | None:
        for user in value or []:
            resolve_uid(user)
        return value

    @field_validator("allowed_gids")
    @classmethod
    def _groups_exist(cls, value: list[int | str]) -> list[int | str]:
        for group in value:
            resolve_gid(group)
        return value


class LoggingSettings(Settings):
    """Logs go to stderr."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level written. debug adds one line per request (with the apiserver's uid)."""

    format: Literal["auto", "json", "console"] = "auto"
    """json: one JSON object per line; console: for people; auto: console on a terminal, else json."""


class AuditSettings(Settings):
    """The tamper-evident audit log: one hash-chained JSON line per Encrypt, Decrypt and key event."""

    path: Path | None = None
    """File to append records to (mode 0600), e.g. /var/log/kleidi/audit.jsonl; null: no audit log."""

    hmac_key_file: Path | None = None
    """File holding a secret key (at least 16 bytes, mode 0600). With it the chain is keyed
    (HMAC-SHA256): whoever can write the log but not read this key cannot forge a valid chain."""

    fsync: Literal["always", "interval", "never"] = "interval"
    """When records reach the disk: after every record, about once a second, or when the OS decides."""

    max_bytes: int = Field(default=100 * 1024 * 1024, ge=4096)
    """Size at which the file is rotated (audit.jsonl -> audit.jsonl.1 ...); the chain continues."""

    keep: int = Field(default=5, ge=1, le=1000)
    """Rotated files kept."""

    on_failure: Literal["fail_closed", "fail_open"] = "fail_closed"
    """What kleidi does when a record cannot be written (full disk, I/O error). fail_closed: Encrypt
    and Decrypt are refused with UNAVAILABLE and Status reports unhealthy until writing works again
    (no operation goes unrecorded). fail_open: calls are still served and Status stays ok (so the
    apiserver keeps working), while /readyz, the kleidi_audit_healthy metric and the log report the
    failure. Either way, no torn record is left: when writing resumes a chained `audit_gap` record
    says how many records were lost, and `kleidi audit verify` reports the gap."""

    anchor_path: Path | None = None
    """File in which kleidi keeps the chain's anchor (last sequence number and hash, updated about
    once a second, at rotation and at stop). Keep it where whoever can write the audit log's
    directory cannot write (e.g. /var/lib/kleidi/audit.anchor): `kleidi audit verify --anchor`
    then detects a log cut short, even right after a clean stop. null: no anchor."""


class TelemetrySettings(Settings):
    """Prometheus metrics and health endpoints (/metrics, /livez, /readyz) over plain HTTP."""

    address: str | None = "127.0.0.1:9464"
    """host:port to listen on; null turns the listener off. Loopback only unless
    allow_non_loopback is true: metrics and health say nothing secret, but they need not leave the node."""

    allow_non_loopback: bool = False
    """Allow `address` to be a non-loopback address (e.g. for a scraper on another host)."""

    max_connections: int = Field(default=32, ge=1, le=4096)
    """Connections to the listener served at once; more are closed at once. Probes and a scraper
    need a handful."""

    request_timeout: Duration = 5.0
    """How long a connection may take to send its request (and receive the answer) before it is closed."""

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "@" in value:
            # Not echoed: whatever is before the @ may be a credential.
            raise PydanticCustomError("url_credentials", "expected host:port such as 127.0.0.1:9464, not a value "
                                      "with a user name or password (@)", {"fix": "give only host:port"})
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
            raise InvalidValue(f"expected host:port such as 127.0.0.1:9464, got {value!r}",
                               fix="write host:port with a port from 1 to 65535, e.g. 127.0.0.1:9464, or null to "
                               "turn the listener off")
        return value

    @model_validator(mode="after")
    def _loopback_only(self) -> TelemetrySettings:
        if self.address is not None and not self.allow_non_loopback:
            host = self.address.rpartition(":")[0].strip("[]")
            if host != "localhost" and not _is_loopback(host):
                raise InvalidValue(f"{host} is not a loopback address",
                                   fix="use 127.0.0.1, or set telemetry.allow_non_loopback: true to expose metrics "
                                   "and health beyond the node")
        return self


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
