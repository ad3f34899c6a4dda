"""The Vault/OpenBao Transit backend against a real OpenBao server (tests/vault/openbao.py).

Every kleidi here logs in with credentials limited to the policy `kleidi policy vault` prints.
The Kubernetes auth test uses a real kube-apiserver (from the e2e harness) as the TokenReview
endpoint. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from kleidi._proto.kmsv2 import api_pb2 as pb
from tests.conftest import run_kleidi, wait_for
from tests.e2e.cluster import TOKEN, Etcd, KubeAPIServer, kube_apiserver_binary

from . import kleidi_vault
from .openbao import LocalCA, OpenBao, unique, write_private


def start_kleidi(factory: Any, config: dict[str, Any], name: str = "kleidi", **kwargs: Any) -> Any:
    return factory(name, create_keyring=False, backend=config, **kwargs)


def round_trip(proc: Any) -> str:
    seed = os.urandom(32)
    response = proc.encrypt(seed)
    assert response.ciphertext.startswith(b"k\x01") and b"vault:v" in response.ciphertext
    assert proc.decrypt(response.ciphertext, response.key_id, response.annotations) == seed
    key_id: str = response.key_id
    return key_id


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    wait_for(predicate, timeout, what, interval=0.1)


def healthz(proc: Any) -> str:
    try:
        return str(proc.status().healthz)
    except grpc.RpcError as exc:
        return f"rpc error {exc.code().name}"


# ------------------------------------------------------------------------------------------- auth methods


def test_token_auth_and_key_id_shape(openbao: OpenBao, transit_key: str, kleidi_factory: Any, short_dir: Path) -> None:
    proc = start_kleidi(kleidi_factory, kleidi_vault.backend(
        openbao, transit_key, kleidi_vault.token_auth(openbao, transit_key, short_dir)))
    key_id = round_trip(proc)
    assert key_id.startswith("kleidi:vault:v1:")
    assert proc.status().key_id == key_id


def test_token_file_is_reread_when_it_changes(openbao: OpenBao, transit_key: str, kleidi_factory: Any,
                                             short_dir: Path) -> None:
    auth = kleidi_vault.token_auth(openbao, transit_key, short_dir)
    proc = start_kleidi(kleidi_factory, kleidi_vault.backend(openbao, transit_key, auth))
    round_trip(proc)
    old = Path(auth["token_file"]).read_text()
    new = openbao.create_token([kleidi_vault.kleidi_policy(openbao, transit_key)])
    write_private(Path(auth["token_file"]), new)
    openbao.revoke_token(old)
    for _ in range(5):
        round_trip(proc)  # no call fails: the new token is read before or after the first refusal


def test_approle_from_files_and_environment(openbao: OpenBao, transit_key: str, kleidi_factory: Any,
                                            short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    role = unique("kleidi")
    role_id, secret_id = openbao.approle(role, [kleidi_vault.kleidi_policy(openbao, transit_key)], token_ttl="1h")
    from_files = {"method": "approle", "role_id_file": str(write_private(short_dir / "role_id", role_id)),
                  "secret_id_file": str(write_private(short_dir / "secret_id", secret_id))}
    first = start_kleidi(kleidi_factory, kleidi_vault.backend(openbao, transit_key, from_files), "files")
    monkeypatch.setenv("TEST_ROLE_ID", role_id)
    monkeypatch.setenv("TEST_SECRET_ID", openbao.approle_secret_id(role))
    from_env = {"method": "approle", "role_id_env": "TEST_ROLE_ID", "secret_id_env": "TEST_SECRET_ID"}
    second = start_kleidi(kleidi_factory, kleidi_vault.backend(openbao, transit_key, from_env), "env")
    assert round_trip(first) == round_trip(second)
    for proc in (first, second):
        assert "logged in to Vault (AppRoleAuth)" in proc.log()
        assert secret_id not in proc.log() and role_id not in proc.log()


def test_jwt_auth_with_a_locally_signed_token(openbao: OpenBao, transit_key: str, kleidi_factory: Any,
                                              short_dir: Path) -> None:
    mount = unique("jwt")
    issuer = openbao.jwt_auth("kleidi", [kleidi_vault.kleidi_policy(openbao, transit_key)], mount=mount)
    jwt_file = write_private(short_dir / "jwt", issuer.sign(ttl=600))
    auth = {"method": "jwt", "mount": mount, "role": "kleidi", "token_file": str(jwt_file)}
    proc = start_kleidi(kleidi_factory, kleidi_vault.backend(openbao, transit_key, auth))
    round_trip(proc)
    assert "logged in to Vault (JWTAuth)" in proc.log()
    assert jwt_file.read_text() not in proc.log()


def test_kubernetes_auth_against_a_real_kube_apiserver(openbao: OpenBao, transit_key: str, kleidi_factory: Any,
                                                       short_dir: Path) -> None:
    """Vault checks kleidi's service-account token with the real apiserver's TokenReview API."""
    etcd = Etcd(short_dir).start()
    api = KubeAPIServer(short_dir, "apiserver", etcd, kube_apiserver_binary(), None)
    try:
        api.start()
        api.kubectl("create", "serviceaccount", "kleidi", "-n", "kube-system")
        sa_token = api.kubectl("create", "token", "kleidi", "-n", "kube-system", "--duration=1h").stdout.strip()
        mount = unique("kubernetes")
        with openbao.connect() as client:
            client.sys.enable_auth_method("kubernetes", path=mount)
            client.write(f"auth/{mount}/config", kubernetes_host=api.url, token_reviewer_jwt=TOKEN,
                         kubernetes_ca_cert=(api.dir / "certs" / "apiserver.crt").read_text(),
                         disable_local_ca_jwt=True)
            client.write(f"auth/{mount}/role/kleidi", bound_service_account_names="kleidi",
                         bound_service_account_namespaces="kube-system",
                         token_policies=kleidi_vault.kleidi_policy(openbao, transit_key), token_ttl="1h")
        token_file = write_private(short_dir / "sa-token", sa_token)
        auth = {"method": "kubernetes", "mount": mount, "role": "kleidi", "token_file": str(token_file)}
        proc = start_kleidi(kleidi_factory, kleidi_vault.backend(openbao, transit_key, auth))
        round_trip(proc)
        assert "logged in to Vault (JWTAuth)" in proc.log()
        assert sa_token not in proc.log()
    finally:
        api.stop()
        etcd.stop()


@pytest.mark.parametrize("pem", ["separate", "combined"])
def test_tls_certificate_auth(openbao: OpenBao, transit_key: str, kleidi_factory: Any, client_ca: LocalCA,
                              pem: str) -> None:
    """Cert auth over OpenBao's TLS listener, with a client certificate from a test CA (like the
    kubelet's client cert, which is one combined PEM)."""
    mount = unique("cert")
    openbao.cert_auth(client_ca.cert_pem, [kleidi_vault.kleidi_policy(openbao, transit_key)], mount=mount)
    cert, key = client_ca.issue_client(unique("client"))
    tls: dict[str, Any] = {"ca_file": str(openbao.ca_path)}
    if pem == "separate":
        tls.update(client_cert_file=str(cert), client_key_file=str(key))
    else:
        tls.update(client_cert_file=str(client_ca.combined_pem(cert, key)))
    config = kleidi_vault.backend(openbao, transit_key, {"method": "cert", "mount": mount, "role": "kleidi"},
                                  tls=True)
    config["tls"] = tls
    proc = start_kleidi(kleidi_factory, config)
    round_trip(proc)
    assert "logged in to Vault (CertAuth)" in proc.log()


def test_tls_server_name_is_checked(openbao: OpenBao, transit_key: str, kleidi_factory: Any,
                                    short_dir: Path) -> None:
    auth = kleidi_vault.token_auth(openbao, transit_key, short_dir)
    good = kleidi_vault.backend(openbao, transit_key, auth, tls=True)
    good["tls"]["server_name"] = "localhost"  # in the certificate; the URL says 127.0.0.1
    round_trip(start_kleidi(kleidi_factory, good, "good"))
    bad = kleidi_vault.backend(openbao, transit_key, auth, tls=True)
    bad["tls"]["server_name"] = "not-the-server.example"
    proc = start_kleidi(kleidi_factory, bad, "bad", start=False)
    proc.start(wait=False)
    wait_until(lambda: proc.socket_path.exists() or proc.proc.poll() is not None, 20, "kleidi to start")
    assert proc.proc.poll() is None, "a TLS failure is an outage, not a reason to exit"
    wait_until(lambda: "certificate" in healthz(proc).lower() or "ssl" in healthz(proc).lower(), 20,
               "Status to report the TLS failure")
    with pytest.raises(grpc.RpcError) as info:
        proc.encrypt(os.urandom(32))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_namespace(openbao: OpenBao, kleidi_factory: Any, short_dir: Path) -> None:
    namespace = openbao.namespace(unique("team"))
    key = namespace.create_key("kek")
    root_key = openbao.create_key(unique("kek"))
    auth = kleidi_vault.token_auth(namespace, key, short_dir)
    proc = start_kleidi(kleidi_factory, kleidi_vault.backend(openbao, key, auth, namespace=namespace.path))
    key_id = round_trip(proc)
    other = start_kleidi(kleidi_factory, kleidi_vault.backend(
        openbao, root_key, kleidi_vault.token_auth(openbao, root_key, short_dir)), "root-ns")
    assert round_trip(other) != key_id


# ------------------------------------------------------------------------------------------- token lifecycle


def _load(proc: Any, stop: threading.Event, results: Counter[str], written: list[tuple[bytes, Any]]) -> None:
    from kleidi._proto.kmsv2 import api_pb2_grpc
    with grpc.insecure_channel(proc.endpoint) as channel:
        stub = api_pb2_grpc.KeyManagementServiceStub(channel)
        while not stop.is_set():
            seed = os.urandom(32)
            try:
                response = stub.Encrypt(pb.EncryptRequest(plaintext=seed, uid="load"), timeout=3)
                request = pb.DecryptRequest(ciphertext=response.ciphertext, key_id=response.key_id,
                                            annotations=response.annotations, uid="load")
                ok = stub.Decrypt(request, timeout=3).plaintext == seed
                results["ok" if ok else "WRONG PLAINTEXT"] += 1
                written.append((seed, response))
            except grpc.RpcError as exc:
                results[exc.code().name] += 1
            time.sleep(0.01)


def _run_load(proc: Any, seconds: float, threads: int = 4) -> tuple[Counter[str], list[tuple[bytes, Any]]]:
    results: Counter[str] = Counter()
    written: list[tuple[bytes, Any]] = []
    stop = threading.Event()
    workers = [threading.Thread(target=_load, args=(proc, stop, results, written)) for _ in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join(30)
    return results, written


def test_short_lived_tokens_expire_repeatedly_under_load_without_a_failed_call(
        openbao: OpenBao, transit_key: str, kleidi_factory: Any, short_dir: Path) -> None:
    auth = kleidi_vault.approle_auth(openbao, transit_key, short_dir, token_ttl="3s", token_max_ttl="3s")
    proc = start_kleidi(kleidi_factory, kleidi_vault.backend(openbao, transit_key, auth))
    results, _ = _run_load(proc, 13)
    assert results["ok"] > 100
    assert set(results) == {"ok"}, results
    assert proc.log().count("logged in to Vault") >= 4  # the 3-second token ran out several times


def test_renewable_tokens_are_renewed_before_expiry(openbao: OpenBao, transit_key: str, kleidi_factory: Any,
                                                    short_dir: Path) -> None:
    auth = kleidi_vault.approle_auth(openbao, transit_key, short_dir, token_ttl="4s", token_max_ttl="10m")
    proc = start_kleidi(kleidi_factory, kleidi_vault.backend(openbao, transit_key, auth))
    results, _ = _run_load(proc, 10, threads=2)
    assert set(results) == {"ok"}, results
    assert proc.log().count("logged in to Vault") == 1
    renewals = proc.log().count("Vault token renewed")
    # about one renewal per 2.7 s (a third of 4 s left) and never one per waiting request
    assert 2 <= renewals <= 8, renewals


# ------------------------------------------------------------------------------------------- key versions


def test_rotation_min_decryption_version_and_retirement(openbao: OpenBao, transit_key: str, kleidi_factory: Any,
                                                         short_dir: Path) -> None:
    proc = start_kleidi(kleidi_factory, kleidi_vault.backend(
        openbao, transit_key, kleidi_vault.token_auth(openbao, transit_key, short_dir)))
    seed = os.urandom(32)
    old = proc.encrypt(seed)
    openbao.rotate_key(transit_key)
    new_key_id = proc.wait_for_key_id(lambda k: k != old.key_id)
    assert new_key_id.startswith("kleidi:vault:v2:")
    assert proc.encrypt(os.urandom(32)).key_id == new_key_id
    assert proc.decrypt(old.ciphertext, old.key_id, old.annotations) == seed
    openbao.set_min_decryption_version(transit_key, 2)
    time.sleep(0.5)  # one refresh interval (200 ms) and then some
    with pytest.raises(grpc.RpcError) as info:
        proc.decrypt(old.ciphertext, old.key_id, old.annotations)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "retired" in (info.value.details() or "")
    assert proc.status().healthz == "ok"


def _tampered(ciphertext: bytes) -> bytes:
    """The same envelope with one base64 character of the Transit ciphertext changed: only Transit can tell."""
    at = ciphertext.index(b"vault:v") + len(b"vault:v1:") + 10
    return ciphertext[:at] + (b"B" if ciphertext[at:at + 1] == b"A" else b"A") + ciphertext[at + 1:]


def test_concurrent_calls_are_coalesced_into_batches_and_each_caller_gets_its_own_answer(
        openbao: OpenBao, transit_key: str, kleidi_factory: Any, short_dir: Path) -> None:
    proc = start_kleidi(kleidi_factory, kleidi_vault.backend(
        openbao, transit_key, kleidi_vault.token_auth(openbao, transit_key, short_dir), max_in_flight=1))
    round_trip(proc)  # warm: token, connection
    encrypts_before = openbao.request_count(f"transit/encrypt/{transit_key}")
    seeds = [os.urandom(32) for _ in range(64)]
    proc.plaintexts_sent.extend(seeds)
    futures = [proc.stub.Encrypt.future(pb.EncryptRequest(plaintext=seed, uid=f"u{i}"), timeout=20)
               for i, seed in enumerate(seeds)]
    sealed = [f.result() for f in futures]
    encrypt_requests = openbao.request_count(f"transit/encrypt/{transit_key}") - encrypts_before
    assert encrypt_requests < 0.8 * len(seeds), f"{encrypt_requests} Transit requests for {len(seeds)} Encrypts"

    # Decrypt them all at once, every third one tampered: each caller gets its own plaintext or its own error.
    decrypts_before = openbao.request_count(f"transit/decrypt/{transit_key}")
    requests = [pb.DecryptRequest(ciphertext=_tampered(s.ciphertext) if i % 3 == 0 else s.ciphertext,
                                  key_id=s.key_id, annotations=dict(s.annotations), uid=f"d{i}")
                for i, s in enumerate(sealed)]
    futures = [proc.stub.Decrypt.future(request, timeout=20) for request in requests]
    for i, (future, seed) in enumerate(zip(futures, seeds, strict=True)):
        if i % 3 == 0:
            with pytest.raises(grpc.RpcError) as info:
                future.result()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, i
        else:
            assert future.result().plaintext == seed, i
    decrypt_requests = openbao.request_count(f"transit/decrypt/{transit_key}") - decrypts_before
    assert decrypt_requests < 0.8 * len(seeds), f"{decrypt_requests} Transit requests for {len(seeds)} Decrypts"

    # A batch in which every item fails is answered item by item, each with its own error.
    futures = [proc.stub.Decrypt.future(pb.DecryptRequest(ciphertext=_tampered(s.ciphertext), key_id=s.key_id,
                                                          annotations=dict(s.annotations), uid="bad"), timeout=20)
               for s in sealed[:8]]
    for future in futures:
        with pytest.raises(grpc.RpcError) as info:
            future.result()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert proc.status().healthz == "ok"


def test_a_recreated_key_never_reuses_a_key_id(openbao: OpenBao, kleidi_factory: Any, short_dir: Path) -> None:
    key = openbao.create_key(unique("recreated"))
    proc = start_kleidi(kleidi_factory, kleidi_vault.backend(
        openbao, key, kleidi_vault.token_auth(openbao, key, short_dir)))
    first = proc.encrypt(os.urandom(32))
    openbao.delete_key(key)
    time.sleep(1.1)  # creation times have one-second resolution
    openbao.create_key(key)
    second_key_id = proc.wait_for_key_id(lambda k: k != first.key_id)
    assert second_key_id.startswith("kleidi:vault:v1:")  # the same version number ...
    assert second_key_id != first.key_id  # ... but never the same key_id
    with pytest.raises(grpc.RpcError) as info:
        proc.decrypt(first.ciphertext, first.key_id, first.annotations)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_non_aead_key_types_work_with_a_warning(openbao: OpenBao, kleidi_factory: Any, short_dir: Path) -> None:
    key = openbao.create_key(unique("rsa"), "rsa-2048")
    proc = start_kleidi(kleidi_factory, kleidi_vault.backend(
        openbao, key, kleidi_vault.token_auth(openbao, key, short_dir)))
    round_trip(proc)
    assert "cannot bind associated data" in proc.log()


# ------------------------------------------------------------------------------------------- outages


def test_outage_fails_fast_and_recovers_by_itself(fresh_openbao: OpenBao, kleidi_factory: Any,
                                                  short_dir: Path) -> None:
    server = fresh_openbao
    key = server.create_key("kek")
    auth = kleidi_vault.token_auth(server, key, short_dir)
    proc = start_kleidi(kleidi_factory, kleidi_vault.backend(server, key, auth))
    before = [(s, proc.encrypt(s)) for s in (os.urandom(32) for _ in range(5))]
    results: Counter[str] = Counter()
    written: list[tuple[bytes, Any]] = []
    stop = threading.Event()
    loader = threading.Thread(target=_load, args=(proc, stop, results, written))
    loader.start()
    time.sleep(1)
    server.stop()
    wait_until(lambda: healthz(proc) != "ok", 15, "Status to turn unhealthy")
    with pytest.raises(grpc.RpcError) as info:
        proc.stub.Encrypt(pb.EncryptRequest(plaintext=os.urandom(32), uid="outage"), timeout=3)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # an answer, not the apiserver's deadline
    server.start()
    wait_until(lambda: healthz(proc) == "ok", 30, "Status to recover")
    time.sleep(1)
    stop.set()
    loader.join(30)
    assert results["ok"] > 0 and set(results) <= {"ok", "UNAVAILABLE"}, results
    for seed, response in before + written:
        assert proc.decrypt(response.ciphertext, response.key_id, response.annotations) == seed  # nothing lost


def test_sealed_server_is_unavailable_then_recovers(fresh_openbao: OpenBao, kleidi_factory: Any,
                                                    short_dir: Path) -> None:
    server = fresh_openbao
    key = server.create_key("kek")
    auth = kleidi_vault.token_auth(server, key, short_dir)
    proc = start_kleidi(kleidi_factory, kleidi_vault.backend(server, key, auth))
    written = proc.encrypt(b"s" * 32)
    server.seal()
    wait_until(lambda: healthz(proc) != "ok", 15, "Status to turn unhealthy")
    with pytest.raises(grpc.RpcError) as info:
        proc.decrypt(written.ciphertext, written.key_id, written.annotations)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    server.unseal()
    wait_until(lambda: healthz(proc) == "ok", 30, "Status to recover")
    assert proc.decrypt(written.ciphertext, written.key_id, written.annotations) == b"s" * 32


def test_kleidi_starts_while_vault_is_down_and_recovers(fresh_openbao: OpenBao, kleidi_factory: Any,
                                                         short_dir: Path) -> None:
    server = fresh_openbao
    key = server.create_key("kek")
    config = kleidi_vault.backend(server, key, kleidi_vault.token_auth(server, key, short_dir))
    server.stop()
    proc = start_kleidi(kleidi_factory, config, start=False)
    proc.start(wait=False)
    wait_until(lambda: proc.socket_path.exists(), 20, "kleidi to listen")
    status = proc.status()
    assert status.healthz != "ok" and status.key_id == ""
    server.start()
    wait_until(lambda: healthz(proc) == "ok", 30, "Status to recover")
    round_trip(proc)


# ------------------------------------------------------------------------------------------- config, CLI


def test_policy_command_prints_the_minimal_policy(short_dir: Path) -> None:
    config = short_dir / "vault.yaml"
    config.write_text(yaml.safe_dump({"backend": {
        "kind": "vault", "address": "https://vault.example:8200", "transit_mount": "kms", "key": "cluster-a",
        "auth": {"method": "approle", "role_id_file": "/etc/kleidi/role_id",
                 "secret_id_file": "/etc/kleidi/secret_id"}}}))
    result = run_kleidi("policy", "vault", "--config", str(config))
    assert result.returncode == 0, result.stderr
    paths = [line.split('"')[1] for line in result.stdout.splitlines() if line.startswith("path ")]
    assert paths == ["kms/encrypt/cluster-a", "kms/decrypt/cluster-a", "kms/keys/cluster-a",
                     "auth/token/lookup-self", "auth/token/renew-self", "auth/token/revoke-self"]
    local = run_kleidi("policy", "vault")
    assert local.returncode == 2 and "needs a vault backend" in local.stderr


@pytest.mark.parametrize("auth, message", [
    ({"method": "password"}, "backend.auth.method"),
    ({"method": "token"}, "neither token_file nor token_env is set"),
    ({"method": "approle", "role_id_file": "/x"}, "neither secret_id_file nor secret_id_env is set"),
    ({"method": "jwt"}, "backend.auth.role"),
    ({"method": "token", "token": "s.inline-secret"}, "unknown field"),
])
def test_vault_config_errors(short_dir: Path, auth: dict[str, Any], message: str) -> None:
    config = short_dir / "vault.yaml"
    config.write_text(yaml.safe_dump({"server": {"endpoint": f"unix://{short_dir}/k.sock"}, "backend": {
        "kind": "vault", "address": "http://127.0.0.1:1", "key": "k", "auth": auth}}))
    result = run_kleidi("serve", "--config", str(config))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "s.inline-secret" not in result.stderr  # a secret put where it does not belong is not echoed


def test_missing_credential_file_stops_start_up(openbao: OpenBao, transit_key: str, short_dir: Path) -> None:
    config = short_dir / "vault.yaml"
    config.write_text(yaml.safe_dump({"server": {"endpoint": f"unix://{short_dir}/k.sock"},
                                      "backend": kleidi_vault.backend(openbao, transit_key, {
                                          "method": "token", "token_file": str(short_dir / "missing")})}))
    result = run_kleidi("serve", "--config", str(config))
    assert result.returncode == 2
    assert "cannot read the token file" in result.stderr and "Traceback" not in result.stderr


def test_config_schema_lists_the_vault_backend() -> None:
    schema = json.loads(run_kleidi("config", "schema").stdout)
    assert "VaultBackendSettings" in json.dumps(schema)


def test_a_key_restored_from_an_older_backup_does_not_bring_back_an_old_key_id(
        openbao: OpenBao, kleidi_factory: Any, short_dir: Path) -> None:
    """Restoring a Transit backup taken at version 1 after rotating to 2 would make Status go
    A -> B -> A; kleidi refuses to report A again and says why, until the key moves past 2."""
    key = openbao.create_key(unique("restored"))
    openbao.configure_key(key, exportable=True, allow_plaintext_backup=True)
    backup = openbao.read(f"transit/backup/{key}")["data"]["backup"]  # type: ignore[index]
    proc = start_kleidi(kleidi_factory, kleidi_vault.backend(
        openbao, key, kleidi_vault.token_auth(openbao, key, short_dir)))
    first = proc.status().key_id
    openbao.rotate_key(key)
    second = proc.wait_for_key_id(lambda k: k != first)
    openbao.write(f"transit/restore/{key}", backup=backup, force=True)  # back to version 1
    wait_until(lambda: "went back from version 2 to 1" in healthz(proc), 15, "Status to refuse the rollback")
    assert proc.status().key_id == second  # never the old key_id again
    openbao.rotate_key(key)
    openbao.rotate_key(key)  # version 3: past everything reported before
    third = proc.wait_for_key_id(lambda k: k.startswith("kleidi:vault:v3:"))
    assert third not in (first, second)
    wait_until(lambda: healthz(proc) == "ok", 15, "Status to be healthy again")


def test_a_policy_denial_is_reported_without_logging_in_again_and_again(
        openbao: OpenBao, transit_key: str, kleidi_factory: Any, short_dir: Path) -> None:
    """A valid token that the policy refuses: re-login would not help, so kleidi does not churn tokens."""
    encrypt_only = openbao.write_policy(unique("encrypt-only"), f"""
path "transit/encrypt/{transit_key}" {{ capabilities = ["update"] }}
path "transit/keys/{transit_key}" {{ capabilities = ["read"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
""")
    auth = kleidi_vault.approle_auth(openbao, transit_key, short_dir, policies=[encrypt_only], token_ttl="1h")
    proc = start_kleidi(kleidi_factory, kleidi_vault.backend(openbao, transit_key, auth, probe_interval="1h"),
                        start=False)
    proc.start(wait=False)
    wait_until(lambda: proc.socket_path.exists(), 20, "kleidi to listen")
    written = proc.encrypt(os.urandom(32))
    for _ in range(5):
        with pytest.raises(grpc.RpcError) as info:
            proc.decrypt(written.ciphertext, written.key_id, written.annotations)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "permission denied" in (info.value.details() or "")
    assert proc.log().count("logged in to Vault") == 1


def test_another_node_decrypts_right_after_a_rotation_it_has_not_polled_yet(
        openbao: OpenBao, transit_key: str, kleidi_factory: Any, short_dir: Path) -> None:
    config = kleidi_vault.backend(openbao, transit_key, kleidi_vault.token_auth(openbao, transit_key, short_dir))
    fast = start_kleidi(kleidi_factory, config, "fast")
    slow = start_kleidi(kleidi_factory, {**config, "refresh_interval": "1h"}, "slow")
    old_key_id = slow.status().key_id
    openbao.rotate_key(transit_key)
    fast.wait_for_key_id(lambda k: k != old_key_id)
    seed = os.urandom(32)
    written = fast.encrypt(seed)
    time.sleep(1.1)  # on-demand refreshes are limited to one a second (a flood of unknown key_ids is cheap)
    assert slow.status().key_id == old_key_id  # the slow node has not polled yet ...
    assert slow.decrypt(written.ciphertext, written.key_id, written.annotations) == seed  # ... and still decrypts


def test_a_renewed_client_certificate_is_picked_up_without_a_restart(
        openbao: OpenBao, transit_key: str, kleidi_factory: Any, client_ca: LocalCA) -> None:
    mount = unique("cert")
    openbao.cert_auth(client_ca.cert_pem, [kleidi_vault.kleidi_policy(openbao, transit_key)], mount=mount)
    cert, key = client_ca.issue_client("kubelet")
    combined = client_ca.combined_pem(cert, key, "kubelet-client-current.pem")
    config = kleidi_vault.backend(openbao, transit_key, {"method": "cert", "mount": mount}, tls=True)
    config["tls"]["client_cert_file"] = str(combined)
    proc = start_kleidi(kleidi_factory, config)
    round_trip(proc)
    new_cert, new_key = client_ca.issue_client("kubelet-renewed")
    client_ca.combined_pem(new_cert, new_key, "kubelet-client-current.pem")  # rewritten in place, as the kubelet does
    wait_until(lambda: "TLS certificates reloaded" in proc.log(), 15, "the new certificate to be loaded")
    round_trip(proc)


@pytest.mark.parametrize("method", ["token", "approle"])
def test_the_start_up_login_is_audited(openbao: OpenBao, transit_key: str, kleidi_factory: Any, short_dir: Path,
                                       method: str) -> None:
    auth = (kleidi_vault.token_auth(openbao, transit_key, short_dir) if method == "token"
            else kleidi_vault.approle_auth(openbao, transit_key, short_dir))
    log_path = short_dir / f"audit-{method}.jsonl"
    proc = start_kleidi(kleidi_factory, kleidi_vault.backend(openbao, transit_key, auth),
                        settings={"audit": {"path": str(log_path), "fsync": "always"}})
    round_trip(proc)
    assert proc.stop() == 0
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names.index("vault_login") < names.index("start")  # the login before serving is on record
    login = events[names.index("vault_login")]
    assert login["method"] == method and "ttl_s" in login
    assert run_kleidi("audit", "verify", str(log_path)).returncode == 0
