"""kleidi as the KMS v2 provider of a real kube-apiserver on a real etcd (scenarios of issue #3).

The apiserver is built from k8s.io/kubernetes (scripts/build-kube-apiserver.sh) and configured with
the EncryptionConfiguration that `kleidi encryption-config` prints and the flags the quickstart
documents. Assertions read the raw values in etcd, so they see exactly what a backup would hold.
"""

from __future__ import annotations

import base64
import json
import os
import secrets as pysecrets
import signal
from collections.abc import Callable
from typing import Any

import pytest

from kleidi._crypto import kmsv2_storage as storage
from tests.conftest import wait_for as shared_wait_for
from tests.e2e.cluster import TOKEN, KubeAPIServer
from tests.e2e.conftest import PROVIDER, ControlPlane

PREFIX = f"k8s:enc:kms:v2:{PROVIDER}:".encode()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    return shared_wait_for(predicate, timeout, what, interval)


def create_secrets(api: KubeAPIServer, names: list[str], namespace: str = "default",
                   check: bool = True) -> dict[str, dict[str, bytes]]:
    """Create Secrets with random data in one kubectl call; returns name -> data."""
    data = {name: {"password": pysecrets.token_hex(16).encode(), "token": os.urandom(24)} for name in names}
    items = [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
              "data": {k: base64.b64encode(v).decode() for k, v in values.items()}}
             for name, values in data.items()]
    result = api.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
                         check=check)
    if not check and result.returncode != 0:
        raise RuntimeError(result.stderr)
    return data


def read_secret(api: KubeAPIServer, name: str, namespace: str = "default") -> dict[str, bytes]:
    obj = json.loads(api.kubectl("get", "secret", name, "-n", namespace, "-o", "json").stdout)
    return {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}


def assert_reads_back(api: KubeAPIServer, expected: dict[str, dict[str, bytes]], namespace: str = "default") -> None:
    for name, data in expected.items():
        assert read_secret(api, name, namespace) == data, name


def stored(plane: ControlPlane, name: str, namespace: str = "default", resource: str = "secrets") -> bytes:
    return plane.etcd.get(f"/registry/{resource}/{namespace}/{name}")


def key_id_of(value: bytes) -> str:
    return storage.parse_etcd_value(value).key_id


def assert_encrypted(value: bytes, data: dict[str, bytes], key_id: str) -> None:
    assert value.startswith(PREFIX), value[:40]
    for secret_value in data.values():
        assert secret_value not in value
        assert base64.b64encode(secret_value) not in value
    assert key_id_of(value) == key_id


def provoke_status_poll(api: KubeAPIServer) -> None:
    """/readyz/kms-providers runs the apiserver's KMS probe (Status, and Encrypt on a new key_id)
    whenever its cached result is older than 20 s: faster than waiting for the 1-minute poll."""
    api.get("/readyz/kms-providers")


# ------------------------------------------------------------------------------------------------ 1


def test_secrets_are_encrypted_in_etcd_and_read_back_unchanged(any_backend_cluster: Any) -> None:
    plane, kleidi, api, _ = any_backend_cluster
    expected = create_secrets(api, [f"s{i}" for i in range(20)])
    key_id = kleidi.status().key_id
    for name, data in expected.items():
        assert_encrypted(stored(plane, name), data, key_id)
    assert_reads_back(api, expected)
    status, body = api.get("/readyz/kms-providers")
    assert (status, body) == (200, "ok")
    assert "Encrypt ok" in kleidi.log()  # the apiserver asked kleidi for its seed


# ------------------------------------------------------------------------------------------------ 2


@pytest.mark.parametrize("how", ["graceful", "kill -9"])
def test_kleidi_restart_keeps_the_apiserver_serving(cluster: Any, how: str) -> None:
    plane, kleidi, api = cluster
    before = create_secrets(api, ["before-a", "before-b"])
    kleidi.stop(signal.SIGTERM if how == "graceful" else signal.SIGKILL)
    if how == "kill -9":
        assert kleidi.socket_path.exists(), "kill -9 leaves the socket behind"
    # kleidi is down: reads are served from the apiserver's decrypted-seed cache, and writes keep
    # working inside the 3-minute window after the last good Status.
    assert_reads_back(api, before)
    during = create_secrets(api, ["during"])
    kleidi.start()  # removes a stale socket left by kill -9
    after = create_secrets(api, ["after"])
    key_id = kleidi.status().key_id
    for name, data in {**before, **during, **after}.items():
        assert_encrypted(stored(plane, name), data, key_id)
    assert_reads_back(api, {**before, **during, **after})
    wait_for(lambda: api.get("/readyz/kms-providers")[0] == 200, 180, "kms-providers ready", interval=2)


# ------------------------------------------------------------------------------------------------ 3


def test_rotation_reencryption_and_retirement(any_backend_cluster: Any) -> None:
    plane, kleidi, api, kek = any_backend_cluster
    old_key_id = kleidi.status().key_id
    old_secrets = create_secrets(api, [f"old{i}" for i in range(10)])
    assert all(key_id_of(stored(plane, name)) == old_key_id for name in old_secrets)

    kek.rotate()
    new_key_id = kleidi.wait_for_key_id(lambda k: k != old_key_id)

    def new_writes_use_new_key() -> bool:
        provoke_status_poll(api)
        probe = create_secrets(api, [f"probe-{pysecrets.token_hex(4)}"])
        return key_id_of(stored(plane, next(iter(probe)))) == new_key_id

    # The apiserver polls Status every minute; its health endpoint probes at most every 20 s.
    wait_for(new_writes_use_new_key, 90, "new writes to carry the new key_id", interval=2)
    assert_reads_back(api, old_secrets)
    assert all(key_id_of(stored(plane, name)) == old_key_id for name in old_secrets)

    # Re-encrypt everything, as the docs say: a no-op update rewrites each object with the new seed.
    listing = api.kubectl("get", "secrets", "-A", "-o", "json").stdout
    api.kubectl("replace", "-f", "-", input=listing)
    values = plane.etcd.items("/registry/secrets/")
    assert values and all(key_id_of(v) == new_key_id for v in values.values()), \
        "some Secrets are still on the old key"

    kek.retire(old_key_id)
    # Restart the apiserver so that nothing is served from its seed cache: every Secret must now
    # decrypt through kleidi with the remaining key alone.
    api.stop()
    api.start()
    assert_reads_back(api, old_secrets)
    assert "FAILED_PRECONDITION" not in kleidi.log(), "the apiserver still needed the retired version"


# ------------------------------------------------------------------------------------------------ 4


def test_kleidi_down_when_the_apiserver_starts(control_plane: ControlPlane) -> None:
    plane = control_plane
    kleidi = plane.kleidi()
    config = plane.encryption_config(kleidi)
    api = plane.apiserver(config=config)
    expected = create_secrets(api, ["kept-1", "kept-2"])
    api.stop()
    kleidi.stop()

    api = plane.apiserver("apiserver-restarted", config=config, wait=False)
    api.wait_started()
    status, body = api.get("/readyz/kms-providers")
    assert status != 200, body
    failed = api.kubectl("create", "secret", "generic", "refused", "--from-literal=a=b", check=False)
    assert failed.returncode != 0
    assert api.kubectl("get", "secret", "kept-1", check=False).returncode != 0  # no seed state yet: reads fail

    kleidi.start()
    wait_for(lambda: api.get("/readyz/kms-providers")[0] == 200, 180, "kms-providers to recover", interval=2)
    assert_reads_back(api, expected)  # nothing was lost
    later = create_secrets(api, ["written-after-recovery"])
    assert_encrypted(stored(plane, "written-after-recovery"), later["written-after-recovery"],
                     kleidi.status().key_id)
    with pytest.raises(KeyError):
        stored(plane, "refused")


@pytest.mark.timeout(900)
def test_kleidi_down_longer_than_the_write_window(cluster: Any) -> None:
    """The apiserver writes with its cached seed for 3 minutes after the last good Status, then refuses."""
    plane, kleidi, api = cluster
    expected = create_secrets(api, ["early"])
    kleidi.stop()
    expected.update(create_secrets(api, ["inside-window"]))

    refused: list[str] = []

    def writes_refused() -> bool:
        name = f"late-{pysecrets.token_hex(4)}"
        try:
            expected.update(create_secrets(api, [name], check=False))  # still inside the window
        except RuntimeError as exc:
            refused.append(name)
            return "expired" in str(exc)
        return False

    wait_for(writes_refused, 300, "writes to be refused after the 3-minute window", interval=10)
    assert api.get("/readyz/kms-providers")[0] != 200
    assert_reads_back(api, expected)  # cached seeds keep reads working

    kleidi.start()
    # The apiserver's gRPC channel backs off between reconnects (up to 2 minutes after a long
    # outage), then its 10-second unhealthy poll and 20-second health cache apply.
    wait_for(lambda: api.get("/readyz/kms-providers")[0] == 200, 240, "kms-providers to recover", interval=2)
    expected.update(create_secrets(api, ["after-recovery"]))
    assert_reads_back(api, expected)
    for name in expected:
        assert stored(plane, name).startswith(PREFIX)
    assert refused
    for name in refused:
        with pytest.raises(KeyError):
            stored(plane, name)  # a refused write never reached etcd


# ------------------------------------------------------------------------------------------------ 5


def test_migration_from_identity_to_kleidi(control_plane: ControlPlane) -> None:
    plane = control_plane
    identity_only = plane.workdir / "identity.yaml"
    identity_only.write_text(json.dumps({
        "apiVersion": "apiserver.config.k8s.io/v1", "kind": "EncryptionConfiguration",
        "resources": [{"resources": ["secrets"], "providers": [{"identity": {}}]}]}))
    api = plane.apiserver("plain", config=identity_only)
    expected = create_secrets(api, [f"legacy{i}" for i in range(5)], namespace="default")
    api.kubectl("create", "namespace", "team-a")
    expected_a = create_secrets(api, ["legacy-a"], namespace="team-a")
    raw = stored(plane, "legacy0")
    assert raw.startswith(b"k8s\x00") and expected["legacy0"]["password"] in raw  # plaintext at rest
    api.stop()

    kleidi = plane.kleidi()
    api = plane.apiserver("encrypting", config=plane.encryption_config(kleidi))  # kms first, identity second
    assert_reads_back(api, expected)  # old objects read through the identity fallback
    listing = api.kubectl("get", "secrets", "-A", "-o", "json").stdout
    api.kubectl("replace", "-f", "-", input=listing)
    key_id = kleidi.status().key_id
    values = plane.etcd.items("/registry/secrets/")
    assert len(values) == 6
    for key, value in values.items():
        assert value.startswith(PREFIX), key
        assert key_id_of(value) == key_id
    assert_reads_back(api, expected)
    assert_reads_back(api, expected_a, namespace="team-a")


# ------------------------------------------------------------------------------------------------ 6


def test_two_apiservers_with_their_own_kleidi_on_one_keyring(control_plane: ControlPlane) -> None:
    plane = control_plane
    first = plane.kleidi("kleidi-a")
    node_b = plane.workdir / "node-b"
    node_b.mkdir(mode=0o700)
    keyring_b = node_b / "keyring.json"
    keyring_b.write_bytes(first.keyring.read_bytes())  # the keyring copied to the second node
    keyring_b.chmod(0o600)
    second = plane.kleidi("kleidi-b", keyring=keyring_b)
    assert first.status().key_id == second.status().key_id

    api_a = plane.apiserver("apiserver-a", config=plane.encryption_config(first))
    api_b = plane.apiserver("apiserver-b", config=plane.encryption_config(second))
    from_a = create_secrets(api_a, ["from-a"])
    from_b = create_secrets(api_b, ["from-b"])
    assert_reads_back(api_b, from_a)
    assert_reads_back(api_a, from_b)
    assert "Decrypt ok" in second.log() and "Decrypt ok" in first.log()  # each unwrapped the other's seed


# ------------------------------------------------------------------------------------------------ 7

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {"group": "example.com", "scope": "Namespaced",
             "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
             "versions": [{"name": "v1", "served": True, "storage": True,
                           "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                               "spec": {"type": "object", "properties": {"secret": {"type": "string"}}}}}}}]},
}


def test_configmaps_and_custom_resources_are_encrypted_when_listed(control_plane: ControlPlane) -> None:
    plane = control_plane
    kleidi = plane.kleidi()
    api = plane.apiserver(config=plane.encryption_config(kleidi, "secrets,configmaps,widgets.example.com"))
    marker = pysecrets.token_hex(16)
    api.kubectl("create", "configmap", "cm1", f"--from-literal=value={marker}")
    api.kubectl("apply", "-f", "-", input=json.dumps(CRD))
    api.kubectl("wait", "--for=condition=Established", "crd/widgets.example.com", "--timeout=60s")
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w1", "namespace": "default"},
              "spec": {"secret": marker}}
    wait_for(lambda: api.kubectl("apply", "-f", "-", input=json.dumps(widget), check=False).returncode == 0,
             60, "the Widget kind to be served")
    key_id = kleidi.status().key_id
    for value in (stored(plane, "cm1", resource="configmaps"),
                  plane.etcd.get("/registry/example.com/widgets/default/w1")):
        assert value.startswith(PREFIX)
        assert marker.encode() not in value
        assert key_id_of(value) == key_id
    assert json.loads(api.kubectl("get", "configmap", "cm1", "-o", "json").stdout)["data"]["value"] == marker
    assert json.loads(api.kubectl("get", "widget", "w1", "-o", "json").stdout)["spec"]["secret"] == marker
    crd_value = plane.etcd.get("/registry/apiextensions.k8s.io/customresourcedefinitions/widgets.example.com")
    assert not crd_value.startswith(b"k8s:enc:")  # resources not listed stay as they were


# ------------------------------------------------------------------------------------------------ 8


def _fields(buf: bytes) -> list[tuple[int, bytes | int]]:
    """Protobuf wire format, schema-less: (field number, raw bytes or varint) in order."""
    out: list[tuple[int, bytes | int]] = []
    i = 0

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            byte = buf[i]
            i += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, varint()))
        elif wire == 2:
            length = varint()
            out.append((number, buf[i:i + length]))
            i += length
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return out


def _without_resource_version(object_bytes: bytes) -> list[Any]:
    """A Secret in the apiserver's protobuf encoding (k8s\\0 + runtime.Unknown), minus
    metadata.resourceVersion (field 6), which etcd supplies on read and is not stored."""
    assert object_bytes.startswith(b"k8s\x00")
    unknown = _fields(object_bytes[4:])
    raw = next(v for n, v in unknown if n == 2)
    assert isinstance(raw, bytes)
    secret = []
    for number, value in _fields(raw):
        if number == 1 and isinstance(value, bytes):
            value = repr([f for f in _fields(value) if f[0] != 6])  # type: ignore[assignment]
        secret.append((number, value))
    return [[f for f in unknown if f[0] != 2], secret]


def test_offline_decryption_of_an_etcd_value(cluster: Any) -> None:
    """kms-protocol.md §4.4: the raw etcd value, kleidi's Decrypt of its seed, then the apiserver's
    HKDF + AES-GCM layer in Python give the very object the API serves."""
    plane, kleidi, api = cluster
    create_secrets(api, ["offline"])
    key = "/registry/secrets/default/offline"
    obj = storage.parse_etcd_value(plane.etcd.get(key))
    assert obj.provider == PROVIDER and obj.dek_source_type == storage.TYPE_HKDF_SEED
    seed = kleidi.decrypt(obj.encrypted_dek_source, obj.key_id, obj.annotations)
    assert len(seed) == 32
    plaintext = storage.decrypt_object(obj, seed, key)
    status, _ = api.get("/api/v1/namespaces/default/secrets/offline")
    assert status == 200
    served = _protobuf_get(api, "/api/v1/namespaces/default/secrets/offline")
    assert _without_resource_version(plaintext) == _without_resource_version(served)


def _protobuf_get(api: KubeAPIServer, path: str) -> bytes:
    import urllib.request

    request = urllib.request.Request(api.url + path, headers={"Authorization": f"Bearer {TOKEN}",
                                                               "Accept": "application/vnd.kubernetes.protobuf"})
    with urllib.request.urlopen(request, timeout=10, context=api._ssl()) as response:
        body: bytes = response.read()
    return body

