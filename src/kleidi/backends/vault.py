"""Vault / OpenBao Transit backend: a named Transit key wraps the seeds; the KEK never leaves Vault.

Wire calls (Vault HTTP API, identical in OpenBao):

* ``GET  <mount>/keys/<key>``         key versions, creation times, min_decryption_version (refresh)
* ``POST <mount>/encrypt/<key>``      seed -> ``vault:vN:...``, pinned to the current version, with the
                                      envelope's authenticated data as ``associated_data`` (AEAD keys)
* ``POST <mount>/decrypt/<key>``      the reverse, with the same ``associated_data``
* ``auth/<mount>/login``, ``auth/token/renew-self``, ``auth/token/lookup-self``   token lifecycle

One pooled HTTP/1.1 client (aiohttp, keep-alive) serves every request: measured against the Transit
encrypt endpoint at 64 concurrent calls it does about 5x the throughput of hvac in a thread pool and
15x that of httpx's async client (docs/backends/vault.md). The token is renewed before it
expires; if Vault still refuses it (expired, revoked), kleidi logs in again and retries the request
once, so an expired token never fails a call from the apiserver.
"""

from __future__ import annotations

import asyncio
import base64
import json as json_module
import logging
import os
import re
import ssl
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import click
from pydantic import Field, field_validator, model_validator

try:  # the vault extra: the settings below import without it, the backend needs it
    import aiohttp
except ImportError:  # pragma: no cover - exercised by tests/test_cli_extras.py in a subprocess
    aiohttp = None  # type: ignore[assignment]

from kleidi import audit, telemetry
from kleidi.backends.base import MAX_PLAINTEXT_SIZE, Backend, FileStamp, KeySet, KeyVersion, UnboundAAD, file_stamp
from kleidi.backends.batching import Coalescer
from kleidi.checks import FAIL, PASS, SKIP, Check, private_file
from kleidi.cli_support import load
from kleidi.errors import BackendUnavailable, ConfigError, DecryptionFailed, InvalidValue, KleidiError, RetiredKey
from kleidi.settings.types import BackendSettingsBase, OptionalEnvName, Settings, Url

log = logging.getLogger("kleidi.backends.vault")


class VaultTLSSettings(Settings):
    """TLS to Vault/OpenBao. The system trust store is used unless ca_file is set."""

    ca_file: Path | None = None
    """PEM bundle of the CA(s) that sign the server's certificate."""

    server_name: str | None = None
    """Name to expect in the server certificate (and send as SNI) when it differs from the host in
    `address`, e.g. when connecting by IP."""

    client_cert_file: Path | None = None
    """Client certificate (PEM) presented to the server, for listeners that require one and for the
    `cert` auth method. May hold the key too (a combined PEM such as the kubelet's client cert)."""

    client_key_file: Path | None = None
    """Private key for client_cert_file, if it is not in the same file."""


class VaultTokenAuth(Settings):
    """A Vault token read from a file (re-read when the file changes) or an environment variable."""

    method: Literal["token"] = "token"
    """Auth method."""
    token_file: Path | None = None
    """File holding the token. Re-read whenever it changes, so an external agent can rotate it."""
    token_env: OptionalEnvName = None
    """Name of an environment variable holding the token (used if token_file is not set)."""

    @model_validator(mode="after")
    def _one_source(self) -> VaultTokenAuth:
        if (self.token_file is None) == (self.token_env is None):
            if self.token_file is not None:
                raise InvalidValue("both token_file and token_env are set: kleidi reads the token from one place",
                                   fix="keep one of token_file and token_env, and remove the other")
            raise InvalidValue("neither token_file nor token_env is set: kleidi has no token to log in with",
                               fix="set token_file to the file that holds the token (or token_env to the name of "
                               "the environment variable)")
        return self


class VaultAppRoleAuth(Settings):
    """AppRole: a role_id and a secret_id, each read from a file or an environment variable."""

    method: Literal["approle"] = "approle"
    """Auth method."""
    mount: str = "approle"
    """Path the AppRole auth method is mounted at."""
    role_id_file: Path | None = None
    """File holding the role_id."""
    role_id_env: OptionalEnvName = None
    """Environment variable holding the role_id (if role_id_file is not set)."""
    secret_id_file: Path | None = None
    """File holding the secret_id (re-read at every login)."""
    secret_id_env: OptionalEnvName = None
    """Environment variable holding the secret_id (if secret_id_file is not set)."""

    @model_validator(mode="after")
    def _sources(self) -> VaultAppRoleAuth:
        for name in ("role_id", "secret_id"):
            if (getattr(self, f"{name}_file") is None) == (getattr(self, f"{name}_env") is None):
                if getattr(self, f"{name}_file") is not None:
                    raise InvalidValue(f"both {name}_file and {name}_env are set: kleidi reads the {name} from "
                                       "one place", fix=f"keep one of {name}_file and {name}_env, and remove the other")
                raise InvalidValue(f"neither {name}_file nor {name}_env is set: kleidi has no {name} to log in with",
                                   fix=f"set {name}_file to the file that holds the {name} (or {name}_env to the name "
                                   "of the environment variable)")
        return self


class VaultJWTAuth(Settings):
    """JWT auth: a JWT read from a file (e.g. a projected service-account token) is exchanged for a token."""

    method: Literal["jwt"] = "jwt"
    """Auth method."""
    mount: str = "jwt"
    """Path the JWT auth method is mounted at."""
    role: str = Field(examples=["kleidi"])
    """Vault role to log in as."""
    token_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    """File holding the JWT; re-read at every login, so a rotated projected token is picked up."""


class VaultKubernetesAuth(Settings):
    """Kubernetes auth: Vault checks the service-account token with the cluster's TokenReview API."""

    method: Literal["kubernetes"] = "kubernetes"
    """Auth method."""
    mount: str = "kubernetes"
    """Path the Kubernetes auth method is mounted at."""
    role: str = Field(examples=["kleidi"])
    """Vault role to log in as."""
    token_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    """File holding the service-account JWT; re-read at every login."""


class VaultCertAuth(Settings):
    """TLS certificate auth: the client certificate in `tls` is the credential."""

    method: Literal["cert"] = "cert"
    """Auth method."""
    mount: str = "cert"
    """Path the cert auth method is mounted at."""
    role: str | None = None
    """Certificate role to log in as; null lets Vault pick the matching one."""


VaultAuthSettings = Annotated[VaultTokenAuth | VaultAppRoleAuth | VaultJWTAuth | VaultKubernetesAuth | VaultCertAuth,
                              Field(discriminator="method")]


class VaultBackendSettings(BackendSettingsBase):
    """A named key in Vault's or OpenBao's Transit secrets engine wraps the seeds."""

    kind: Literal["vault"] = "vault"
    """Backend type."""

    # examples: what the fix of a missing required setting shows (validation_problems).
    address: Url = Field(examples=["https://vault.example.com:8200"])
    """Server URL, e.g. https://vault.example.com:8200. Never with credentials in it
    (https://user:password@...): it is shown in logs and Status, so kleidi refuses it; credentials
    go in `auth`, read from files."""

    namespace: str | None = None
    """Vault Enterprise / OpenBao namespace (sent as X-Vault-Namespace); null for the root."""

    transit_mount: str = "transit"
    """Path the Transit secrets engine is mounted at."""

    key: str = Field(examples=["kubernetes"])
    """Name of the Transit key. Use an AEAD type (aes256-gcm96, the default, or chacha20-poly1305)
    so that each ciphertext is bound to its key_id and annotations."""

    auth: VaultAuthSettings = Field(examples=[{"method": "token", "token_file": "/etc/kleidi/vault-token"}])
    """How kleidi logs in. Secrets come from files or environment variables, never from this file."""

    tls: VaultTLSSettings = VaultTLSSettings()
    """TLS settings for the connection to the server."""

    max_connections: int = Field(default=32, ge=1, le=1024)
    """Connections kept open to the server and shared by all requests."""

    max_in_flight: int = Field(default=1, ge=1, le=1024)
    """Transit encrypt (or decrypt) requests kleidi keeps open at once. Calls that arrive while that
    many are out are sent together, as one batch_input request, when one returns: a burst costs the
    server a few requests instead of one per call, and a lone call never waits."""

    @field_validator("namespace")
    @classmethod
    def _namespace_path(cls, value: str | None) -> str | None:
        return value.strip("/") or None if value is not None else None

    @field_validator("transit_mount")
    @classmethod
    def _mount_path(cls, value: str) -> str:
        value = value.strip("/")
        if not value:
            raise InvalidValue("transit_mount is empty",
                               fix="give the path the Transit engine is mounted at, e.g. transit")
        return value

AEAD_KEY_TYPES = frozenset({"aes128-gcm96", "aes256-gcm96", "chacha20-poly1305", "xchacha20-poly1305"})
_MAX_ERROR_TEXT = 200  # Vault's error strings are short; never echo a whole body into logs or errors


def _read_secret(path: Path | None, env: str | None, what: str) -> str:
    """A credential from a file (preferred) or an environment variable; never logged."""
    if path is not None:
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"backend.auth: cannot read the {what} file {path}: {exc.strerror}",
                              fix="check the path and that kleidi's user can read it") from None
        if not value:
            raise ConfigError(f"backend.auth: the {what} file {path} is empty", fix=f"write the {what} into it")
        return value
    assert env is not None
    value = os.environ.get(env, "").strip()
    if not value:
        raise ConfigError(f"backend.auth: environment variable {env} (the {what}) is not set or empty",
                          fix=f"set {env} in kleidi's environment, or give the {what} in a file (the *_file setting)")
    return value


class VaultError(BackendUnavailable):
    """A non-2xx answer. ``errors`` are Vault's own messages, truncated. One that escapes the
    backend is an outage for the caller (UNAVAILABLE): the mapping to a precise error happens here."""

    def __init__(self, status: int, errors: list[str]) -> None:
        self.status = status
        self.errors = [e[:_MAX_ERROR_TEXT] for e in errors[:3]]
        super().__init__(f"Vault answered {status}: {'; '.join(self.errors) or 'no detail'}")


@dataclass
class _Token:
    value: str
    lease: float  # seconds; 0 = never expires (e.g. a root token)
    renewable: bool
    obtained: float  # time.monotonic() when issued or last renewed
    source_stamp: object = None  # token file identity, for token auth

    def remaining(self) -> float:
        return float("inf") if self.lease <= 0 else self.lease - (time.monotonic() - self.obtained)

    def due_for_renewal(self) -> bool:
        # Renew when a third of the lease is left: time for a retry before it runs out.
        return self.lease > 0 and self.remaining() < self.lease / 3


def _denied() -> BackendUnavailable:
    # A new instance at each raise: a shared one would carry every earlier raise's traceback (and
    # the frames, with their requests and seeds, it keeps alive).
    return BackendUnavailable("Vault denied the request (permission denied)",
                              fix="check kleidi's policy (`kleidi policy vault`) and its auth role")


class _Authenticator(ABC):
    """Obtains a token. ``can_login_again`` is False for a static token, which only an operator renews."""

    can_login_again: ClassVar[bool] = True

    @abstractmethod
    async def login(self, client: _VaultHTTP) -> _Token: ...


class _TokenFileAuth(_Authenticator):
    can_login_again = False

    def __init__(self, settings: VaultTokenAuth) -> None:
        self.settings = settings

    def stamp(self) -> object:
        if self.settings.token_file is None:
            return os.environ.get(self.settings.token_env or "", "")
        return file_stamp(self.settings.token_file)

    async def login(self, client: _VaultHTTP) -> _Token:
        stamp = self.stamp()
        value = _read_secret(self.settings.token_file, self.settings.token_env, "token")
        data = _data(await client.call("GET", "auth/token/lookup-self", token=value), "ttl")
        return _Token(value=value, lease=_seconds(data.get("ttl"), "data.ttl"), renewable=data.get("renewable") is True,
                      obtained=time.monotonic(), source_stamp=stamp)


class _LoginAuth(_Authenticator):
    """Methods that exchange a credential for a token at ``auth/<mount>/login``."""

    def __init__(self, mount: str) -> None:
        self.mount = mount.strip("/")

    @abstractmethod
    def payload(self) -> dict[str, Any]: ...

    async def login(self, client: _VaultHTTP) -> _Token:
        body = await client.call("POST", f"auth/{self.mount}/login", json=self.payload(), token=None)
        auth = body.get("auth")
        token = auth.get("client_token") if isinstance(auth, dict) else None
        if not isinstance(auth, dict) or not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
            raise BackendUnavailable(f"login at auth/{self.mount} returned no usable token")
        return _Token(value=token, lease=_seconds(auth.get("lease_duration"), "auth.lease_duration"),
                      renewable=auth.get("renewable") is True, obtained=time.monotonic())


class _AppRoleAuth(_LoginAuth):
    def __init__(self, settings: VaultAppRoleAuth) -> None:
        super().__init__(settings.mount)
        self.settings = settings

    def payload(self) -> dict[str, Any]:
        s = self.settings
        return {"role_id": _read_secret(s.role_id_file, s.role_id_env, "role_id"),
                "secret_id": _read_secret(s.secret_id_file, s.secret_id_env, "secret_id")}


class _JWTAuth(_LoginAuth):
    """JWT and Kubernetes auth share the request shape: a role and a JWT read fresh from its file."""

    def __init__(self, settings: VaultJWTAuth | VaultKubernetesAuth) -> None:
        super().__init__(settings.mount)
        self.settings = settings

    def payload(self) -> dict[str, Any]:
        return {"role": self.settings.role, "jwt": _read_secret(self.settings.token_file, None, "JWT")}


class _CertAuth(_LoginAuth):
    def __init__(self, settings: VaultCertAuth) -> None:
        super().__init__(settings.mount)
        self.settings = settings

    def payload(self) -> dict[str, Any]:
        return {"name": self.settings.role} if self.settings.role else {}


def _authenticator(settings: VaultBackendSettings) -> _Authenticator:
    auth = settings.auth
    if isinstance(auth, VaultTokenAuth):
        return _TokenFileAuth(auth)
    if isinstance(auth, VaultAppRoleAuth):
        return _AppRoleAuth(auth)
    if isinstance(auth, VaultJWTAuth | VaultKubernetesAuth):
        return _JWTAuth(auth)
    if settings.tls.client_cert_file is None:
        raise ConfigError("backend.auth.method is cert but backend.tls.client_cert_file is not set",
                          fix="set it to the client certificate (and client_key_file, unless the key is in the same "
                          "file)")
    return _CertAuth(auth)


def _ssl_context(settings: VaultBackendSettings) -> ssl.SSLContext:
    tls = settings.tls
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
        if tls.client_cert_file is not None:
            context.load_cert_chain(str(tls.client_cert_file),
                                    str(tls.client_key_file) if tls.client_key_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"backend.tls: cannot load the CA or client certificate: {exc}",
                          fix="check ca_file, client_cert_file and client_key_file (PEM)") from None
    return context


class _VaultHTTP:
    """The one HTTP client: pooled connections, namespace header, token lifecycle, error mapping."""

    def __init__(self, settings: VaultBackendSettings) -> None:
        self.settings = settings
        self.auth = _authenticator(settings)
        self._headers = {"X-Vault-Request": "true"}
        if settings.namespace:
            self._headers["X-Vault-Namespace"] = settings.namespace
        self._ssl = _ssl_context(settings) if settings.address.startswith("https:") else None
        self._tls_stamp = self._tls_files_stamp()
        if not settings.address.startswith("https:") and any(
                (settings.tls.ca_file, settings.tls.client_cert_file, settings.tls.server_name)):
            log.warning("backend.tls is set but backend.address is http://: TLS settings are not used")
        self._base = f"{settings.address}/v1/"
        self._session: aiohttp.ClientSession | None = None  # created in the event loop, on first use
        self._token: _Token | None = None
        self._lock = asyncio.Lock()
        self.logins = 0
        self.renewals = 0

    async def call(self, method: str, path: str, *, json: dict[str, Any] | None = None,
                   token: str | None) -> dict[str, Any]:
        """One request; transport problems become :class:`BackendUnavailable`, non-2xx :class:`VaultError`."""
        headers = {"X-Vault-Token": token} if token else {}
        try:
            async with self.session().request(method, self._base + path, json=json, headers=headers,
                                              server_hostname=self.settings.tls.server_name) as response:
                status = response.status
                payload = await response.read()
        except TimeoutError:
            raise BackendUnavailable(f"Vault at {self.settings.address} did not answer within "
                                     f"{self.settings.timeout}s") from None
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"cannot reach Vault at {self.settings.address}: {type(exc).__name__}: "
                                     f"{str(exc)[:_MAX_ERROR_TEXT]}") from None
        try:
            body = json_module.loads(payload) if payload else {}
        except ValueError:
            body = {}
        if status >= 300:
            errors = body.get("errors") if isinstance(body, dict) else None
            raise VaultError(status, [str(e) for e in errors[:3]] if isinstance(errors, list) else [])
        if not isinstance(body, dict):
            raise BackendUnavailable(f"Vault answered {status} with a body that is not a JSON object")
        return body

    def _tls_files_stamp(self) -> tuple[FileStamp | None, ...]:
        tls = self.settings.tls
        return tuple(file_stamp(path) for path in (tls.ca_file, tls.client_cert_file, tls.client_key_file))

    async def reload_tls_if_changed(self, force: bool = False) -> None:
        """Pick up a renewed client certificate (e.g. the kubelet's) or CA bundle without a restart."""
        stamp = self._tls_files_stamp()
        if self._ssl is None or (stamp == self._tls_stamp and not force):
            return
        self._ssl = _ssl_context(self.settings)
        self._tls_stamp = stamp
        old, self._session = self._session, None  # new connections use the new certificates
        if old is not None:
            await old.close()
        log.info("TLS certificates reloaded")

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.settings.max_connections,
                                             ssl=self._ssl if self._ssl is not None else True)
            self._session = aiohttp.ClientSession(headers=self._headers, connector=connector,
                                                  timeout=aiohttp.ClientTimeout(total=self.settings.timeout))
        return self._session

    async def _fresh_token(self) -> _Token:
        """Renew the token or log in again, once, however many requests ask at the same time."""
        async with self._lock:
            current = self._token
            if current is not None and not current.due_for_renewal() and not self._static_token_changed(current):
                return current  # another request already renewed or replaced it
            if current is not None and current.renewable and current.remaining() > 0 and \
                    not self._static_token_changed(current) and await self._renew(current):
                return current
            if current is not None and not self.auth.can_login_again and \
                    not self._static_token_changed(current) and current.remaining() > 0:
                return current  # a static token that has not expired: keep using it
            try:
                token = await self.auth.login(self)
            except VaultError as exc:  # a refused login is an outage for the caller, never a bad ciphertext
                raise BackendUnavailable(f"Vault login failed ({type(self.auth).__name__.strip('_')}): "
                                         f"{exc}") from None
            self.logins += 1
            telemetry.VAULT_LOGINS.inc()
            audit.note("vault_login", method=self.settings.auth.method, ttl_s=token.lease)
            telemetry.VAULT_TOKEN_EXPIRY.set(time.time() + token.lease if token.lease else 0)
            log.info("logged in to Vault (%s); token valid for %s", type(self.auth).__name__.strip("_"),
                     f"{token.lease:.0f}s" if token.lease else "ever")
            self._token = token
            if current is not None and self.auth.can_login_again and current.remaining() > 0:
                await self._revoke(current)
            return token

    async def _revoke(self, token: _Token) -> None:
        """Best effort: a token we stop using should not stay valid in Vault until its TTL runs out."""
        try:
            await self.call("POST", "auth/token/revoke-self", json={}, token=token.value)
        except (VaultError, BackendUnavailable):
            pass

    async def _renew(self, token: _Token) -> bool:
        try:
            body = await self.call("POST", "auth/token/renew-self", json={}, token=token.value)
        except VaultError as exc:
            log.warning("Vault token renewal failed (%s); logging in again", exc)
            return False
        auth = body.get("auth")
        lease = _seconds(auth.get("lease_duration") if isinstance(auth, dict) else None, "auth.lease_duration")
        # A lease cut short by the token's max TTL is no real renewal: log in afresh when we can.
        if lease < min(token.lease / 2, 5.0) and self.auth.can_login_again:
            return False
        token.lease, token.obtained = lease, time.monotonic()
        self.renewals += 1
        telemetry.VAULT_RENEWALS.inc()
        audit.note("vault_renewal", ttl_s=lease)
        telemetry.VAULT_TOKEN_EXPIRY.set(time.time() + lease if lease else 0)
        log.info("Vault token renewed for %.0fs", lease)
        return True

    def _static_token_changed(self, token: _Token) -> bool:
        return isinstance(self.auth, _TokenFileAuth) and self.auth.stamp() != token.source_stamp

    async def token(self) -> _Token:
        token = self._token
        if token is None or token.due_for_renewal() or self._static_token_changed(token):
            token = await self._fresh_token()
        return token

    async def authed(self, method: str, path: str, json: dict[str, Any] | None = None) -> dict[str, Any]:
        """A request with the current token; on 403 it gets a new token and tries once more."""
        token = await self.token()
        try:
            return await self.call(method, path, json=json, token=token.value)
        except VaultError as exc:
            if exc.status != 403:
                raise
        if await self._token_still_valid(token):
            raise _denied() from None  # the policy says no: logging in again would not change that
        if self.auth.can_login_again and self._token is token:
            self._token = None  # refused: do not renew it, log in again (once, however many requests saw it)
        token = await self._fresh_token()
        try:
            return await self.call(method, path, json=json, token=token.value)
        except VaultError as exc:
            if exc.status == 403:
                raise _denied() from None
            raise

    async def _token_still_valid(self, token: _Token) -> bool:
        """After a 403: is the token itself fine (a policy denial) or expired/revoked?"""
        try:
            await self.call("GET", "auth/token/lookup-self", token=token.value)
        except VaultError:
            return False
        return True

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _data(body: dict[str, Any], field: str) -> dict[str, Any]:
    """``body["data"]``, checked: whatever answers at the address may not be Vault."""
    data = body.get("data")
    if not isinstance(data, dict) or field not in data:
        raise BackendUnavailable(f"unexpected answer from Vault (no data.{field}): is backend.address a Vault server?")
    return data


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Every answer is untrusted input: whatever listens at backend.address may not be Vault, or may be
# hostile. These checks turn a malformed answer into BackendUnavailable with a neutral reason.
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,4096}")  # a token goes into a header: printable ASCII, bounded
_TRANSIT_CIPHERTEXT_RE = re.compile(r"vault:v[0-9]{1,10}:[A-Za-z0-9+/=:_-]{1,2048}")
_MAX_VERSION = 2**32 - 1  # the envelope header's field


def _malformed(what: str) -> BackendUnavailable:
    return BackendUnavailable(f"unexpected answer from Vault: {what} is malformed")


def _seconds(value: Any, what: str) -> float:
    """A lease or TTL in seconds; missing means 0 (never expires)."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 10**10:
        raise _malformed(what)
    return float(value)


def _version(value: Any, what: str) -> int:
    """A Transit key version: JSON numbers, or the decimal strings Vault uses as map keys."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_VERSION:
        raise _malformed(what)
    return value


def _key_versions(value: Any) -> dict[int, str]:
    """``data.keys`` of a Transit key: version -> what identifies that version's creation. Vault sends
    the creation time (a string; a number for old keys), or for asymmetric keys an object with the
    time and the public key; its text is what key_ids have always been derived from, so it stays."""
    if not isinstance(value, dict) or len(value) > 100_000:
        raise _malformed("data.keys")
    versions: dict[int, str] = {}
    for version, created in value.items():
        if isinstance(created, bool) or not isinstance(created, str | int | dict) or len(str(created)) > 16384:
            raise _malformed("data.keys")
        versions[_version(version, "data.keys")] = str(created)
    return versions


def _plaintext(answer: Any) -> bytes:
    if not isinstance(answer, str) or len(answer) > 4 * MAX_PLAINTEXT_SIZE:
        raise _malformed("the decrypted plaintext")
    try:
        plaintext = base64.b64decode(answer, validate=True)
    except ValueError:
        raise _malformed("the decrypted plaintext") from None
    if not 0 < len(plaintext) <= MAX_PLAINTEXT_SIZE:
        raise _malformed("the decrypted plaintext")
    return plaintext


class VaultBackend(Backend):
    """Seeds wrapped by a Vault/OpenBao Transit key; Transit key versions are kleidi's KEK versions."""

    kind: ClassVar[str] = "vault"
    settings_model: ClassVar[type[VaultBackendSettings]] = VaultBackendSettings
    requires: ClassVar[tuple[str, ...]] = ("aiohttp",)
    retired_fix: ClassVar[str] = (
        "if the objects stored under it are still needed, lower the Transit key's min_decryption_version "
        "(vault write <mount>/keys/<key>/config min_decryption_version=N); else delete and re-create them")

    @classmethod
    def lifecycle_hint(cls, command: str, backend: VaultBackendSettings, version: int | None) -> str | None:
        """What to run in Vault/OpenBao instead of a local-keyring command."""
        namespace = f" -namespace={backend.namespace}" if backend.namespace else ""
        key = f"{backend.transit_mount}/keys/{backend.key}"
        cli = "vault (or bao for OpenBao)"
        if command == "rotate":
            return (f"rotate the Transit key with {cli}: vault write{namespace} -f {key}/rotate; running kleidi "
                    "servers pick up the new version within backend.refresh_interval")
        if command == "retire":
            floor = (version or 1) + 1
            return (f"raise the Transit key's min_decryption_version with {cli}: vault write{namespace} {key}/config "
                    f"min_decryption_version={floor} (versions below {floor} stop decrypting)")
        if command == "keygen":
            return f"create the Transit key with {cli}: vault write{namespace} -f {key}"
        return (f"list the Transit key's versions with {cli}: vault read{namespace} {key}; "
                "`kleidi status --config ...` shows the key_id in use")

    @classmethod
    def cli_commands(cls) -> list[tuple[str, Any]]:
        return [("policy", policy_command)]

    @classmethod
    def file_checks(cls, settings: VaultBackendSettings) -> list[Check]:
        files = (("token file", getattr(settings.auth, "token_file", None)),
                 ("secret_id file", getattr(settings.auth, "secret_id_file", None)),
                 ("client key file", settings.tls.client_key_file or settings.tls.client_cert_file))
        return [private_file(label, path) for label, path in files if path is not None]

    async def preflight(self, limit: float = 30.0) -> list[Check]:
        """JWT auth and TLS both need the clocks to agree: compare Vault's Date header with ours."""
        settings = self.settings
        ssl_context = _ssl_context(settings) if settings.address.startswith("https:") else None
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.timeout + 3)) as session, \
                    session.get(f"{settings.address}/v1/sys/health", ssl=ssl_context if ssl_context else True,
                                server_hostname=settings.tls.server_name) as response:
                date = response.headers.get("Date")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return [Check("clock skew", FAIL, f"cannot reach {settings.address}: {type(exc).__name__}",
                          "check backend.address, and that Vault runs and this node reaches it")]
        if not date:
            return [Check("clock skew", SKIP, "the server sent no Date header")]
        skew = parsedate_to_datetime(date).timestamp() - time.time()
        if abs(skew) > limit:
            return [Check("clock skew", FAIL, f"this node's clock is {-skew:+.0f}s off the backend's",
                          "synchronise the clocks (chrony/NTP): JWT and TLS checks fail beyond a small skew")]
        return [Check("clock skew", PASS, f"{abs(skew):.0f}s (limit {limit:.0f}s)")]

    def __init__(self, settings: VaultBackendSettings) -> None:
        self.settings = settings
        self.client = _VaultHTTP(settings)
        self._mount, self._key = settings.transit_mount, settings.key
        self._identity = f"{(settings.namespace or '').strip('/')}/{self._mount}/{self._key}"
        self._key_set: KeySet | None = None
        self._aead = True
        self._created: dict[int, str] = {}  # every version seen: version -> creation time
        self._highest_latest = 0
        self._rollback_floor = 0  # after a rollback: the version the key must pass before it is trusted again
        # Under load, concurrent wraps (or unwraps) leave together as one batch_input request.
        self._encrypts = Coalescer(self._encrypt_batch, settings.max_in_flight)
        self._decrypts = Coalescer(self._decrypt_batch, settings.max_in_flight)

    def describe(self) -> str:
        ns = f" namespace {self.settings.namespace}" if self.settings.namespace else ""
        return f"vault {self.settings.address}{ns} transit key {self._mount}/{self._key}"

    def _key_version(self, version: int) -> KeyVersion:
        return KeyVersion.derive(self.kind, self._identity, version, self._created[version])

    async def load_keys(self, force: bool = False) -> KeySet:
        await self.client.reload_tls_if_changed(force)
        try:
            data = _data(await self.client.authed("GET", f"{self._mount}/keys/{self._key}"), "latest_version")
        except VaultError as exc:
            if exc.status == 404:
                raise BackendUnavailable(f"Transit key {self._mount}/{self._key} does not exist",
                                         fix=f"create it (`vault write -f {self._mount}/keys/{self._key}`)") from None
            raise BackendUnavailable(str(exc)) from None
        if data.get("supports_encryption", True) is not True:
            raise BackendUnavailable(f"Transit key {self._key} is of type {data.get('type')}, which cannot encrypt",
                                     fix="use an aes256-gcm96 key")
        key_type = data.get("type")
        self._aead = isinstance(key_type, str) and key_type in AEAD_KEY_TYPES
        observed = _key_versions(data.get("keys") or {})
        latest = _version(data["latest_version"], "data.latest_version")
        min_decrypt = _version(data.get("min_decryption_version") or 1, "data.min_decryption_version")
        same_lineage = all(self._created.get(v, c) == c for v, c in observed.items())
        if not same_lineage:  # the key was deleted and re-created: a new lineage, new key_ids
            log.warning("Transit key %s was re-created (version creation times changed)", self._key)
            self._created, self._highest_latest, self._rollback_floor = {}, 0, 0
        if latest < self._highest_latest:
            self._rollback_floor = self._highest_latest
        if self._rollback_floor and latest <= self._rollback_floor:
            # Reporting an older version's key_id again would be a key_id flip-flop (A -> B -> A); and a
            # version re-created with the same number within the same second would even repeat a key_id.
            raise BackendUnavailable(f"Transit key {self._key} went back from version {self._rollback_floor} to "
                                     f"{latest} (restored from a backup?); kleidi will not report an older key_id "
                                     "again", fix=f"rotate the key past version {self._rollback_floor}")
        self._rollback_floor = 0
        self._created.update(observed)
        self._highest_latest = latest
        if latest not in self._created:
            raise BackendUnavailable(f"Transit key {self._key} reports latest version {latest} without its "
                                     "creation time")
        versions = [self._key_version(v) for v in sorted(self._created)]
        usable = {k.key_id: k for k in versions if min_decrypt <= k.version <= latest}
        retired = {k.key_id: k for k in versions if k.version < min_decrypt}
        unbound = None if self._aead else UnboundAAD(f"Transit key {self._key} is of type {key_type}",
                                                     "prefer aes256-gcm96")
        self._key_set = KeySet(current=self._key_version(latest), usable=usable, retired=retired,
                               generation=(tuple(sorted(observed.items())), latest, min_decrypt), unbound_aad=unbound)
        return self._key_set

    async def wrap(self, key: KeyVersion, plaintext: bytes, aad: bytes) -> bytes:
        return await self._encrypts.submit((key, plaintext, aad))

    async def unwrap(self, key: KeyVersion, payload: bytes, aad: bytes) -> bytes:
        if not payload.startswith(f"vault:v{key.version}:".encode()):
            raise DecryptionFailed()
        return await self._decrypts.submit((key, payload, aad))

    def _item(self, aad: bytes, **fields: Any) -> dict[str, Any]:
        if self._aead:
            fields["associated_data"] = _b64(aad)
        return fields

    async def _transit(self, operation: str, items: Sequence[dict[str, Any]], field: str) -> list[Any]:
        """One Transit request for one item (the plain form) or many (``batch_input``); per item, the
        answer's ``field`` or the :class:`VaultError` for that item."""
        path = f"{self._mount}/{operation}/{self._key}"
        if len(items) == 1:
            try:
                return [_data(await self.client.authed("POST", path, dict(items[0])), field)[field]]
            except VaultError as exc:
                return [exc]
        # 200 even if some items fail, so each failure stays with its own caller.
        body = {"batch_input": list(items), "partial_failure_response_code": 200}
        try:
            results = _data(await self.client.authed("POST", path, body), "batch_results")["batch_results"]
        except VaultError as exc:
            if exc.status == 400:  # every item failed: ask one by one, for each caller's own error
                return [result for item in items for result in await self._transit(operation, [item], field)]
            raise
        if not isinstance(results, list) or len(results) != len(items):
            raise BackendUnavailable("unexpected answer from Vault: batch_results does not match batch_input")
        if not all(isinstance(r, dict) for r in results):
            raise _malformed("batch_results")
        return [VaultError(400, [str(r["error"])]) if r.get("error") else r.get(field) for r in results]

    async def _encrypt_batch(self, calls: Sequence[tuple[KeyVersion, bytes, bytes]]) -> list[bytes | BaseException]:
        items = [self._item(aad, plaintext=_b64(plaintext), key_version=key.version) for key, plaintext, aad in calls]
        try:
            answers = await self._transit("encrypt", items, "ciphertext")
        except VaultError as exc:
            raise BackendUnavailable(f"Transit encrypt failed: {exc}") from None
        results: list[bytes | BaseException] = []
        for (key, _, _), answer in zip(calls, answers, strict=True):
            if isinstance(answer, VaultError):
                results.append(BackendUnavailable(f"Transit encrypt failed: {answer}"))
            elif not isinstance(answer, str) or not _TRANSIT_CIPHERTEXT_RE.fullmatch(answer):
                results.append(_malformed("the Transit ciphertext"))
            elif not answer.startswith(f"vault:v{key.version}:"):
                results.append(BackendUnavailable(f"Transit encrypted with another version than {key.version}"))
            else:
                results.append(answer.encode())
        return results

    async def _decrypt_batch(self, calls: Sequence[tuple[KeyVersion, bytes, bytes]]) -> list[bytes | BaseException]:
        items = [self._item(aad, ciphertext=payload.decode("ascii", errors="replace")) for _, payload, aad in calls]
        try:
            answers = await self._transit("decrypt", items, "plaintext")
        except VaultError as exc:
            raise BackendUnavailable(f"Transit decrypt failed: {exc}") from None
        results: list[bytes | BaseException] = []
        for (key, _, _), answer in zip(calls, answers, strict=True):
            try:
                results.append(self._decrypt_error(key, answer) if isinstance(answer, VaultError)
                               else _plaintext(answer))
            except BackendUnavailable as exc:
                results.append(exc)
        return results

    @staticmethod
    def _decrypt_error(key: KeyVersion, exc: VaultError) -> KleidiError:
        text = " ".join(exc.errors).lower()
        if exc.status == 400 and "disallowed by policy" in text:
            return RetiredKey(f"key_id {key.key_id} has been retired: Transit key version {key.version} is below "
                              "the key's min_decryption_version", fix=VaultBackend.retired_fix)
        if exc.status == 400 and "not found" in text:
            return BackendUnavailable(f"Transit decrypt failed: {exc}")
        if exc.status == 400:
            return DecryptionFailed()
        return BackendUnavailable(f"Transit decrypt failed: {exc}")

    async def close(self) -> None:
        await self.client.close()


def policy(settings: VaultBackendSettings) -> str:
    """The least-privilege Vault policy for this configuration, in HCL."""
    mount, key = settings.transit_mount, settings.key
    where = f" in namespace {settings.namespace}" if settings.namespace else ""
    flag = f" -namespace={settings.namespace}" if settings.namespace else ""
    return f'''# kleidi: minimal Vault/OpenBao policy for Transit key "{key}" on mount "{mount}"{where}.
# Write it with: vault policy write{flag} kleidi <this file>

# Wrap and unwrap seeds (the KEK never leaves Vault).
path "{mount}/encrypt/{key}" {{
  capabilities = ["update"]
}}
path "{mount}/decrypt/{key}" {{
  capabilities = ["update"]
}}

# Read key versions and min_decryption_version (key_id and rotation; no key material).
path "{mount}/keys/{key}" {{
  capabilities = ["read"]
}}

# Token lifecycle.
path "auth/token/lookup-self" {{
  capabilities = ["read"]
}}
path "auth/token/renew-self" {{
  capabilities = ["update"]
}}
path "auth/token/revoke-self" {{
  capabilities = ["update"]
}}
'''


# -- CLI commands -----------------------------------------------------------------------------------


@click.command("vault")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), envvar="KLEIDI_CONFIG",
              help="YAML config file with a vault backend (env KLEIDI_CONFIG).")
def policy_command(config_file: Path | None) -> None:
    """The Vault/OpenBao policy for the configured Transit mount and key (HCL)."""
    settings = load(config_file)
    if settings.backend.kind != "vault":
        raise ConfigError(f"backend.kind is {settings.backend.kind!r}; `kleidi policy vault` needs a vault backend",
                          fix="pass a config whose backend is kind: vault (--config)")
    click.echo(policy(settings.backend), nl=False)
