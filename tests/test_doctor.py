"""`kleidi doctor`: one test per problem it claims to detect, against real kleidi and OpenBao processes."""

from __future__ import annotations

import json
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import KleidiProcess, run_kleidi
from tests.vault import kleidi_vault
from tests.vault.openbao import OpenBao, unique


def doctor(config: Path, *extra: str) -> tuple[int, dict[str, dict[str, str]]]:
    result = run_kleidi("doctor", "--config", str(config), "--output", "json", *extra)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, {c["name"]: c for c in json.loads(result.stdout)}


def encryption_config(tmp: Path, endpoint: str, api_version: str = "v2") -> Path:
    text = run_kleidi("encryption-config", "--endpoint", endpoint).stdout.replace("apiVersion: v2",
                                                                                  f"apiVersion: {api_version}")
    path = tmp / unique("enc")
    path.write_text(text)
    return path


def test_a_healthy_setup_passes_every_check(kleidi_factory: Any, short_dir: Path) -> None:
    proc: KleidiProcess = kleidi_factory()
    code, checks = doctor(proc.config_path, "--encryption-config", str(encryption_config(short_dir, proc.endpoint)))
    assert code == 0
    assert {name: c["result"] for name, c in checks.items()} == {
        "config": "pass", "keyring file": "pass", "backend reachable": "pass", "encrypt/decrypt round trip": "pass",
        "socket directory": "pass", "socket permissions": "pass", "kleidi answers": "pass",
        "EncryptionConfiguration": "pass"}
    human = run_kleidi("doctor", "--config", str(proc.config_path))
    assert human.returncode == 0 and "kleidi doctor" in human.stdout


def test_invalid_config(short_dir: Path) -> None:
    bad = short_dir / "bad.yaml"
    bad.write_text("server:\n  endpont: unix:///tmp/x.sock\n")
    code, checks = doctor(bad)
    assert code == 1 and checks["config"]["result"] == "FAIL"
    assert "server.endpont: unknown field" in checks["config"]["detail"]
    assert checks["config"]["fix"] == "remove it (did you mean 'server.endpoint'?)"


def test_loose_keyring_permissions(kleidi_factory: Any) -> None:
    proc: KleidiProcess = kleidi_factory()
    proc.keyring.chmod(0o644)
    code, checks = doctor(proc.config_path)
    assert code == 1 and checks["keyring file"]["result"] == "FAIL"
    assert checks["keyring file"]["fix"] == f"chmod 600 {proc.keyring}"


def test_kleidi_not_running(kleidi_factory: Any) -> None:
    proc: KleidiProcess = kleidi_factory(start=False)
    code, checks = doctor(proc.config_path)
    assert code == 1 and checks["socket"]["result"] == "FAIL" and "not running" in checks["socket"]["detail"]


def test_socket_mode_differs_from_the_config(kleidi_factory: Any) -> None:
    proc: KleidiProcess = kleidi_factory(settings={"server": {"socket_mode": "0660"}})
    config = yaml.safe_load(proc.config_path.read_text())
    config["server"]["socket_mode"] = "0600"
    other = proc.config_path.with_name("other.yaml")
    other.write_text(yaml.safe_dump(config))
    code, checks = doctor(other)
    assert code == 1 and checks["socket permissions"]["result"] == "FAIL"
    assert "0660" in checks["socket permissions"]["detail"]


def test_encryption_config_pointing_elsewhere_or_at_kms_v1(kleidi_factory: Any, short_dir: Path) -> None:
    proc: KleidiProcess = kleidi_factory()
    code, checks = doctor(proc.config_path, "--encryption-config",
                          str(encryption_config(short_dir, "unix:///var/run/other.sock")))
    assert code == 1 and "not at" in checks["EncryptionConfiguration"]["detail"]
    code, checks = doctor(proc.config_path, "--encryption-config",
                          str(encryption_config(short_dir, proc.endpoint, api_version="v1")))
    assert code == 1 and "apiVersion: v2" in checks["EncryptionConfiguration"]["fix"]


def _vault_config(short_dir: Path, backend: dict[str, Any]) -> Path:
    path = short_dir / unique("vault")
    path.write_text(yaml.safe_dump({"server": {"endpoint": f"unix://{short_dir}/{unique('s')}.sock"},
                                    "backend": backend}))
    return path


def test_vault_healthy_backend_and_clock(openbao: OpenBao, transit_key: str, short_dir: Path) -> None:
    config = _vault_config(short_dir, kleidi_vault.backend(
        openbao, transit_key, kleidi_vault.token_auth(openbao, transit_key, short_dir)))
    _, checks = doctor(config)
    assert checks["backend reachable"]["result"] == "pass"
    assert checks["encrypt/decrypt round trip"]["result"] == "pass"
    assert checks["clock skew"]["result"] == "pass"
    assert checks["token file"]["result"] == "pass"


def test_vault_unreachable(short_dir: Path) -> None:
    token = short_dir / "token"
    token.write_text("s.unused")
    token.chmod(0o600)
    config = _vault_config(short_dir, {"kind": "vault", "address": "http://127.0.0.1:9", "key": "k",
                                       "auth": {"method": "token", "token_file": str(token)}})
    code, checks = doctor(config)
    assert code == 1 and checks["backend reachable"]["result"] == "FAIL"
    assert "cannot reach Vault" in checks["backend reachable"]["detail"]


def test_vault_policy_without_decrypt(openbao: OpenBao, transit_key: str, short_dir: Path) -> None:
    policy = openbao.write_policy(unique("no-decrypt"), f"""
path "transit/encrypt/{transit_key}" {{ capabilities = ["update"] }}
path "transit/keys/{transit_key}" {{ capabilities = ["read"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
""")
    token = short_dir / "token"
    token.write_text(openbao.create_token([policy]))
    token.chmod(0o600)
    config = _vault_config(short_dir, kleidi_vault.backend(openbao, transit_key,
                                                           {"method": "token", "token_file": str(token)}))
    code, checks = doctor(config)
    assert code == 1 and checks["encrypt/decrypt round trip"]["result"] == "FAIL"
    assert "permission denied" in checks["encrypt/decrypt round trip"]["detail"]


def test_vault_clock_skew(short_dir: Path) -> None:
    """Skew cannot be produced with a real server on this machine's one clock, so a loopback HTTP
    server stands in for Vault and answers with a Date header an hour behind."""

    class Skewed(BaseHTTPRequestHandler):
        def date_time_string(self, timestamp: float | None = None) -> str:  # the Date header send_response adds
            return formatdate(__import__("time").time() - 3600, usegmt=True)

        def do_GET(self) -> None:
            body = b'{"initialized": true, "sealed": false}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Skewed)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        token = short_dir / "token"
        token.write_text("s.unused")
        token.chmod(0o600)
        config = _vault_config(short_dir, {"kind": "vault", "address": f"http://127.0.0.1:{server.server_port}",
                                           "key": "k", "auth": {"method": "token", "token_file": str(token)}})
        code, checks = doctor(config)
    finally:
        server.shutdown()
        server.server_close()
    assert code == 1 and checks["clock skew"]["result"] == "FAIL"
    detail = checks["clock skew"]["detail"]
    assert any(f"+{seconds}s off" in detail for seconds in (3599, 3600, 3601)), detail


def test_socket_and_runtime_directories_others_could_replace(kleidi_factory: Any, short_dir: Path) -> None:
    """The socket's own directory is kleidi's (0700), but one above it is 0777: doctor names it and the fix."""
    open_dir = short_dir / "open"
    (open_dir / "run").mkdir(parents=True, mode=0o700)
    open_dir.chmod(0o777)
    runtime = open_dir / "runtime"
    runtime.mkdir(mode=0o700)
    proc: KleidiProcess = kleidi_factory(start=False, settings={"server": {
        "endpoint": f"unix://{open_dir}/run/kleidi.sock", "runtime_dir": str(runtime)}})
    code, checks = doctor(proc.config_path)
    assert code == 1
    for name in ("socket directory", "runtime directory"):
        assert checks[name]["result"] == "FAIL", checks
        assert f"directory {open_dir} is writable by others (mode 0777" in checks[name]["detail"]
        assert checks[name]["fix"].startswith(f"chmod go-w {open_dir}")
    assert checks["socket directory"]["detail"].startswith("server.endpoint:")
    assert checks["runtime directory"]["detail"].startswith("server.runtime_dir:")


def test_encryption_config_that_is_not_text_or_too_deep(kleidi_factory: Any, short_dir: Path) -> None:
    proc: KleidiProcess = kleidi_factory()
    for content, needle in ((b"resources:\n- \xff\n", "is not UTF-8 text"), (b"[" * 50_000, "nested more than")):
        path = short_dir / unique("enc")
        path.write_bytes(content)
        code, checks = doctor(proc.config_path, "--encryption-config", str(path))
        assert code == 1 and checks["EncryptionConfiguration"]["result"] == "FAIL"
        assert needle in checks["EncryptionConfiguration"]["detail"] and checks["EncryptionConfiguration"]["fix"]
