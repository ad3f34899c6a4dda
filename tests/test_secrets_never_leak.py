"""No secret kleidi is given ever shows in anything it says, in any usual encoding.

kleidi is configured with a secret in every place that holds one (a Vault token file and a token
environment variable, an AppRole role_id and secret_id, the audit log's HMAC key, the local keyring's
key material, and a password in a URL), and every output is driven: Status over gRPC, /readyz,
/livez and /metrics, the serve log (including a reload), the audit log, `kleidi doctor`, `kleidi
config check`, `kleidi config schema`, `kleidi status`, and the errors of refused configurations.
Each secret is looked for raw, hex, base64 (standard and URL-safe, padded or not), percent-encoded,
JSON- and repr-escaped, and as a 16-character prefix of each of those (a value cut short for a message
is still a leak).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import signal
import urllib.parse
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import KleidiProcess, run_kleidi, wait_for
from tests.vault import kleidi_vault
from tests.vault.openbao import OpenBao, unique, write_private


def _forms(secret: bytes) -> set[bytes]:
    b64 = base64.b64encode(secret)
    url = base64.urlsafe_b64encode(secret)
    forms = {secret, secret.hex().encode(), secret.hex().upper().encode(), b64, b64.rstrip(b"="), url,
             url.rstrip(b"="), urllib.parse.quote(secret).encode(), urllib.parse.quote_plus(secret).encode()}
    try:
        text = secret.decode()
    except UnicodeDecodeError:
        pass
    else:
        forms |= {json.dumps(text)[1:-1].encode(), repr(text)[1:-1].encode()}
    return forms | {form[:16] for form in forms if len(form) > 16}


class Secrets:
    """The secrets of one test, and the check that none of them is in an output."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    def new(self, name: str, prefix: str = "") -> str:
        value = prefix + secrets.token_urlsafe(24)
        self.values[name] = value.encode()
        return value

    def add(self, name: str, value: bytes) -> None:
        assert len(value) >= 16, name  # shorter values could match by chance
        self.values[name] = value

    def assert_absent(self, outputs: dict[str, str | bytes]) -> None:
        assert outputs and self.values
        for where, output in outputs.items():
            data = output.encode() if isinstance(output, str) else output
            for name, value in self.values.items():
                for form in _forms(value):
                    assert form not in data, f"the {name} (as {form[:6]!r}...) is in {where}"


def _http(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return f"{response.status} {dict(response.getheaders())} {response.read().decode(errors='replace')}"
    finally:
        conn.close()


def _cli(*args: str, env: dict[str, str] | None = None) -> str:
    result = run_kleidi(*args, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def _status(proc: KleidiProcess) -> str:
    try:
        return str(proc.status())
    except grpc.RpcError as exc:
        return f"{exc.code()} {exc.details()}"


def every_output(proc: KleidiProcess, env: dict[str, str] | None = None) -> dict[str, str | bytes]:
    """Everything a running kleidi and the CLI say about it, then its log after a reload and a stop."""
    config = str(proc.config_path)
    outputs: dict[str, str | bytes] = {"Status": _status(proc)}
    for path in ("/readyz", "/livez", "/metrics", "/nonexistent"):
        outputs[path] = _http(proc.metrics_port, path)
    outputs |= {
        "kleidi status": _cli("status", "--endpoint", proc.endpoint),
        "kleidi status --output json": _cli("status", "--endpoint", proc.endpoint, "--output", "json"),
        "kleidi doctor": _cli("doctor", "--config", config, env=env),
        "kleidi doctor --output json": _cli("doctor", "--config", config, "--output", "json", env=env),
        "kleidi config check": _cli("config", "check", "--config", config, env=env),
        "kleidi config schema": _cli("config", "schema"),
    }
    if proc.config["backend"]["kind"] == "vault":
        outputs["kleidi policy vault"] = _cli("policy", "vault", "--config", config, env=env)
    lines = len(proc.log().splitlines())
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(word in line for line in proc.log().splitlines()[lines:] for word in ("SIGHUP", "reload")),
             20, "the reload logged")
    outputs["Status after reload"] = _status(proc)
    assert proc.stop() == 0, proc.log()
    outputs["serve log"] = proc.log_path.read_bytes()
    # The scan is only as good as what it scans: these outputs said something real.
    assert "healthz" in str(outputs["Status"]) and "kleidi_" in str(outputs["/metrics"])
    assert '"name": "config"' in str(outputs["kleidi doctor --output json"])
    assert "backend:" in str(outputs["kleidi config check"])
    for path in proc.workdir.glob("*.jsonl*"):
        outputs[f"audit log {path.name}"] = path.read_bytes()
    return outputs


def _audit(found: Secrets, workdir: Path, name: str = "kleidi") -> dict[str, Any]:
    key = found.new(f"audit HMAC key of {name}")
    return {"path": str(workdir / f"{name}.jsonl"), "fsync": "always",
            "hmac_key_file": str(write_private(workdir / f"{name}-hmac.key", key))}


def _exercise(proc: KleidiProcess) -> None:
    sealed = proc.encrypt(os.urandom(32))
    assert proc.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations)


# -- running kleidis ------------------------------------------------------------------------------


def test_local_keyring_and_audit_hmac_key(kleidi_factory: Any, short_dir: Path) -> None:
    found = Secrets()
    proc: KleidiProcess = kleidi_factory(start=False, settings={"audit": _audit(found, short_dir)})
    for version in json.loads(proc.keyring.read_text())["versions"]:
        found.add(f"keyring key version {version['version']}", base64.b64decode(version["key"]))
    proc.start()
    _exercise(proc)
    rotated = run_kleidi("rotate", "--keyring", str(proc.keyring))
    assert rotated.returncode == 0, rotated.stderr
    for version in json.loads(proc.keyring.read_text())["versions"]:
        found.add(f"keyring key version {version['version']}", base64.b64decode(version["key"]))
    outputs = every_output(proc)
    outputs["kleidi rotate"] = rotated.stdout + rotated.stderr
    outputs["kleidi keys --output json"] = _cli("keys", "--keyring", str(proc.keyring), "--output", "json")
    outputs["kleidi keys"] = _cli("keys", "--keyring", str(proc.keyring))
    found.assert_absent(outputs)


def test_vault_token_file_and_approle(openbao: OpenBao, transit_key: str, kleidi_factory: Any,
                                      short_dir: Path) -> None:
    found = Secrets()
    token_auth = kleidi_vault.token_auth(openbao, transit_key, short_dir)
    found.add("Vault token", Path(token_auth["token_file"]).read_bytes().strip())
    approle = kleidi_vault.approle_auth(openbao, transit_key, short_dir)
    found.add("AppRole role_id", Path(approle["role_id_file"]).read_bytes().strip())
    found.add("AppRole secret_id", Path(approle["secret_id_file"]).read_bytes().strip())
    outputs: dict[str, str | bytes] = {}
    for name, auth in (("token", token_auth), ("approle", approle)):
        proc: KleidiProcess = kleidi_factory(name, create_keyring=False, start=False,
                                             backend=kleidi_vault.backend(openbao, transit_key, auth),
                                             settings={"audit": _audit(found, short_dir, name)})
        proc.start()
        _exercise(proc)
        outputs |= {f"{name}: {where}": text for where, text in every_output(proc).items()}
    found.assert_absent(outputs)


def test_unreachable_vault_with_a_token_in_a_file_and_in_the_environment(kleidi_factory: Any, short_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Status, /readyz and doctor report the failure; none of them shows the token."""
    found = Secrets()
    token_file = write_private(short_dir / unique("token"), found.new("Vault token in a file", "hvs."))
    monkeypatch.setenv("LEAK_TEST_VAULT_TOKEN", found.new("Vault token in the environment", "hvs."))
    outputs: dict[str, str | bytes] = {}
    for name, auth in (("file", {"method": "token", "token_file": str(token_file)}),
                       ("env", {"method": "token", "token_env": "LEAK_TEST_VAULT_TOKEN"})):
        proc: KleidiProcess = kleidi_factory(name, create_keyring=False, start=False, backend={
            "kind": "vault", "address": "http://127.0.0.1:9", "key": "k", "auth": auth, "timeout": "500ms"})
        proc.start(wait=False)
        assert wait_for(lambda proc=proc: "Vault" in _status(proc), 20, "Status reporting the unreachable Vault")
        outputs |= {f"{name}: {where}": text for where, text in
                    every_output(proc, env={"LEAK_TEST_VAULT_TOKEN": os.environ["LEAK_TEST_VAULT_TOKEN"]}).items()}
        assert "cannot reach Vault" in str(outputs[f"{name}: Status"])
    found.assert_absent(outputs)


# -- refused configurations -----------------------------------------------------------------------


def _refusals(found: Secrets, workdir: Path) -> dict[str, tuple[str, dict[str, str]]]:
    """name -> (config file text, environment): each one is refused."""
    password, user = found.new("URL password"), found.new("URL user name")
    vault = "backend:\n  kind: vault\n  key: k\n  auth: {method: token, token_env: VAULT_TOKEN}\n"
    loose_key = workdir / "loose-hmac.key"
    loose_key.write_bytes(found.new("loose HMAC key").encode())
    loose_key.chmod(0o644)
    short_key = write_private(workdir / "short-hmac.key", secrets.token_hex(6))  # 12 bytes: too short
    loose_ring = workdir / "loose-ring.json"
    loose_ring.write_text(json.dumps({"format": "kleidi-keyring", "versions": [
        {"version": 1, "key": found.new("loose keyring key")}]}))
    loose_ring.chmod(0o644)
    bad_ring = write_private(workdir / "bad-ring.json", json.dumps(
        {"format": "not-a-keyring", "versions": [{"version": 1, "key": found.new("malformed keyring key")}]}))
    token = found.new("token given inline", "hvs.")
    return {
        "vault address with user:password": (f"{vault}  address: http://{user}:{password}@vault:8200\n", {}),
        "vault address with https and a path": (f"{vault}  address: https://{user}:{password}@vault/x/\n", {}),
        "vault address without scheme": (f"{vault}  address: '{user}:{password}@vault:8200'\n", {}),
        "vault address from the environment": (vault, {"KLEIDI_BACKEND__ADDRESS": f"http://{user}:{password}@v:1"}),
        "endpoint with user:password": (f"server:\n  endpoint: unix://{user}:{password}@h/x.sock\n", {}),
        "telemetry address with user:password": (f"telemetry:\n  address: '{user}:{password}@127.0.0.1:1'\n", {}),
        "token inline in the file": (vault.replace("token_env: VAULT_TOKEN", f"token: {token}") +
                                     "  address: http://v:1\n", {}),
        "token inline in the environment": (f"{vault}  address: http://v:1\n",
                                            {"KLEIDI_BACKEND__AUTH__TOKEN": token}),
        "token given as token_env": (vault.replace("VAULT_TOKEN", token) + "  address: http://v:1\n", {}),
        "YAML error on a line with the password": (f"{vault}  address: \"http://{user}:{password}@v:1\n", {}),
        "loose HMAC key file": (f"audit:\n  path: {workdir}/a.jsonl\n  hmac_key_file: {loose_key}\n", {}),
        "short HMAC key file": (f"audit:\n  path: {workdir}/b.jsonl\n  hmac_key_file: {short_key}\n", {}),
        "keyring readable by others": (f"backend:\n  keyring: {loose_ring}\n", {}),
        "malformed keyring": (f"backend:\n  keyring: {bad_ring}\n", {}),
    }


def test_refused_configurations_do_not_echo_secrets(short_dir: Path) -> None:
    found = Secrets()
    outputs: dict[str, str | bytes] = {}
    for name, (text, env) in _refusals(found, short_dir).items():
        config = short_dir / f"{unique('refused')}.yaml"
        config.write_text(text + f"server:\n  endpoint: unix://{short_dir}/{unique('s')}.sock\n"
                          if "server:" not in text else text)
        serve = run_kleidi("serve", "--config", str(config), env=env, timeout=30)
        assert serve.returncode == 2, f"{name}: kleidi started or crashed:\n{serve.stderr}"
        assert "fix" in serve.stderr and "Traceback" not in serve.stderr, f"{name}:\n{serve.stderr}"
        outputs[f"{name}: serve"] = serve.stdout + serve.stderr
        outputs[f"{name}: config check"] = _cli("config", "check", "--config", str(config), env=env)
        outputs[f"{name}: doctor --output json"] = _cli("doctor", "--config", str(config), "--output", "json", env=env)
        outputs[f"{name}: doctor"] = _cli("doctor", "--config", str(config), env=env)
    found.assert_absent(outputs)


def test_the_check_finds_what_it_looks_for() -> None:
    """The scan itself: each encoding of a secret, and a prefix of it, is caught."""
    found = Secrets()
    value = found.new("probe")
    raw = value.encode()
    for leaked in (value, raw.hex(), base64.b64encode(raw).decode(), urllib.parse.quote(value), value[:20] + "...",
                   json.dumps({"token": value})):
        with pytest.raises(AssertionError, match="probe"):
            found.assert_absent({"output": f"some text {leaked} more text"})
    found.assert_absent({"output": "nothing of it here"})
