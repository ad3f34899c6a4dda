"""``kleidi recover`` (#14): an etcd backup of a real cluster read back offline with only kleidi's config.

The cluster is the e2e suite's (tests/e2e: real etcd, real kube-apiserver built from k8s.io/kubernetes,
kleidi serving KMS v2), on every backend the suite knows (tests/backend_harness.py). Secrets and a
ConfigMap are created through the apiserver, etcd is saved with ``etcdctl snapshot save``, everything is
stopped, and the real ``kleidi recover`` command must give back each object's data exactly. The
apiserver's own storage layer is checked on the upstream KMS v2 vectors (tests/test_storage_format.py)
with the seed going through kleidi's real Decrypt.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kleidi._crypto import kmsv2_storage as storage
from kleidi.config import load_settings
from kleidi.errors import DecryptionFailed
from kleidi.tools import recover as rec
from tests.backend_harness import BackendUnderTest, backend_params
from tests.conftest import KleidiProcess, keygen, run_kleidi, wait_for
from tests.e2e.cluster import ETCDCTL, KubeAPIServer
from tests.e2e.conftest import ControlPlane
from tests.e2e.test_kube_apiserver import create_secrets
from tests.test_storage_format import PLAINTEXT, TYPE0_DATA, TYPE0_KEY, TYPE1_DATA, TYPE1_SEED


def etcdctl(plane: ControlPlane, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([ETCDCTL, "--endpoints", plane.etcd.url, *args], capture_output=True, check=True,
                          env={**os.environ, "ETCDCTL_API": "3"})


def recover(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_kleidi("recover", "--config", str(config), *args, timeout=120)


def load_dir(out: Path) -> dict[str, dict[str, Any]]:
    """relative path -> parsed YAML of every recovered file."""
    return {str(p.relative_to(out)): yaml.safe_load(p.read_text()) for p in sorted(out.rglob("*.yaml"))}


def assert_private(out: Path) -> None:
    assert out.stat().st_mode & 0o777 == 0o700
    for path in out.rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o700 if path.is_dir() else 0o600), path


def decoded(obj: dict[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}


CRD = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
       "metadata": {"name": "widgets.example.com"},
       "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                    "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}
WIDGET = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w1", "namespace": "team-a"},
          "spec": {"size": 3, "colour": "teal"}}


def make_backup(plane: ControlPlane, backend: dict[str, Any] | None, custom_resource: bool = False) -> dict[str, Any]:
    """A cluster on one backend encrypting Secrets and ConfigMaps (and a custom resource, stored as JSON);
    objects created; a snapshot saved; then every process stopped (the etcd data dir is left as the last state)."""
    kleidi = plane.kleidi(backend=backend)
    resources = "secrets,configmaps" + (",widgets.example.com" if custom_resource else "")
    api = plane.apiserver(config=plane.encryption_config(kleidi, resources=resources))
    secrets = create_secrets(api, ["db", "tls"], namespace="default")
    api.kubectl("create", "namespace", "team-a")
    secrets_a = create_secrets(api, ["token"], namespace="team-a")
    api.kubectl("create", "configmap", "settings", "-n", "team-a", "--from-literal=mode=strict")
    if custom_resource:
        api.kubectl("create", "-f", "-", input=json.dumps(CRD))
        api.kubectl("wait", "--for", "condition=established", "crd/widgets.example.com", "--timeout=60s")
        wait_for(lambda: api.kubectl("create", "-f", "-", input=json.dumps(WIDGET), check=False).returncode == 0,
                 30, "the Widget API to be served", interval=0.5)
    snapshot = plane.workdir / "etcd.snapshot"
    etcdctl(plane, "snapshot", "save", str(snapshot))
    raw = etcdctl(plane, "get", "--print-value-only", "/registry/secrets/team-a/token").stdout
    plaintext_value = etcdctl(plane, "get", "--print-value-only", "/registry/namespaces/team-a").stdout
    plane.stop_all()  # no apiserver, no kleidi, no etcd: only the backup and the config remain
    return dict(plane=plane, kleidi=kleidi, snapshot=snapshot, raw=raw, plaintext_value=plaintext_value,
                secrets={("default", k): v for k, v in secrets.items()}
                | {("team-a", k): v for k, v in secrets_a.items()})


@pytest.fixture(params=backend_params())
def backup(request: pytest.FixtureRequest, control_plane: ControlPlane) -> dict[str, Any]:
    """A backup of a cluster on each backend (tests/backend_harness.py)."""
    backend: BackendUnderTest = request.param(request, control_plane.workdir)
    return make_backup(control_plane, backend.config)


@pytest.fixture
def local_backup(control_plane: ControlPlane) -> dict[str, Any]:
    """A backup of the quickstart's cluster (local keyring)."""
    return make_backup(control_plane, None, custom_resource=True)


@pytest.mark.e2e
def test_recover_snapshot_and_raw_value_on_every_backend(backup: dict[str, Any]) -> None:
    plane, config = backup["plane"], backup["kleidi"].config_path
    out = plane.workdir / "recovered"
    result = recover(config, "--snapshot", str(backup["snapshot"]), "--output-dir", str(out), "-o", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert_private(out)
    files = load_dir(out)
    for (namespace, name), data in backup["secrets"].items():
        obj = files[f"secrets/{namespace}/{name}.yaml"]
        assert (obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"]) == ("Secret", name, namespace)
        assert decoded(obj) == data
        assert obj["type"] == "Opaque"
    cm = files["configmaps/team-a/settings.yaml"]
    assert (cm["kind"], cm["data"]) == ("ConfigMap", {"mode": "strict"})
    # Every encrypted object was recovered (the apiserver's own Secrets/ConfigMaps too), nothing else.
    assert {o["resource"] for o in report["objects"]} == {"secrets", "configmaps"}
    assert len(files) == report["recovered"] == len(report["objects"])
    assert all(o["decoding"] == "decoded" for o in report["objects"])
    assert report["skipped"]["plaintext"] > 0  # namespaces, services, ... stored in plaintext
    assert json.loads((out / rec.INDEX_FILE).read_text())["recovered"] == report["recovered"]

    # One raw value, as `etcdctl get --print-value-only` printed it (with its trailing newline).
    value_file = plane.workdir / "token.value"
    value_file.write_bytes(backup["raw"])
    one = plane.workdir / "one"
    result = recover(config, "--value-file", str(value_file), "--key", "/registry/secrets/team-a/token",
                     "--output-dir", str(one))
    assert result.returncode == 0, result.stderr
    assert decoded(load_dir(one)["secrets/team-a/token.yaml"]) == backup["secrets"][("team-a", "token")]


@pytest.mark.e2e
def test_recover_selections_data_dir_stdout_and_bad_input(local_backup: dict[str, Any], tmp_path: Path) -> None:
    backup = local_backup
    plane, config, snapshot = backup["plane"], backup["kleidi"].config_path, str(backup["snapshot"])

    # A data directory (copied, never touched) and one namespace of it.
    data_dir = plane.etcd.dir
    before = sorted((p.relative_to(data_dir), p.stat().st_mtime_ns) for p in data_dir.rglob("*"))
    out = tmp_path / "team-a"
    result = recover(config, "--data-dir", str(data_dir), "--namespace", "team-a", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    files = load_dir(out)
    assert set(files) == {"secrets/team-a/token.yaml", "configmaps/team-a/settings.yaml",
                          "widgets.example.com/team-a/w1.yaml"}
    widget = files["widgets.example.com/team-a/w1.yaml"]  # stored as JSON, written back as YAML
    assert (widget["kind"], widget["spec"]) == ("Widget", WIDGET["spec"])
    assert "resourceVersion" not in widget["metadata"] and "uid" not in widget["metadata"]
    assert sorted((p.relative_to(data_dir), p.stat().st_mtime_ns) for p in data_dir.rglob("*")) == before

    # One object, to stdout only when asked with '-'.
    result = recover(config, "--snapshot", snapshot, "--resource", "secrets", "--namespace", "default", "--name", "db",
                     "--output-dir", "-")
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(docs) == 1 and decoded(docs[0]) == backup["secrets"][("default", "db")]

    def refused(args: list[str], code: int, message: str, cfg: Path = config) -> None:
        target = tmp_path / "out"
        result = recover(cfg, *args, *(["--output-dir", str(target)] if "--output-dir" not in args else []))
        assert result.returncode == code, (result.stdout, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not target.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]  # nothing partial left

    # A corrupt snapshot (one byte changed in the middle; etcd's checksum catches it).
    corrupt = tmp_path / "corrupt.snapshot"
    data = bytearray(backup["snapshot"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    refused(["--snapshot", str(corrupt)], 2, "is not a usable etcd snapshot")
    # A wrong KEK: another keyring of the same backend.
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    keygen(other / "keyring.json")
    other_config = tmp_path / "other.yaml"
    settings = yaml.safe_load(config.read_text())
    settings["backend"]["keyring"] = str(other / "keyring.json")
    other_config.write_text(yaml.safe_dump(settings))
    refused(["--snapshot", snapshot], 1, "was not produced by this kleidi", cfg=other_config)
    # A value that kleidi did not encrypt.
    plain = tmp_path / "plain.value"
    plain.write_bytes(backup["plaintext_value"])
    refused(["--value-file", str(plain), "--key", "/registry/namespaces/team-a"], 1,
            "is not KMS encrypted (it is plaintext)")
    # The key must be the value's own: AES-GCM binds it (authenticated data).
    moved = tmp_path / "moved.value"
    moved.write_bytes(backup["raw"])
    refused(["--value-file", str(moved), "--key", "/registry/secrets/team-a/other"], 1, "did not authenticate")
    # Output: an existing directory, a parent kleidi may not write to.
    existing = tmp_path / "existing"
    existing.mkdir()
    refused(["--snapshot", snapshot, "--output-dir", str(existing)], 2, "already exists")
    assert list(existing.iterdir()) == []
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    os.chmod(locked, 0o500)
    if os.geteuid() == 0:  # root ignores modes: a file where the parent directory should be
        shutil.rmtree(locked)
        locked.write_text("")
    refused(["--snapshot", snapshot, "--output-dir", str(locked / "out")], 2,
            "is not a directory" if os.geteuid() == 0 else "cannot create a directory")
    refused(["--snapshot", snapshot, "--data-dir", str(data_dir)], 2, "exactly one of")
    # A selection that matches nothing is not a successful recovery.
    refused(["--snapshot", snapshot, "--namespace", "no-such-namespace"], 1, "no KMS-encrypted object matched")


@pytest.mark.e2e
def test_reencrypt_to_another_kek_restores_into_a_new_cluster(local_backup: dict[str, Any],
                                                              apiserver_binary: str) -> None:
    """--reencrypt-to: the values, sealed for a new kleidi (another keyring), put into a new cluster's
    etcd with etcdctl as docs/disaster-recovery.md says, read back through that cluster's apiserver."""
    workdir = local_backup["plane"].workdir / "new-cluster"
    workdir.mkdir(mode=0o700)
    plane = ControlPlane(workdir, apiserver_binary)
    try:
        new_kleidi = plane.kleidi(name="new")
        out = workdir / "values"
        result = recover(local_backup["kleidi"].config_path, "--snapshot", str(local_backup["snapshot"]),
                         "--reencrypt-to", str(new_kleidi.config_path), "--output-dir", str(out), "-o", "json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert_private(out)
        old_key_id = {o["key_id"] for o in report["objects"]}
        new_key_id = {o["new_key_id"] for o in report["objects"]}
        assert len(new_key_id) == 1 and new_key_id.isdisjoint(old_key_id)
        written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
        for data in local_backup["secrets"].values():  # no plaintext on disk in this mode
            assert all(v not in written for v in data.values())
        for obj in report["objects"]:  # the documented restore: etcdctl put <key> < <file>
            with open(out / obj["file"], "rb") as value:
                subprocess.run([ETCDCTL, "--endpoints", plane.etcd.url, "put", obj["key"]], stdin=value,
                               capture_output=True, check=True, env={**os.environ, "ETCDCTL_API": "3"})
        api = plane.apiserver(config=plane.encryption_config(new_kleidi, resources="secrets,configmaps"))
        for (namespace, name), data in local_backup["secrets"].items():
            obj = json.loads(api.kubectl("get", "secret", name, "-n", namespace, "-o", "json").stdout)
            assert decoded(obj) == data
        cm = json.loads(api.kubectl("get", "configmap", "settings", "-n", "team-a", "-o", "json").stdout)
        assert cm["data"] == {"mode": "strict"}
    finally:
        plane.stop_all()


class KmsV1APIServer(KubeAPIServer):
    """kube-apiserver with KMS v1 allowed again (deprecated, off by default since 1.29)."""

    def flags(self) -> list[str]:
        return [*super().flags(), "--feature-gates=KMSv1=true"]


@pytest.mark.e2e
def test_recover_kms_v1_values(control_plane: ControlPlane, apiserver_binary: str) -> None:
    """kleidi serving v1beta1 to an apiserver configured with a KMS v1 provider: the stored
    k8s:enc:kms:v1: values are recovered from a snapshot and as one raw value."""
    plane = control_plane
    kleidi = KleidiProcess(plane.workdir, "legacy", settings={"server": {"enable_v1beta1": True}})
    keygen(kleidi.keyring)
    plane.kleidis.append(kleidi.start())
    config = plane.workdir / "v1-encryption-config.yaml"
    config.write_text(yaml.safe_dump({
        "apiVersion": "apiserver.config.k8s.io/v1", "kind": "EncryptionConfiguration",
        "resources": [{"resources": ["secrets"], "providers": [
            {"kms": {"apiVersion": "v1", "name": "legacy", "endpoint": kleidi.endpoint, "timeout": "3s"}},
            {"identity": {}}]}]}))
    api = KmsV1APIServer(plane.workdir, "apiserver-v1", plane.etcd, apiserver_binary, config)
    plane.apiservers.append(api.start())
    secrets = create_secrets(api, ["old-style"])
    raw = etcdctl(plane, "get", "--print-value-only", "/registry/secrets/default/old-style").stdout
    assert raw.startswith(b"k8s:enc:kms:v1:legacy:")
    snapshot = plane.workdir / "v1.snapshot"
    etcdctl(plane, "snapshot", "save", str(snapshot))
    plane.stop_all()

    out = plane.workdir / "v1-out"
    result = recover(kleidi.config_path, "--snapshot", str(snapshot), "--resource", "secrets", "--namespace",
                     "default", "--name", "old-style", "--output-dir", str(out), "-o", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["objects"][0]["key_id"] == rec.KMS_V1_KEY_ID
    assert decoded(load_dir(out)["secrets/default/old-style.yaml"]) == secrets["old-style"]
    value_file = plane.workdir / "v1.value"
    value_file.write_bytes(raw)
    result = recover(kleidi.config_path, "--value-file", str(value_file), "--key",
                     "/registry/secrets/default/old-style", "--output-dir", "-")
    assert result.returncode == 0, result.stderr
    assert decoded(yaml.safe_load(result.stdout)) == secrets["old-style"]


def test_upstream_vectors_through_kleidis_decrypt(tmp_path: Path) -> None:
    """The apiserver layer on the upstream vectors, with the seed (type 1) or DEK (type 0) wrapped and
    unwrapped by kleidi's real Decrypt on the local backend, as recover does it."""
    keyring = tmp_path / "keyring.json"
    keygen(keyring)
    settings = load_settings(None, {"backend.keyring": str(keyring)})

    async def run() -> None:
        decryptor = rec.Decryptor(settings)
        await decryptor.start()
        try:
            for data, dek, dek_type in ((TYPE1_DATA, TYPE1_SEED, storage.TYPE_HKDF_SEED),
                                        (TYPE0_DATA, TYPE0_KEY, storage.TYPE_AES_GCM_KEY)):
                sealed = await decryptor.service.encrypt(dek)
                value = storage.PREFIX + b"kleidi:" + storage.pb.EncryptedObject(
                    encryptedData=data, keyID=sealed.key_id, encryptedDEKSource=sealed.ciphertext,
                    annotations=dict(sealed.annotations), encryptedDEKSourceType=dek_type).SerializeToString()
                assert await decryptor.decrypt("bamboo", value) == (sealed.key_id, PLAINTEXT)
                with pytest.raises(DecryptionFailed):
                    await decryptor.decrypt("panda", value)
        finally:
            await decryptor.close()

    asyncio.run(run())


@pytest.mark.parametrize("key, ref", [
    ("/registry/secrets/default/db", ("secrets", "default", "db")),
    ("/registry/namespaces/team-a", ("namespaces", None, "team-a")),
    ("/registry/example.com/widgets/ns/w1", ("widgets.example.com", "ns", "w1")),
    ("/registry/apiextensions.k8s.io/customresourcedefinitions/widgets.example.com",
     ("customresourcedefinitions.apiextensions.k8s.io", None, "widgets.example.com")),
    ("/registry/secrets/../x", None),
    ("/other/secrets/default/db", None),
])
def test_etcd_keys_map_to_objects(key: str, ref: tuple[str, str | None, str] | None) -> None:
    parsed = rec.parse_key(key, "/registry")
    assert (None if parsed is None else (parsed.resource, parsed.namespace, parsed.name)) == ref


def test_other_protobuf_types_are_written_raw() -> None:
    """A built-in kleidi does not decode (here a ServiceAccount) keeps its exact decrypted bytes, base64."""
    from kleidi._proto.k8s import storage_pb2 as k8s

    plaintext = b"k8s\x00" + k8s.Unknown(typeMeta=k8s.TypeMeta(apiVersion="v1", kind="ServiceAccount"),
                                          raw=b"\x0a\x05\x0a\x03bot").SerializeToString()
    decoding, kind, obj, facts = rec.decode(plaintext)
    assert (decoding, kind, obj) == (rec.RAW, "ServiceAccount", None)
    ref = rec.ObjectRef("/registry/serviceaccounts/default/bot", "serviceaccounts", "default", "bot")
    suffix, text = rec.render(ref, "kid", decoding, obj, facts, plaintext)
    assert suffix == ".raw.b64"
    assert base64.b64decode(text.splitlines()[-1]) == plaintext
