"""The OpenBao harness itself: every helper the transit backend tests rely on, against the real server."""

from __future__ import annotations

import base64
import socket
import stat
import time
from pathlib import Path

import hvac
import pytest
import requests
from cryptography import x509

from .openbao import LocalCA, OpenBao, OpenBaoError, transit_policy, unique, write_combined_pem


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encrypt(client: hvac.Client, key: str, plaintext: bytes, aad: bytes, mount: str = "transit") -> str:
    result = client.secrets.transit.encrypt_data(key, b64(plaintext), associated_data=b64(aad), mount_point=mount)
    return str(result["data"]["ciphertext"])


def decrypt(client: hvac.Client, key: str, ciphertext: str, aad: bytes, mount: str = "transit") -> bytes:
    result = client.secrets.transit.decrypt_data(key, ciphertext, associated_data=b64(aad), mount_point=mount)
    return base64.b64decode(result["data"]["plaintext"])


# --------------------------------------------------------------------------------------------------- PKI


def test_pki_files_sans_and_modes(pki_dir: Path) -> None:
    ca = LocalCA(pki_dir, "ca")
    cert_path, key_path = ca.issue_server("srv")
    client_cert, client_key = ca.issue_client("cli", common_name="kleidi-client")
    combined = write_combined_pem(client_cert, client_key, pki_dir / "cli-combined.pem")
    for path in (ca.ca_path, ca.ca_key_path, cert_path, key_path, client_cert, client_key, combined):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    server = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    text = combined.read_text()
    assert text.index("BEGIN CERTIFICATE") < text.index("BEGIN PRIVATE KEY")
    client = x509.load_pem_x509_certificate(client_cert.read_bytes())
    client.verify_directly_issued_by(ca.cert)


# --------------------------------------------------------------------------------------------------- server basics


def test_session_server_is_persistent_active_and_tls(openbao: OpenBao) -> None:
    status, health = openbao.health()
    assert status == 200
    assert health["initialized"] and not health["sealed"] and not health["standby"]
    assert health["version"].startswith("2.7.")
    with openbao.connect() as client:
        assert client.sys.read_health_status(method="GET")["initialized"]
        storage = client.read("sys/storage/raft/configuration")
        assert storage is not None and storage["data"]["config"]["servers"][0]["leader"] is True
    # the HTTPS listener serves a certificate from the test CA for 127.0.0.1
    with openbao.connect(tls=True) as client:
        assert client.lookup_token()["data"]["policies"] == ["root"]
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{openbao.https_addr}/v1/sys/health", timeout=5)


def test_start_failure_is_reported_with_the_log(pki_dir: Path) -> None:
    server = OpenBao(pki_dir / "bao")
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", server.http_port))
        blocker.listen()
        try:
            with pytest.raises(OpenBaoError, match=r"(?s)exited with code .*address already in use"):
                server.start(timeout=20)
        finally:
            server.cleanup()


# --------------------------------------------------------------------------------------------------- transit


def test_transit_round_trip_with_associated_data(openbao: OpenBao, transit_key: str) -> None:
    with openbao.connect() as client:
        ciphertext = encrypt(client, transit_key, b"secret DEK bytes", b"uid-1")
        assert ciphertext.startswith("vault:v1:")
        assert decrypt(client, transit_key, ciphertext, b"uid-1") == b"secret DEK bytes"
        with pytest.raises(hvac.exceptions.InvalidRequest, match="message authentication failed"):
            decrypt(client, transit_key, ciphertext, b"uid-2")
        with pytest.raises(hvac.exceptions.InvalidRequest, match="message authentication failed"):
            client.secrets.transit.decrypt_data(transit_key, ciphertext)
    # the harness shortcuts agree with raw hvac
    assert openbao.decrypt(transit_key, ciphertext, associated_data=b"uid-1") == b"secret DEK bytes"


def test_rotate_min_decryption_version_and_delete(openbao: OpenBao) -> None:
    key = openbao.create_key(unique("rot"))
    info = openbao.read_key(key)
    assert info["type"] == "aes256-gcm96"
    assert info["latest_version"] == 1 and info["min_decryption_version"] == 1
    assert list(info["keys"]) == ["1"] and isinstance(info["keys"]["1"], int)
    old = openbao.encrypt(key, b"v1 data", associated_data=b"ad")

    assert openbao.rotate_key(key) == 2
    info = openbao.read_key(key)
    assert sorted(info["keys"]) == ["1", "2"] and info["latest_version"] == 2
    new = openbao.encrypt(key, b"v2 data", associated_data=b"ad")
    assert new.startswith("vault:v2:")
    assert openbao.decrypt(key, old, associated_data=b"ad") == b"v1 data"

    openbao.set_min_decryption_version(key, 2)
    assert openbao.read_key(key)["min_decryption_version"] == 2
    with pytest.raises(hvac.exceptions.InvalidRequest, match="disallowed by policy"):
        openbao.decrypt(key, old, associated_data=b"ad")
    assert openbao.decrypt(key, new, associated_data=b"ad") == b"v2 data"

    openbao.delete_key(key)
    assert openbao.read(f"transit/keys/{key}") is None
    with pytest.raises(hvac.exceptions.InvalidRequest, match="encryption key not found"):
        openbao.decrypt(key, new, associated_data=b"ad")


def test_second_transit_mount(openbao: OpenBao) -> None:
    mount = unique("tr")
    key = openbao.create_key("same-name", mount=mount)
    ciphertext = openbao.encrypt(key, b"x", mount=mount)
    assert openbao.decrypt(key, ciphertext, mount=mount) == b"x"
    assert openbao.read("transit/keys/same-name") is None


# --------------------------------------------------------------------------------------------------- tokens


def test_token_ttl_expiry_and_renewal(openbao: OpenBao, transit_key: str) -> None:
    policy = openbao.write_policy(unique("pol"), transit_policy(transit_key))
    short = openbao.create_token([policy], ttl="3s", renewable=False)
    renewable = openbao.create_token([policy], ttl="3s", explicit_max_ttl="60s")
    created = time.monotonic()
    with openbao.connect(short) as c_short, openbao.connect(renewable) as c_renew:
        data = c_short.lookup_token()["data"]
        assert data["policies"] == ["default", policy] and 0 < data["ttl"] <= 3 and data["renewable"] is False
        ciphertext = encrypt(c_short, transit_key, b"dek", b"aad")
        assert decrypt(c_renew, transit_key, ciphertext, b"aad") == b"dek"
        with pytest.raises(hvac.exceptions.InvalidRequest, match="not renewable"):
            c_short.auth.token.renew_self(increment="30s")
        renewed = c_renew.auth.token.renew_self(increment="30s")["auth"]
        assert renewed["renewable"] is True and 25 <= renewed["lease_duration"] <= 30

        time.sleep(max(0.0, 4.2 - (time.monotonic() - created)))
        with pytest.raises(hvac.exceptions.Forbidden, match="permission denied"):
            c_short.lookup_token()
        with pytest.raises(hvac.exceptions.Forbidden, match="permission denied"):
            encrypt(c_short, transit_key, b"dek", b"aad")
        assert c_renew.lookup_token()["data"]["ttl"] > 20
        assert decrypt(c_renew, transit_key, ciphertext, b"aad") == b"dek"

        openbao.revoke_token(renewable)
        with pytest.raises(hvac.exceptions.Forbidden, match="permission denied"):
            decrypt(c_renew, transit_key, ciphertext, b"aad")


def test_policy_limits_token_to_its_key(openbao: OpenBao, transit_key: str) -> None:
    other = openbao.create_key(unique("other"))
    token = openbao.create_token([openbao.write_policy(unique("pol"), transit_policy(transit_key))], ttl="1m")
    with openbao.connect(token) as client:
        encrypt(client, transit_key, b"ok", b"")
        with pytest.raises(hvac.exceptions.Forbidden, match="permission denied"):
            encrypt(client, other, b"no", b"")
    period = openbao.lookup_token(openbao.create_token([], period="1h"))
    assert period["period"] == 3600 and period["policies"] == ["default"]  # not the parent's root policy


# --------------------------------------------------------------------------------------------------- auth methods


def test_approle_login(openbao: OpenBao, transit_key: str) -> None:
    policy = openbao.write_policy(unique("pol"), transit_policy(transit_key))
    role_id, secret_id = openbao.approle(unique("role"), [policy], token_ttl="2m", secret_id_ttl="10m")
    with openbao.connect("") as client:
        auth = client.auth.approle.login(role_id=role_id, secret_id=secret_id)["auth"]
        assert policy in auth["policies"] and auth["lease_duration"] == 120
        encrypt(client, transit_key, b"x", b"y")  # login stored the token in the client
    with openbao.connect("") as client, pytest.raises(hvac.exceptions.InvalidRequest):
        client.auth.approle.login(role_id=role_id, secret_id="wrong")


def test_jwt_login(openbao: OpenBao, transit_key: str) -> None:
    policy = openbao.write_policy(unique("pol"), transit_policy(transit_key))
    mount = unique("jwt")
    issuer = openbao.jwt_auth("kleidi", [policy], audience="kleidi-vault", mount=mount, token_ttl="90s")
    with openbao.connect("") as client:
        auth = client.auth.jwt.jwt_login("kleidi", issuer.sign(), path=mount)["auth"]
        assert policy in auth["policies"] and auth["lease_duration"] == 90
        assert auth["metadata"]["role"] == "kleidi"
        encrypt(client, transit_key, b"x", b"y")
    bad = {
        "wrong audience": issuer.sign(aud="someone-else"),
        "expired": issuer.sign(iat=time.time() - 600, ttl=60),
        "wrong issuer": issuer.sign(iss="https://evil.test"),
    }
    for why, token in bad.items():
        with openbao.connect("") as client, pytest.raises(hvac.exceptions.VaultError):
            client.auth.jwt.jwt_login("kleidi", token, path=mount)
            pytest.fail(f"JWT with {why} was accepted")


def test_cert_login_over_https(openbao: OpenBao, transit_key: str, client_ca: LocalCA, pki_dir: Path) -> None:
    policy = openbao.write_policy(unique("pol"), transit_policy(transit_key))
    mount = unique("cert")
    openbao.cert_auth(client_ca.cert_pem, [policy], role="kleidi", mount=mount, token_ttl="5m")
    cert, key = client_ca.issue_client("kleidi-client", common_name="kleidi")
    with openbao.connect("", cert=(str(cert), str(key))) as client:
        auth = client.write_data(f"auth/{mount}/login", data={"name": "kleidi"})["auth"]
        assert policy in auth["policies"] and auth["lease_duration"] == 300
        assert auth["metadata"]["common_name"] == "kleidi"
        client.token = auth["client_token"]
        assert decrypt(client, transit_key, encrypt(client, transit_key, b"m", b"a"), b"a") == b"m"
    # a combined cert+key PEM works as the client certificate too
    combined = client_ca.combined_pem(cert, key)
    response = requests.post(f"{openbao.https_addr}/v1/auth/{mount}/login", json={"name": "kleidi"},
                             cert=str(combined), verify=str(openbao.ca_path), timeout=10)
    with response:
        assert response.status_code == 200, response.text
    # no client certificate, or one from an untrusted CA: refused
    stranger = LocalCA(pki_dir / "stranger", "stranger-ca")
    bad_cert, bad_key = stranger.issue_client("stranger", common_name="kleidi")
    for cert_arg in (None, (str(bad_cert), str(bad_key))):
        with openbao.connect("", tls=True, cert=cert_arg) as client, pytest.raises(hvac.exceptions.VaultError):
            client.write_data(f"auth/{mount}/login", data={"name": "kleidi"})


# --------------------------------------------------------------------------------------------------- namespaces


def test_namespace_transit_key(openbao: OpenBao) -> None:
    ns = openbao.namespace(unique("ns"))
    key = ns.create_key("kleidi")
    policy = ns.write_policy("kleidi", transit_policy(key))
    token = ns.create_token([policy], ttl="2m")
    with openbao.connect(token, namespace=ns.path) as client:
        ciphertext = encrypt(client, key, b"in a namespace", b"ad")
        assert decrypt(client, key, ciphertext, b"ad") == b"in a namespace"
    with openbao.connect(namespace=ns.path) as root_in_ns:
        assert decrypt(root_in_ns, key, ciphertext, b"ad") == b"in a namespace"
    # without the namespace header the key does not exist (and the namespaced token is unknown in root)
    with openbao.connect() as root:
        with pytest.raises(hvac.exceptions.InvalidRequest, match="encryption key not found"):
            decrypt(root, key, ciphertext, b"ad")
        # the namespace can also be given as a path prefix
        result = root.write_data(f"{ns.path}/transit/decrypt/{key}",
                                 data={"ciphertext": ciphertext, "associated_data": b64(b"ad")})
        assert base64.b64decode(result["data"]["plaintext"]) == b"in a namespace"
    with openbao.connect(token) as client, pytest.raises(hvac.exceptions.Forbidden):
        decrypt(client, key, ciphertext, b"ad")
    # auth methods inside the namespace
    role_id, secret_id = ns.approle("kleidi", [policy])
    with openbao.connect("", namespace=ns.path) as client:
        client.auth.approle.login(role_id=role_id, secret_id=secret_id)
        assert decrypt(client, key, ciphertext, b"ad") == b"in a namespace"
    child = ns.namespace("child")
    assert child.path == f"{ns.path}/child"
    child.create_key("deep")
    assert child.decrypt("deep", child.encrypt("deep", b"deep")) == b"deep"


# --------------------------------------------------------------------------------------------------- audit


def test_request_count(openbao: OpenBao, transit_key: str) -> None:
    path = f"transit/encrypt/{transit_key}"
    before_all = openbao.request_count()
    assert openbao.request_count(path) == 0
    openbao.encrypt(transit_key, b"1")
    openbao.encrypt(transit_key, b"2")
    assert openbao.request_count(path) == 2
    assert openbao.request_count("transit/", prefix=True) >= 2
    assert openbao.request_count() >= before_all + 2
    openbao.health()  # sys/health is not audited
    assert openbao.request_count(path) == 2


# --------------------------------------------------------------------------------------------------- lifecycle


def test_restart_and_kill_keep_raft_state(fresh_openbao: OpenBao) -> None:
    bao = fresh_openbao
    key = bao.create_key("persisted")
    policy = bao.write_policy("kleidi", transit_policy(key))
    token = bao.create_token([policy], ttl="1h")
    ciphertext = bao.encrypt(key, b"before restart", associated_data=b"ad")
    root, pid = bao.root_token, bao.pid

    assert bao.stop() == 0
    assert not bao.running()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{bao.http_addr}/v1/sys/health", timeout=2)
    bao.start()
    assert bao.pid != pid and bao.root_token == root
    assert bao.decrypt(key, ciphertext, associated_data=b"ad", token=token) == b"before restart"

    bao.rotate_key(key)
    second = bao.encrypt(key, b"after rotate", associated_data=b"ad")
    assert bao.kill() == -9
    bao.start()
    assert bao.read_key(key)["latest_version"] == 2
    assert bao.decrypt(key, ciphertext, associated_data=b"ad", token=token) == b"before restart"
    assert bao.decrypt(key, second, associated_data=b"ad") == b"after rotate"

    bao.restart()
    assert bao.decrypt(key, second, associated_data=b"ad", token=token) == b"after rotate"
    assert bao.starts == 4


def test_seal_and_unseal(fresh_openbao: OpenBao) -> None:
    bao = fresh_openbao
    key = bao.create_key("k")
    ciphertext = bao.encrypt(key, b"x")
    bao.seal()
    assert bao.health()[0] == 503
    with pytest.raises(hvac.exceptions.VaultDown):
        bao.decrypt(key, ciphertext)
    bao.unseal()
    assert bao.decrypt(key, ciphertext) == b"x"
