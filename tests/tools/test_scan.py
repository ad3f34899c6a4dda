"""`kleidi scan` against a real etcd (and, marked e2e, a real kube-apiserver with kleidi).

Values of every storage class are written straight into etcd as the apiserver stores them; KMS v2
values are EncryptedObjects built by kleidi's storage code around what a real `kleidi serve` returned
from Encrypt, so their key_ids are real kleidi key_ids. The scan must count each class exactly.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from kleidi._crypto import kmsv2_storage as storage
from tests.conftest import KleidiProcess, run_kleidi
from tests.e2e.cluster import Etcd
from tests.support import free_port
from tests.tools import put_raw
from tests.vault.openbao import LocalCA


@pytest.fixture(scope="module")
def etcd() -> Iterator[Etcd]:
    workdir = Path(tempfile.mkdtemp(prefix="kl-scan-", dir="/tmp"))
    server = Etcd(workdir).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def scan(*args: str) -> subprocess.CompletedProcess[str]:
    return run_kleidi("scan", *args)


def scan_json(*args: str, expect: int = 0) -> dict[str, Any]:
    result = scan(*args, "--output", "json")
    assert result.returncode == expect, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def counts(report: dict[str, Any]) -> dict[tuple[Any, ...], int]:
    return {(r["resource"], r["group"], r["class"], r["provider"], r["key_id"], r["key_state"]): r["count"]
            for r in report["rows"]}


def kms_v2(kleidi: KleidiProcess, key: str, provider: str = "kleidi") -> bytes:
    """A KMS v2 value exactly as kube-apiserver writes it, around a real Encrypt of kleidi."""
    seed = os.urandom(32)
    response = kleidi.encrypt(seed)
    return storage.encrypt_object(seed, b"k8s\x00" + os.urandom(40), key, provider=provider, key_id=response.key_id,
                                  encrypted_dek_source=response.ciphertext, annotations=dict(response.annotations))


def test_counts_every_class_and_key_state_exactly_on_any_page_size(etcd: Etcd, kleidi_factory: Any) -> None:
    kleidi: KleidiProcess = kleidi_factory()
    v1 = kleidi.status().key_id
    p = "/t-classes"
    values: list[tuple[str, bytes]] = [
        (f"{p}/secrets/default/proto-{i}", b"k8s\x00\n\x0c\n\x02v1\x12\x06Secret" + os.urandom(20)) for i in range(2)]
    values += [(f"{p}/configmaps/default/json", b'{"kind":"ConfigMap","apiVersion":"v1"}'),
               (f"{p}/secrets/ns/cbc", b"k8s:enc:aescbc:v1:key1:" + os.urandom(48)),
               (f"{p}/secrets/ns/gcm", b"k8s:enc:aesgcm:v1:key2:" + os.urandom(60)),
               (f"{p}/secrets/ns/box", b"k8s:enc:secretbox:v1:key3:" + os.urandom(64)),
               (f"{p}/secrets/ns/kmsv1", b"k8s:enc:kms:v1:oldkms:" + (64).to_bytes(2, "big") + os.urandom(100)),
               (f"{p}/secrets/ns/broken", b"k8s:enc:kms:v2:kleidi:" + b"\xff\x00not an EncryptedObject"),
               (f"{p}/secrets/ns/other-plugin", storage.encrypt_object(
                   os.urandom(32), b"k8s\x00x", f"{p}/secrets/ns/other-plugin", provider="vault", key_id="vault-key-7",
                   encrypted_dek_source=os.urandom(40)))]
    values += [(f"{p}/secrets/ns/a-v1-{i}", kms_v2(kleidi, f"{p}/secrets/ns/a-v1-{i}")) for i in range(2)]
    assert run_kleidi("rotate", "--keyring", str(kleidi.keyring)).returncode == 0
    v2 = kleidi.wait_for_key_id(lambda k: k != v1)
    values.append((f"{p}/secrets/ns/b-v2", kms_v2(kleidi, f"{p}/secrets/ns/b-v2")))
    assert run_kleidi("rotate", "--keyring", str(kleidi.keyring)).returncode == 0
    v3 = kleidi.wait_for_key_id(lambda k: k not in (v1, v2))
    values += [(f"{p}/secrets/ns/c-v3-{i}", kms_v2(kleidi, f"{p}/secrets/ns/c-v3-{i}")) for i in range(3)]
    values.append((f"{p}/example.com/widgets/ns/w", kms_v2(kleidi, f"{p}/example.com/widgets/ns/w")))
    retired = run_kleidi("retire", "--keyring", str(kleidi.keyring), "v1", "--yes")
    assert retired.returncode == 0, retired.stderr
    assert put_raw(etcd.url, values) == len(values) == 16

    expected = {
        ("configmaps", "", "plaintext", None, None, None): 1,
        ("secrets", "", "plaintext", None, None, None): 2,
        ("secrets", "", "aescbc", "key1", None, None): 1,
        ("secrets", "", "aesgcm", "key2", None, None): 1,
        ("secrets", "", "secretbox", "key3", None, None): 1,
        ("secrets", "", "kms-v1", "oldkms", None, None): 1,
        ("secrets", "", "kms-v2", "kleidi", v1, "retired"): 2,
        ("secrets", "", "kms-v2", "kleidi", v2, "old"): 1,
        ("secrets", "", "kms-v2", "kleidi", v3, "current"): 3,
        ("secrets", "", "kms-v2", "vault", "vault-key-7", "unknown"): 1,
        ("secrets", "", "unknown", "kleidi", None, None): 1,
        ("widgets", "example.com", "kms-v2", "kleidi", v3, "current"): 1,
    }
    reports = {size: scan_json("--etcd-endpoints", etcd.url, "--prefix", p, "--page-size", str(size),
                               "--config", str(kleidi.config_path)) for size in (1, 3, 500)}
    for size, report in reports.items():
        assert counts(report) == expected, size
        assert report["objects"] == 16
        assert report["totals"] == {"plaintext": 3, "aescbc": 1, "aesgcm": 1, "secretbox": 1, "kms-v1": 1,
                                    "kms-v2": 8, "unknown": 1}
    versions = {r["key_id"]: r["kleidi_version"] for r in reports[3]["rows"] if r["key_id"]}
    assert versions == {v1: 1, v2: 2, v3: 3, "vault-key-7": None}
    assert reports[3]["reference"]["current_key_id"] == v3
    assert reports[3]["reference"]["retired_key_ids"] == [v1]

    # Status alone knows only the current key_id; the others are reported unchecked, not guessed.
    by_status = counts(scan_json("--etcd-endpoints", etcd.url, "--prefix", p, "--endpoint", kleidi.endpoint))
    assert by_status[("secrets", "", "kms-v2", "kleidi", v3, "current")] == 3
    assert by_status[("secrets", "", "kms-v2", "kleidi", v1, "unchecked")] == 2

    # --resources selects by plural name, and name.group for a group in the path.
    only = scan_json("--etcd-endpoints", etcd.url, "--prefix", p, "--resources", "widgets.example.com,configmaps")
    assert {(r["resource"], r["class"]): r["count"] for r in only["rows"]} == {
        ("configmaps", "plaintext"): 1, ("widgets", "kms-v2"): 1}

    # The table for people names the same key_ids and versions; no value or object name is printed.
    text = scan("--etcd-endpoints", etcd.url, "--prefix", p, "--config", str(kleidi.config_path))
    assert text.returncode == 0, text.stderr
    assert v3 in text.stdout and "retired" in text.stdout and "16 objects" in text.stdout
    assert "a-v1-0" not in text.stdout + text.stderr and "default" not in text.stdout


def test_fail_if_exit_codes(etcd: Etcd) -> None:
    p = "/t-fail-if"
    key_id = "kleidi:local:v4:" + "A" * 32
    put_raw(etcd.url, [(f"{p}/secrets/ns/plain", b'{"kind":"Secret"}'),
                       (f"{p}/secrets/ns/enc", storage.encrypt_object(
                           os.urandom(32), b"k8s\x00x", f"{p}/secrets/ns/enc", provider="kleidi", key_id=key_id,
                           encrypted_dek_source=os.urandom(40)))])
    base = ("--etcd-endpoints", etcd.url, "--prefix", p)
    met = scan_json(*base, "--fail-if", "plaintext", expect=1)
    assert met["fail_if"] == [{"condition": "plaintext", "objects": 1, "met": True}] and met["failed"]
    assert scan(*base, "--fail-if", f"key-id={key_id}").returncode == 1
    assert scan(*base, "--fail-if", "key-id=kleidi:local:v5:other").returncode == 0
    not_met = scan_json(*base, "--resources", "configmaps", "--fail-if", "plaintext")
    assert not_met["fail_if"][0]["met"] is False and not_met["objects"] == 0
    assert scan_json(*base)["rows"][1]["kleidi_version"] == 4
    bad = scan(*base, "--fail-if", "cleartext")
    assert bad.returncode == 2 and "--fail-if 'cleartext' is not a condition" in bad.stderr and "fix:" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_next_endpoint_when_one_is_down_and_compaction_during_a_scan(etcd: Etcd) -> None:
    p = "/t-endpoints"
    put_raw(etcd.url, [(f"{p}/secrets/ns/s{i}", b'{"kind":"Secret"}') for i in range(5)])
    dead = f"http://127.0.0.1:{free_port()}"
    report = scan_json("--etcd-endpoints", f"{dead},{etcd.url}", "--prefix", p)
    assert report["objects"] == 5 and report["endpoint"] == etcd.url

    from etcd3gw.client import Etcd3Client

    from kleidi.etcd import EtcdOptions, EtcdReader, EtcdUnavailable

    reader = EtcdReader(EtcdOptions((etcd.url,)))
    revision, count = reader.snapshot(f"{p}/".encode())
    assert count == 5
    put_raw(etcd.url, [(f"{p}/secrets/ns/s9", b"{}")])  # written after the snapshot: not in it
    assert sum(len(page) for page in reader.pages(f"{p}/".encode(), revision, 2)) == 5
    client = Etcd3Client(host="127.0.0.1", port=etcd.port, api_path="/v3/")
    client.post(client.get_url("/kv/compaction"), json={"revision": revision + 1})
    with pytest.raises(EtcdUnavailable, match=f"etcd compacted revision {revision} during the scan"):
        list(reader.pages(f"{p}/".encode(), revision, 2))


def test_etcd_down_is_a_clear_error() -> None:
    result = scan("--etcd-endpoints", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "no etcd endpoint answered" in result.stderr and "Connection refused" in result.stderr
    assert "fix: check --etcd-endpoints" in result.stderr and "Traceback" not in result.stderr
    bad = scan("--etcd-endpoints", "ftp://127.0.0.1:1")
    assert bad.returncode == 2 and "is not http(s)://host:port" in bad.stderr


class _TlsEtcd(Etcd):
    """The e2e suite's Etcd, serving https with client-certificate auth: etcd takes the TLS settings from
    its ETCD_* environment, the harness's start and health check stay as they are."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.url = f"https://127.0.0.1:{self.port}"


def test_tls_with_client_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = LocalCA(tmp_path / "pki")
    # etcd's JSON gateway dials etcd's own gRPC port with the serving certificate, so (as kubeadm's etcd
    # certificates do) it must allow client auth as well.
    server_cert, server_key = ca._issue("server", "127.0.0.1", ips=("127.0.0.1",), key_type=None,
                                        usage=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                                        valid_for=datetime.timedelta(hours=1))
    client_cert, client_key = ca.issue_client(common_name="kube-apiserver-etcd-client")
    for name, value in (("ETCD_CERT_FILE", server_cert), ("ETCD_KEY_FILE", server_key),
                        ("ETCD_TRUSTED_CA_FILE", ca.ca_path), ("ETCD_CLIENT_CERT_AUTH", "true")):
        monkeypatch.setenv(name, str(value))
    context = ssl.create_default_context(cafile=str(ca.ca_path))
    context.load_cert_chain(client_cert, client_key)
    monkeypatch.setattr(ssl, "_create_default_https_context", lambda: context)  # the harness's health check
    server = _TlsEtcd(tmp_path).start()
    try:
        monkeypatch.undo()
        p = "/t-tls"
        assert not os.environ.get("ETCD_CERT_FILE")
        tls = ("--etcd-endpoints", server.url, "--prefix", p, "--etcd-ca", str(ca.ca_path))
        client = ("--etcd-cert", str(client_cert), "--etcd-key", str(client_key))
        empty = scan_json(*tls, *client)
        assert empty["objects"] == 0 and empty["revision"] >= 1

        without = scan(*tls)
        assert without.returncode == 2 and "Traceback" not in without.stderr
        assert "no etcd endpoint answered" in without.stderr and "--etcd-cert" in without.stderr
        wrong_ca = scan("--etcd-endpoints", server.url, *client)
        assert wrong_ca.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in wrong_ca.stderr
        half = scan(*tls, "--etcd-cert", str(client_cert))
        assert half.returncode == 2 and "--etcd-cert and --etcd-key go together" in half.stderr
    finally:
        server.stop()


@pytest.mark.e2e
def test_apiserver_secrets_before_and_after_kleidi(control_plane: Any) -> None:
    """Secrets written by an apiserver without encryption are plaintext; by one with kleidi, KMS v2 on
    kleidi's key_id: both apiservers share the one etcd, as in an upgrade to encryption."""
    from tests.e2e.test_kube_apiserver import create_secrets

    kleidi = control_plane.kleidi()
    plain_api = control_plane.apiserver("plain", config=None, wait=False)
    kms_api = control_plane.apiserver("kms", config=control_plane.encryption_config(kleidi), wait=False)
    plain_api.wait_ready()
    kms_api.wait_ready()
    create_secrets(plain_api, [f"before-{i}" for i in range(3)], namespace="default")
    kms_api.kubectl("create", "namespace", "after")
    create_secrets(kms_api, [f"after-{i}" for i in range(4)], namespace="after")
    key_id = kleidi.status().key_id
    url = control_plane.etcd.url

    report = scan_json("--etcd-endpoints", url, "--resources", "secrets", "--endpoint", kleidi.endpoint)
    secrets = {(r["class"], r["provider"], r["key_id"], r["key_state"]): r["count"] for r in report["rows"]}
    assert secrets == {("plaintext", None, None, None): 3, ("kms-v2", "kleidi", key_id, "current"): 4}
    assert {r["encoding"] for r in report["rows"] if r["class"] == "plaintext"} == {"protobuf"}
    assert report["rows"][-1]["kleidi_version"] == 1
    gate = scan("--etcd-endpoints", url, "--resources", "secrets", "--fail-if", "plaintext")
    assert gate.returncode == 1, gate.stderr
    # Everything else the apiserver stored (namespaces, leases, ...) is plaintext protobuf.
    whole = scan_json("--etcd-endpoints", url)
    assert whole["totals"]["kms-v2"] == 4 and whole["totals"]["plaintext"] > 3
