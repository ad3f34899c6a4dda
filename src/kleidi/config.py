"""Settings: one YAML file, overridden by ``KLEIDI_*`` environment variables, overridden by CLI flags.

Every setting is a field of a frozen pydantic model, grouped by concern and composed into
:class:`KleidiSettings`. ``kleidi config schema`` prints the JSON Schema; docs/configuration.md is
generated from the same models (``kleidi config docs``) and a test keeps the two in sync.

Environment variables name a setting by its path, upper-cased, with ``__`` between levels:
``KLEIDI_SERVER__ENDPOINT``, ``KLEIDI_BACKEND__KEYRING``. ``KLEIDI_CONFIG`` names the file.
Secrets are never accepted on the command line: backends read them from files.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from kleidi import registry
from kleidi.durations import format_duration
from kleidi.endpoint import parse_endpoint, resolve_gid, resolve_uid
from kleidi.errors import ConfigError, InvalidValue
from kleidi.settings.types import (
    MODE_FIX,
    NO_INPUT_ERRORS,
    BackendSettingsBase,
    Duration,
    Settings,
    SocketMode,
    check_env_name,
    check_url,
    parse_mode,
)

ENV_PREFIX = "KLEIDI_"
ENV_CONFIG_FILE = "KLEIDI_CONFIG"
ENV_SEPARATOR = "__"



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


DEFAULT_BACKEND = "local"
BACKEND_MODELS: dict[str, type[BackendSettingsBase]] = registry.settings_models()
"""Each installed backend's settings model, by kind: the ``backend`` section is one of them."""
BACKEND_KINDS = tuple(BACKEND_MODELS)


def _default_backend_kind(value: Any) -> Any:
    # The local backend is the embedded default: a backend section without `kind` means local.
    if isinstance(value, dict) and "kind" not in value:
        return {"kind": DEFAULT_BACKEND, **value}
    return value


if typing.TYPE_CHECKING:  # what every backend's settings have; the code that needs more is the backend's own
    BackendSettings = BackendSettingsBase
else:  # the installed backends' models, discriminated by kind: built at run time from the registry
    BackendSettings = Annotated[typing.Union[tuple(BACKEND_MODELS.values())],  # noqa: UP007
                                Field(discriminator="kind"), BeforeValidator(_default_backend_kind)]


class KleidiSettings(Settings):
    """All of kleidi's settings."""

    server: ServerSettings = ServerSettings()
    """The gRPC server that kube-apiserver calls."""

    logging: LoggingSettings = LoggingSettings()
    """Log output."""

    telemetry: TelemetrySettings = TelemetrySettings()
    """Prometheus metrics and health endpoints."""

    audit: AuditSettings = AuditSettings()
    """The tamper-evident audit log."""

    backend: BackendSettings = typing.cast(Any, BACKEND_MODELS[DEFAULT_BACKEND])()
    """Where the KEK lives. `kind` selects the backend; the other fields depend on it."""


# ---------------------------------------------------------------------------------------------
# Loading


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


_SERVICE_LINK = re.compile(r"KLEIDI_(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9]+)*|PORT"
                           r"|PORT_\d+_(?:TCP|UDP|SCTP)(?:_(?:PROTO|PORT|ADDR))?)")
"""The variables Kubernetes injects into every Pod of a namespace with a Service named kleidi
(enableServiceLinks): not settings, so they are ignored; any other unknown KLEIDI_* is an error."""

MAX_CONFIG_BYTES = 1024 * 1024
"""A config file is a few kilobytes; a bound keeps a wrong --config (a log, /dev/zero) from eating memory."""

_MAX_DEPTH = 32
"""kleidi's settings nest 4 levels (backend.auth.method, lists); far deeper is a mistake or an attack."""


def _env_value(name: str, raw: str, nullable: bool) -> Any:
    """Environment values are strings; JSON lists and objects are decoded so they can set lists, and
    ``null`` is null for the settings that accept it (as in YAML; an empty value stays empty)."""
    stripped = raw.strip()
    if nullable and stripped == "null":
        return None
    if stripped[:1] in "[{":
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return raw
        except (ValueError, RecursionError):  # a number past int's 4300 digits, or nesting past the stack
            raise ConfigError(f"environment variable {name} holds JSON with a number too long or nesting too "
                              "deep", fix=f"set {name} to a short list such as [0, 1000]") from None
    return raw


class _Refused(yaml.MarkedYAMLError):
    """A document PyYAML would load but kleidi refuses; carries its own fix."""

    def __init__(self, problem: str, mark: Any, fix: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.fix = fix


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently), nesting deeper
    than _MAX_DEPTH (PyYAML recurses until RecursionError) and integers too long to convert."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                raise _Refused(f"nested more than {_MAX_DEPTH} levels deep",
                               self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                               "kleidi's settings nest a few levels (see docs/configuration.md); remove the "
                               "extra brackets or indentation")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
            if first is not key_node:
                raise _Refused(f"duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                               key_node.start_mark, "keep one of them: YAML loaders disagree on which one wins")
        return super().construct_mapping(node, deep)


def _construct_int(loader: yaml.SafeLoader, node: Any) -> Any:
    try:
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    except ValueError:  # past Python's 4300-digit limit for int(str)
        raise _Refused(f"a number with {len(node.value)} digits", node.start_mark,
                       "no setting takes a number that long; correct the value") from None


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_yaml_file(path: Path, what: str) -> Any:
    """Parse a YAML file kleidi reads (``what``: "config file"), or raise ConfigError naming it and the fix."""
    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}",
                          fix="check the path, and that kleidi's user may read the file") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB",
                          fix="point at the right file (a config file is a few kilobytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
                          fix="save it as UTF-8, or point at the right file") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        if isinstance(exc, _Refused):
            raise ConfigError(f"{what} {path} is refused{at}: {exc.problem}", fix=exc.fix) from None
        raise ConfigError(f"{what} {path} is not valid YAML{at}: {getattr(exc, 'problem', exc)}",
                          fix="correct the YAML syntax there (indentation, quoting, brackets)") from None
    except RecursionError:  # a backstop: _MAX_DEPTH should stop any nesting first
        raise ConfigError(f"{what} {path} is nested too deeply", fix="remove the extra nesting") from None


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist", fix="create it (see docs/configuration.md) or "
                          f"point --config / {ENV_CONFIG_FILE} at the right file")
    loaded = load_yaml_file(path, "config file")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not a {type(loaded).__name__}",
                          fix="write sections at the top level, e.g. `server:` then `  endpoint: ...` "
                          "(see docs/configuration.md)")
    return loaded


def load_settings(config_file: str | os.PathLike[str] | None = None,
                  overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> KleidiSettings:
    """Build the settings: defaults < YAML file < ``KLEIDI_*`` environment < ``overrides`` (CLI flags).

    ``overrides`` maps dotted paths (``server.endpoint``) to values; ``None`` values are ignored.
    Raises :class:`ConfigError` for a file or variable that cannot be used, and
    :class:`InvalidSettings` (a ConfigError) with one line per problem, each naming the field and its fix.
    """
    environ = os.environ if environ is None else environ
    origins: dict[tuple[str, ...], str] = {}
    data: dict[str, Any] = {}
    file_label = "defaults"
    if config_file is None and environ.get(ENV_CONFIG_FILE):
        config_file = environ[ENV_CONFIG_FILE]
    if config_file is not None:
        path = Path(config_file)
        data = _read_file(path)
        file_label = str(path)
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_FILE or _SERVICE_LINK.fullmatch(name):
            continue
        parts = tuple(p.lower() for p in name[len(ENV_PREFIX):].split(ENV_SEPARATOR))
        if not all(parts):
            raise ConfigError(f"environment variable {name} is not a setting path",
                              fix=f"use {ENV_PREFIX}SECTION{ENV_SEPARATOR}FIELD, e.g. KLEIDI_SERVER__ENDPOINT")
        _set_path(data, parts, _env_value(name, raw, _accepts_null(parts)))
        origins[parts] = f"environment variable {name}"
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        parts = tuple(dotted.split("."))
        _set_path(data, parts, value)
        origins[parts] = "command-line flag"
    try:
        return KleidiSettings.model_validate(data)
    except ValidationError as exc:
        raise InvalidSettings(file_label, validation_problems(exc, origins)) from None


# ---------------------------------------------------------------------------------------------
# Error messages that name the field and the fix


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The settings models an annotation stands for (unwrapping Annotated and unions)."""
    if typing.get_origin(annotation) is Annotated:
        return _models(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models(arg)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def _tag_field(model: type[BaseModel]) -> str | None:
    """The discriminator field of a union member (``kind`` for a backend, ``method`` for an auth method)."""
    for name in ("kind", "method"):
        info = model.model_fields.get(name)
        if info is not None and typing.get_origin(info.annotation) is Literal:
            return name
    return None


def _tag(model: type[BaseModel]) -> str | None:
    """The discriminator value of a backend or auth-method model (``local``, ``approle``), if it is one."""
    field = _tag_field(model)
    return str(typing.get_args(model.model_fields[field].annotation)[0]) if field else None


class _Located(NamedTuple):
    """Where a pydantic error location points, in the settings as the user writes them."""

    path: tuple[str, ...]
    """The setting's path, without the union tags pydantic inserts ("local", "approle") or list indexes."""
    shown: str
    """The dotted path shown in the message, list items as ``[0]``."""
    info: FieldInfo | None
    """The field there; None for an unknown field."""
    siblings: list[str]
    """The fields valid next to it: of the chosen backend or auth method only, not of the others."""
    chosen: type[BaseModel] | None
    """The backend or auth method chosen where the path ends in one's fields, else None."""
    others: list[type[BaseModel]]
    """The other members of that union (the backends or methods not chosen)."""
    in_union: bool
    """The location goes past the field into the members of a union of plain types (``int | str``)."""
    item: bool
    """The location is an item of the list the field holds."""


def _locate(loc: tuple[int | str, ...]) -> _Located:
    candidates: list[type[BaseModel]] = [KleidiSettings]
    path: list[str] = []
    shown = ""
    info: FieldInfo | None = None
    siblings = sorted(KleidiSettings.model_fields)
    chosen: type[BaseModel] | None = None
    others: list[type[BaseModel]] = []
    for part in loc:
        if isinstance(part, int):  # an item of a list setting: the error is the list's
            shown += f"[{part}]"
            continue
        tagged = [m for m in candidates if _tag(m) == part]
        if tagged and len(candidates) > 1:  # the tag of the discriminated union member pydantic chose
            chosen, others = tagged[0], [m for m in candidates if m is not tagged[0]]
            candidates = tagged
            continue
        if info is not None and not candidates:  # past a plain field: the members of a union such as int | str
            return _Located(tuple(path), shown, info, siblings, chosen, others, True, shown.endswith("]"))
        siblings = sorted({name for model in candidates for name in model.model_fields})
        found = [model.model_fields[part] for model in candidates if part in model.model_fields]
        path.append(part)
        shown = f"{shown}.{part}" if shown else part
        if not found:
            return _Located(tuple(path), shown, None, siblings, chosen, others, False, False)
        info = found[0]
        candidates = [m for f in found for m in _models(f.annotation)]
        chosen, others = None, []  # inside the field now, no longer among the chosen member's fields
    return _Located(tuple(path), shown, info, siblings, chosen, others, False, shown.endswith("]"))


def _accepts_null(path: tuple[str, ...]) -> bool:
    """Whether the setting at ``path`` may be null (in any of the models a union stands for)."""
    candidates: list[type[BaseModel]] = [KleidiSettings]
    found: list[Any] = []
    for part in path:
        found = [model.model_fields[part] for model in candidates if part in model.model_fields]
        if not found:
            return False
        candidates = [m for info in found for m in _models(info.annotation)]
    return any(_allows_none(info.annotation) for info in found)


def _allows_none(annotation: Any) -> bool:
    if typing.get_origin(annotation) is Annotated:
        return _allows_none(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_allows_none(arg) for arg in typing.get_args(annotation))
    return annotation is None or annotation is type(None)


def _members(annotation: Any) -> list[Any]:
    """The types a union stands for (the annotation itself if it is none), without None."""
    if typing.get_origin(annotation) is Annotated:
        return _members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [] if annotation is None or annotation is type(None) else [annotation]


def _inline(value: Any) -> str:
    """A value as it is written in the YAML file, on one line."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _example(info: FieldInfo) -> Any:
    """A valid value for the field: its first example, else its default when that is a plain value."""
    if info.examples:
        return info.examples[0]
    default = info.get_default(call_default_factory=True)
    return default if isinstance(default, str | Path | int) and not isinstance(default, bool) else None


def _bounds(metadata: list[Any]) -> tuple[Any, Any]:
    low = next((m.ge for m in metadata if hasattr(m, "ge")), None)
    if low is None:
        low = next((m.gt + 1 for m in metadata if hasattr(m, "gt")), None)
    high = next((m.le for m in metadata if hasattr(m, "le")), None)
    return low, high


def _type_fix(info: FieldInfo, item: bool = False) -> str:
    """What to write instead, derived from the field's type and constraints (never from its description);
    ``item``: for one item of the list the field holds."""
    validators = {getattr(m, "func", None) for m in info.metadata}
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    or_null = ", or null" if _allows_none(info.annotation) else ""
    if extra.get("x-kleidi-type") == "duration":
        return "write a duration greater than 0, such as 500ms, 5s or 1m"
    if parse_mode in validators:
        return MODE_FIX
    if check_url in validators:
        return "write the server's URL such as https://vault.example.com:8200"
    if check_env_name in validators:
        return f"give the name of an environment variable, such as VAULT_TOKEN{or_null}"
    members = _members(info.annotation)
    models = _models(info.annotation)
    if len(models) > 1:
        tags = [t for t in map(_tag, models) if t]
        tag = _tag_field(models[0])
        return f"write it as a mapping that starts with `{tag}:` ({', '.join(tags)}) and that {tag}'s settings"
    if models:
        first, field = next(iter(models[0].model_fields.items()))
        value = _example(field)
        shown = f"`{first}: {_inline(value)}`" if value is not None else f"`{first}: ...`"
        return f"write it as a mapping, with its settings indented below it (e.g. {shown})"
    example = _example(info)
    such_as = f", such as {_inline(example)}" if example is not None else ""
    if len(members) == 1:
        member = members[0]
        if typing.get_origin(member) is Literal:
            return f"use one of: {', '.join(map(str, typing.get_args(member)))}{or_null}"
        if member is bool:
            return "use true or false"
        if member is int:
            low, high = _bounds(info.metadata)
            if low is not None and high is not None:
                return f"use a whole number from {low} to {high}"
            if low is not None:
                return f"use a whole number of at least {low}{such_as}"
            return f"use a whole number{such_as}"
        if member is Path:
            return f"give an absolute path{such_as}{or_null}"
        if member is str:
            return f"write it as a single string{such_as}{or_null}"
        if typing.get_origin(member) is list:
            inner = {m for arg in typing.get_args(member) for m in _members(arg)}
            if item:
                return "give each item as a number or a name" if inner == {int, str} else "correct the item"
            items = "numbers or names, such as [0, 1000]" if inner == {int, str} else "values"
            return f"give a list of {items}{or_null}"
    if set(members) == {int, str}:
        return f"give a name or a number{or_null}"
    return f"give a value of type {info.annotation}{or_null}"  # a new kind of setting: a test asks for a better one


_USERINFO = re.compile(r"(^|://|\s)[^\s/?#@]+@")


def _shown(value: str) -> str:
    """A value fit for an error message: any user:password@ cut out, and at most 60 characters."""
    value = _USERINFO.sub(r"\1***@", value)
    return value if len(value) <= 60 else f"{value[:40]}... ({len(value)} characters)"


class Problem(NamedTuple):
    """One mistake in the settings."""

    where: str
    """The setting's dotted path, and what set it if not the file: ``server.endpoint (from environment
    variable KLEIDI_SERVER__ENDPOINT)``."""
    message: str
    """What is wrong with it."""
    fix: str
    """What to do about it: an action, from the validator that refused the value or derived from the
    setting's type and constraints."""


class InvalidSettings(ConfigError):
    """Settings that fail validation: every mistake at once, one :class:`Problem` each.

    ``problems`` holds each problem with its own fix, for renderers that show them one by one.
    ``message`` starts with ``invalid configuration (<source>):``, then one line per problem.
    With one problem, its fix is ``fix``, and ``str()`` is ``"<message>; fix: <fix>"`` as for any
    kleidi error. With several, each line of ``message`` ends with its own ``; fix: ...``, ``fix``
    says to correct each of them, and ``str()`` is ``message`` alone: a last ``; fix:`` for all of
    them would read as the last line's.
    """

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        head = f"invalid configuration ({source}):"
        if len(self.problems) == 1:
            only = self.problems[0]
            super().__init__(f"{head}\n  {only.where}: {only.message}", fix=only.fix)
            return
        lines = "".join(f"\n  {p.where}: {p.message}; fix: {p.fix}" for p in self.problems)
        super().__init__(f"{head}{lines}", fix=f"correct each of the {len(self.problems)} settings above as its "
                         "line says")
        self.args = (self.message,)


def validation_problems(exc: ValidationError, origins: Mapping[tuple[str, ...], str] | None = None) -> list[Problem]:
    """One :class:`Problem` per mistake pydantic found, each with a fix; ``origins`` maps setting
    paths to what set them (an environment variable, a flag)."""
    origins = origins or {}
    problems: list[Problem] = []
    for err in exc.errors():
        at = _locate(err["loc"])
        # An unknown section set from the environment fails at the section ("servr"), not at the
        # variable's full path ("servr", "endpoint"): find the origin by prefix too.
        origin = origins.get(at.path) or next((o for p, o in origins.items() if p[:len(at.path)] == at.path), None)
        where = (at.shown or "(top level)") + (f" (from {origin})" if origin else "")
        problem = _problem(err, at, where)
        if problem not in problems:  # the members of a union (int | str) each report the same mistake
            problems.append(problem)
    return problems


def _problem(err: Any, at: _Located, where: str) -> Problem:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        name = at.path[-1]
        close = difflib.get_close_matches(name, at.siblings, n=1)
        hint = f"did you mean {'.'.join((*at.path[:-1], close[0]))!r}?" if close else \
            f"valid fields here: {', '.join(at.siblings)}"
        owners = [str(_tag(m)) for m in at.others if name in m.model_fields]
        if at.chosen is not None and owners:
            # Suggestions come from the chosen backend or method only; say where the field belongs.
            tag = _tag_field(at.chosen)
            return Problem(where, f"unknown field for {tag}: {_tag(at.chosen)} (it is a setting of {tag} "
                           f"{', '.join(owners[:-1]) + ' or ' if len(owners) > 1 else ''}{owners[-1]})",
                           f"remove it ({hint})")
        return Problem(where, "unknown field", f"remove it ({hint})")
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # pydantic names the field and the choices
        tag = str(ctx.get("discriminator", "kind")).strip("'")
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", ""))) or (
            [str(_tag(m)) for m in _models(at.info.annotation)] if at.info is not None else [])
        if kind == "union_tag_not_found":
            return Problem(where, f"missing `{tag}`", f"set {tag} to one of: {', '.join(choices)}")
        given = err["input"].get(tag) if isinstance(err["input"], dict) else None
        return Problem(where.replace(at.shown, f"{at.shown}.{tag}", 1), f"unknown {tag} {_shown(str(given))!r}",
                       f"use one of: {', '.join(choices)}")
    error = ctx.get("error")
    own_fix, own_message = getattr(error, "fix", None), getattr(error, "message", None)
    if isinstance(own_fix, str) and isinstance(own_message, str):
        message, fix = own_message, own_fix  # the validator's own (InvalidValue, DurationError)
    elif isinstance(ctx.get("fix"), str):
        message, fix = str(err["msg"]), ctx["fix"]  # a PydanticCustomError's
    elif kind == "missing":
        message = "required, and not set"
        example = _example(at.info) if at.info is not None else None
        fix = f"set it, e.g. `{at.path[-1]}: {_inline(example)}`" if example is not None else f"set {at.path[-1]}"
    elif at.info is not None:
        message, fix = str(err["msg"]), _type_fix(at.info, at.item)
        if at.in_union:  # "Input should be a valid integer" for one member, "... string" for the other
            message = "not a value of the expected type"
        elif kind == "path_type":  # pydantic's own names a Python class
            message = "not a path"
    else:
        message, fix = str(err["msg"]), "correct the value (see docs/configuration.md)"
    message = _USERINFO.sub(r"\1***@", message.removeprefix("Value error, "))
    given = err.get("input")
    if kind not in NO_INPUT_ERRORS and isinstance(given, str | int | float | bool) and repr(given) not in message:
        message += f" (got {_shown(given)!r})" if isinstance(given, str) else f" (got {_shown(_inline(given))})"
    return Problem(where, message, fix)


def json_schema() -> dict[str, Any]:
    schema = KleidiSettings.model_json_schema(mode="validation")
    # pydantic writes a field's own default as the Python value (5.0): write it as a file would ("5s").
    for definition in [schema, *schema.get("$defs", {}).values()]:
        for prop in definition.get("properties", {}).values():
            if prop.get("x-kleidi-type") == "duration" and isinstance(prop.get("default"), int | float):
                prop["default"] = format_duration(prop["default"])
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kleidi configuration"
    return schema
