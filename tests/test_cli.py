"""The ``kleidi`` command line: keyring management, status, encryption-config, version, reloads.

Everything runs the real ``kleidi`` console script; servers are real ``kleidi serve`` processes on
real unix sockets. The only stand-in is the failing ``os.replace`` of the atomic-write test.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import kleidi
from kleidi.backends import local
from tests.conftest import KLEIDI, keygen, run_kleidi, wait_for

SEED = bytes(range(32))


def _keys(keyring: Path) -> dict[str, Any]:
    result = run_kleidi("keys", "--output", "json", "--keyring", str(keyring))
    assert result.returncode == 0, result.stderr
    listed: dict[str, Any] = json.loads(result.stdout)
    return listed


def _current(listing: dict[str, Any]) -> dict[str, Any]:
    current = [row for row in listing["versions"] if row["current"]]
    assert len(current) == 1, listing
    return current[0]


def _file(keyring: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(keyring.read_text())
    return doc


def _rotate(keyring: Path) -> subprocess.CompletedProcess[str]:
    result = run_kleidi("rotate", "--keyring", str(keyring))
    assert result.returncode == 0, result.stderr
    return result




# -- keygen ---------------------------------------------------------------------------------------


def test_keygen_creates_a_0600_keyring(tmp_path):
    keyring = tmp_path / "keyring.json"
    result = run_kleidi("keygen", "--keyring", str(keyring))
    assert result.returncode == 0, result.stderr
    st = os.lstat(keyring)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    doc = _file(keyring)
    assert doc["format"] == "kleidi-keyring"
    assert doc["current"] == 1
    assert [v["version"] for v in doc["versions"]] == [1]
    assert len(base64.b64decode(doc["versions"][0]["key"])) == 32
    listing = _keys(keyring)
    assert _current(listing)["version"] == 1
    assert _current(listing)["key_id"] in result.stdout


def test_keygen_never_overwrites(tmp_path):
    keyring = tmp_path / "keyring.json"
    keygen(keyring)
    before = keyring.read_bytes()
    result = run_kleidi("keygen", "--keyring", str(keyring))
    assert result.returncode == 2
    assert "already exists" in result.stderr
    assert "Traceback" not in result.stderr
    assert keyring.read_bytes() == before


def test_keygen_refuses_a_non_keyring_file_too(tmp_path):
    keyring = tmp_path / "keyring.json"
    keyring.write_text("something else\n")
    result = run_kleidi("keygen", "--keyring", str(keyring))
    assert result.returncode == 2
    assert keyring.read_text() == "something else\n"


def test_keygen_where_it_cannot_write_says_so_without_a_traceback(tmp_path):
    """An unusable directory (a file in its place here; for kleidi's own user, a root-only directory) is an
    error with its fix, exit 2, not a traceback."""
    (tmp_path / "not-a-dir").write_text("")
    result = run_kleidi("keygen", "--keyring", str(tmp_path / "not-a-dir" / "keyring.json"))
    assert result.returncode == 2, result.stderr
    assert "cannot create keyring" in result.stderr and "is not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_keygen_as_a_user_who_cannot_write_the_directory_says_so() -> None:
    """kleidi's own user (uid 10001, as the image and static pod run it) in a directory only root may enter.
    (Not under tmp_path: pytest's base directory is 0700, so uid 10001 could not even reach it.)"""
    base = Path(tempfile.mkdtemp(prefix="kleidi-keygen-", dir="/tmp"))
    try:
        base.chmod(0o755)
        locked = base / "root-only"
        locked.mkdir(mode=0o700)
        result = subprocess.run(["setpriv", "--reuid=10001", "--regid=10001", "--clear-groups", KLEIDI, "keygen",
                                 "--keyring", str(locked / "keyring.json")], capture_output=True, text=True,
                                env={k: v for k, v in os.environ.items() if not k.startswith("KLEIDI_")},
                                timeout=60, check=False)
        assert result.returncode == 2, result.stderr
        assert "cannot create keyring" in result.stderr and "Permission denied" in result.stderr
        assert "run as a user who may write" in result.stderr
        assert "Traceback" not in result.stderr
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- rotate / retire / keys -----------------------------------------------------------------------


def test_rotate_adds_version_2_and_changes_current(tmp_path):
    keyring = tmp_path / "keyring.json"
    keygen(keyring)
    before = _current(_keys(keyring))
    assert before["version"] == 1

    result = _rotate(keyring)
    after_listing = _keys(keyring)
    after = _current(after_listing)
    assert after["version"] == 2
    assert after["key_id"] != before["key_id"]
    assert after["key_id"] in result.stdout
    # Version 1 is still there, active, with the same key_id.
    v1 = next(row for row in after_listing["versions"] if row["version"] == 1)
    assert v1 == {**before, "current": False}
    assert stat.S_IMODE(os.stat(keyring).st_mode) == 0o600


def test_retire_current_version_is_refused(tmp_path):
    keyring = tmp_path / "keyring.json"
    keygen(keyring)
    before = keyring.read_bytes()
    result = run_kleidi("retire", "1", "--yes", "--keyring", str(keyring))
    assert result.returncode != 0
    assert "current" in result.stderr
    assert "Traceback" not in result.stderr
    assert keyring.read_bytes() == before


def test_retire_without_yes_and_without_a_tty_is_refused(tmp_path):
    keyring = tmp_path / "keyring.json"
    keygen(keyring)
    _rotate(keyring)
    before = keyring.read_bytes()
    result = run_kleidi("retire", "1", "--keyring", str(keyring), input="y\n")
    assert result.returncode == 2
    assert "--yes" in result.stderr
    assert "Traceback" not in result.stderr
    assert keyring.read_bytes() == before


def test_retire_destroys_the_key_material(tmp_path):
    keyring = tmp_path / "keyring.json"
    keygen(keyring)
    v1_key_id = _current(_keys(keyring))["key_id"]
    _rotate(keyring)
    v1_key = _file(keyring)["versions"][0]["key"]

    result = run_kleidi("retire", "1", "--yes", "--keyring", str(keyring))
    assert result.returncode == 0, result.stderr
    assert v1_key_id in result.stdout

    doc = _file(keyring)
    v1, v2 = doc["versions"]
    assert v1["version"] == 1
    assert v1["state"] == "retired"
    assert "key" not in v1
    assert v1["retired"]
    assert v2["state"] == "active" and v2["key"]
    assert doc["current"] == 2
    assert v1_key not in keyring.read_text()
    assert stat.S_IMODE(os.stat(keyring).st_mode) == 0o600

    listing = _keys(keyring)
    row = next(r for r in listing["versions"] if r["version"] == 1)
    assert row["state"] == "retired"
    assert row["key_id"] == v1_key_id  # the number and key_id are never reused

    again = run_kleidi("retire", "1", "--yes", "--keyring", str(keyring))
    assert again.returncode != 0
    assert "already retired" in again.stderr


def test_retire_unknown_version_fails(tmp_path):
    keyring = tmp_path / "keyring.json"
    keygen(keyring)
    _rotate(keyring)
    before = keyring.read_bytes()
    result = run_kleidi("retire", "7", "--yes", "--keyring", str(keyring))
    assert result.returncode != 0
    assert "no version 7" in result.stderr
    assert "Traceback" not in result.stderr
    assert keyring.read_bytes() == before


def test_keys_never_shows_key_material(tmp_path):
    keyring = tmp_path / "keyring.json"
    keygen(keyring)
    _rotate(keyring)
    _rotate(keyring)
    secrets = [v["key"] for v in _file(keyring)["versions"]]
    assert len(secrets) == 3
    forms = []
    for encoded in secrets:
        raw = base64.b64decode(encoded)
        forms += [encoded, encoded.rstrip("="), raw.hex(), base64.urlsafe_b64encode(raw).decode().rstrip("=")]

    as_json = run_kleidi("keys", "--output", "json", "--keyring", str(keyring))
    as_table = run_kleidi("keys", "--keyring", str(keyring), env={"COLUMNS": "250"})
    for result in (as_json, as_table):
        assert result.returncode == 0, result.stderr
        for form in forms:
            assert form not in result.stdout
            assert form not in result.stderr
    rows = json.loads(as_json.stdout)["versions"]
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert all("key" not in r for r in rows)


def test_key_ids_differ_between_keyrings_and_are_stable(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    keygen(a)
    keygen(b)
    first_a, second_a = _keys(a), _keys(a)
    assert first_a == second_a
    assert _current(first_a)["key_id"] != _current(_keys(b))["key_id"]
    assert first_a["keyring_id"] != _keys(b)["keyring_id"]


def test_concurrent_rotations_are_serialised(tmp_path):
    keyring = tmp_path / "keyring.json"
    keygen(keyring)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLEIDI_")}
    procs = [subprocess.Popen([KLEIDI, "rotate", "--keyring", str(keyring)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(10)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err

    doc = _file(keyring)
    versions = [v["version"] for v in doc["versions"]]
    assert versions == list(range(1, 12))
    assert doc["current"] == 11
    assert len({v["key"] for v in doc["versions"]}) == 11
    # Each rotate announced a different version.
    announced = sorted(int(out.split("version ")[1].split()[0]) for out, _ in outputs)
    assert announced == list(range(2, 12))
    listing = _keys(keyring)
    assert len({row["key_id"] for row in listing["versions"]}) == 11
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_failed_write_leaves_the_keyring_unchanged(tmp_path, monkeypatch):
    keyring = tmp_path / "keyring.json"
    keygen(keyring)
    before = keyring.read_bytes()
    listing_before = sorted(os.listdir(tmp_path))

    def fail_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(local.os, "replace", fail_replace)
    with pytest.raises(OSError, match="simulated"), local.edit_keyring(keyring) as ring:
        ring.rotate()
    monkeypatch.undo()

    assert keyring.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == listing_before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    # The lock was released: a real rotation goes through afterwards.
    _rotate(keyring)
    assert _file(keyring)["current"] == 2


# -- status ---------------------------------------------------------------------------------------


def test_status_of_a_healthy_server(kleidi_factory):
    k = kleidi_factory()
    key_id = k.status().key_id
    result = run_kleidi("status", "--endpoint", k.endpoint)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"key_id: {key_id}" in result.stdout
    assert "healthz: ok" in result.stdout

    as_json = run_kleidi("status", "--endpoint", k.endpoint, "--output", "json")
    assert as_json.returncode == 0
    doc = json.loads(as_json.stdout)
    assert doc["healthy"] is True
    assert doc["key_id"] == key_id
    assert doc["version"] == "v2"


def test_status_of_a_missing_socket_says_that_nothing_listens(short_dir):
    path = short_dir / "nobody.sock"
    result = run_kleidi("status", "--endpoint", f"unix://{path}", "--timeout", "2s")
    assert result.returncode == 1  # a failed check, not bad usage
    assert "Traceback" not in result.stderr
    assert f"nothing listens at {path}: the socket does not exist" in result.stdout
    assert "fix: start kleidi" in result.stdout
    for python in ("None", "True", "False", "[]"):
        assert python not in result.stdout
    as_json = json.loads(run_kleidi("status", "--endpoint", str(path), "--output", "json").stdout)
    assert as_json["healthy"] is False and as_json["version"] is None and "nothing listens" in as_json["error"]


def test_status_of_a_file_that_is_not_a_socket(short_dir):
    path = short_dir / "plain"
    path.write_text("")
    result = run_kleidi("status", "--endpoint", str(path))
    assert result.returncode == 1
    assert f"nothing listens at {path}: it is not a socket" in result.stdout


def test_status_of_an_unhealthy_server_and_recovery(kleidi_factory):
    k = kleidi_factory()
    healthy_key_id = k.status().key_id
    sealed = k.encrypt(SEED)
    original = k.keyring.read_bytes()

    k.keyring.write_text("{ this is not a keyring\n")  # in place: the mode stays 0600
    assert stat.S_IMODE(os.stat(k.keyring).st_mode) == 0o600
    wait_for(lambda: k.status().healthz != "ok", 10, "Status turning unhealthy")
    response = k.status()
    assert "malformed" in response.healthz
    assert response.key_id == healthy_key_id  # the last good keys stay in use

    result = run_kleidi("status", "--endpoint", k.endpoint)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "malformed" in result.stdout
    # Data written before the keyring broke can still be read.
    assert k.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations) == SEED

    k.keyring.write_bytes(original)
    wait_for(lambda: k.status().healthz == "ok", 10, "Status recovering")
    assert run_kleidi("status", "--endpoint", k.endpoint).returncode == 0
    assert k.status().key_id == healthy_key_id
    assert k.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations) == SEED
    assert k.proc is not None and k.proc.poll() is None


# -- encryption-config ----------------------------------------------------------------------------

ENDPOINT = "unix:///var/run/kleidi/kleidi.sock"


def test_encryption_config():
    result = run_kleidi("encryption-config", "--name", "kleidi", "--endpoint", ENDPOINT,
                        "--resources", "secrets,configmaps")
    assert result.returncode == 0, result.stderr
    doc = yaml.safe_load(result.stdout)
    assert doc["apiVersion"] == "apiserver.config.k8s.io/v1"
    assert doc["kind"] == "EncryptionConfiguration"
    assert len(doc["resources"]) == 1
    entry = doc["resources"][0]
    assert entry["resources"] == ["secrets", "configmaps"]
    assert entry["providers"] == [
        {"kms": {"apiVersion": "v2", "name": "kleidi", "endpoint": ENDPOINT, "timeout": "3s"}},
        {"identity": {}},
    ]
    assert "identity: {}" in result.stdout
    assert result.stdout.index("kms:") < result.stdout.index("identity: {}")


def test_encryption_config_without_identity_fallback():
    result = run_kleidi("encryption-config", "--endpoint", ENDPOINT, "--no-identity-fallback")
    assert result.returncode == 0, result.stderr
    doc = yaml.safe_load(result.stdout)
    providers = doc["resources"][0]["providers"]
    assert providers == [{"kms": {"apiVersion": "v2", "name": "kleidi", "endpoint": ENDPOINT, "timeout": "3s"}}]
    assert doc["resources"][0]["resources"] == ["secrets"]
    assert "identity" not in yaml.safe_dump(doc)


@pytest.mark.parametrize("args", [
    ["--name", "kle:idi", "--endpoint", ENDPOINT],
    ["--name", "", "--endpoint", ENDPOINT],
    ["--endpoint", "http://localhost:8080/kms"],
    ["--endpoint", "unix://var/run/kleidi.sock"],
    ["--endpoint", ENDPOINT, "--resources", "*"],
    ["--endpoint", ENDPOINT, "--resources", "Secrets"],
    ["--endpoint", ENDPOINT, "--resources", "secrets,secrets"],
], ids=["colon-in-name", "empty-name", "http-endpoint", "endpoint-with-host", "bare-star", "uppercase",
        "duplicate"])
def test_encryption_config_refuses_bad_input(args):
    result = run_kleidi("encryption-config", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "error" in result.stderr.lower()
    assert result.stdout == ""  # nothing that could end up in a file the apiserver reads


def _kms_yaml(name: str, endpoint: str) -> str:
    return f"""  - kms:
      apiVersion: v2
      name: {name}
      endpoint: {endpoint}
      timeout: 3s
"""


_HEADER = """# kube-apiserver --encryption-provider-config=<this file>
# The kms provider encrypts new writes; identity reads objects written before encryption was
# enabled. Remove identity once every object has been re-encrypted (docs/quickstart.md).
# The other kms providers only decrypt what is stored with them: remove each once `kleidi scan`
# finds nothing stored with it (docs/rotation.md, Moving to another backend).
apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
- resources:
  - secrets
  providers:
"""


@pytest.mark.parametrize("previous", [
    [("kleidi-local", "unix:///run/kleidi-local/kleidi.sock")],
    [("kleidi-vault", "unix:///run/kleidi-vault/kleidi.sock"), ("kleidi-local", "unix:///run/kleidi-local/kleidi.sock")],
], ids=["one-previous", "two-previous"])
def test_encryption_config_with_previous_providers(previous):
    """The new provider first (it encrypts every write), each previous one in the order given, identity last."""
    args = [arg for name, endpoint in previous for arg in ("--previous", f"{name}={endpoint}")]
    result = run_kleidi("encryption-config", "--name", "kleidi-hsm", "--endpoint", ENDPOINT, *args)
    assert result.returncode == 0, result.stderr
    expected = (_HEADER + _kms_yaml("kleidi-hsm", ENDPOINT)
                + "".join(_kms_yaml(name, endpoint) for name, endpoint in previous) + "  - identity: {}\n")
    assert result.stdout == expected


def test_encryption_config_previous_takes_a_socket_path_as_endpoint():
    result = run_kleidi("encryption-config", "--endpoint", ENDPOINT, "--no-identity-fallback",
                        "--previous", "old = /run/old/kleidi.sock", "--previous", "older=@older")
    assert result.returncode == 0, result.stderr
    providers = yaml.safe_load(result.stdout)["resources"][0]["providers"]
    assert [(p["kms"]["name"], p["kms"]["endpoint"]) for p in providers] == [
        ("kleidi", ENDPOINT), ("old", "unix:///run/old/kleidi.sock"), ("older", "unix:///@older")]


@pytest.mark.parametrize(("args", "message"), [
    (["--previous", "kleidi=unix:///run/old.sock"], "'kleidi' is listed twice"),
    (["--previous", "a=unix:///run/a.sock", "--previous", "a=unix:///run/b.sock"], "'a' is listed twice"),
    (["--previous", "unix:///run/old.sock"], "is not NAME=ENDPOINT"),
    (["--previous", "old="], "is not NAME=ENDPOINT"),
    (["--previous", "=unix:///run/old.sock"], "must be non-empty"),
    (["--previous", "ol:d=unix:///run/old.sock"], "contain no ':'"),
    (["--previous", "old=http://localhost/kms"], "must start with unix://"),
], ids=["same-as-name", "twice", "no-name", "no-endpoint", "empty-name", "colon", "http"])
def test_encryption_config_refuses_bad_previous(args, message):
    result = run_kleidi("encryption-config", "--endpoint", ENDPOINT, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "fix:" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    if "listed twice" in message:
        assert "never reuse a name for another KEK" in result.stderr


# -- version --------------------------------------------------------------------------------------


def test_version():
    result = run_kleidi("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"kleidi {kleidi.__version__} ")
    assert kleidi.__version__ == importlib.metadata.version("kleidi")
    assert "v2" in result.stdout


# -- picking up rotations -------------------------------------------------------------------------


def test_sighup_picks_up_a_rotation_at_once(kleidi_factory):
    k = kleidi_factory(settings={"backend": {"refresh_interval": "1h"}})
    before = k.status().key_id
    sealed = k.encrypt(SEED)
    _rotate(k.keyring)
    expected = _current(_keys(k.keyring))["key_id"]
    assert expected != before
    time.sleep(0.5)
    assert k.status().key_id == before  # with a 1h interval nothing re-reads the keyring by itself

    k.send_signal(signal.SIGHUP)
    assert k.wait_for_key_id(lambda key_id: key_id != before, timeout=5) == expected
    assert k.encrypt(SEED).key_id == expected
    assert k.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations) == SEED
    assert k.status().healthz == "ok"
    assert "SIGHUP" in k.log()
    assert k.proc is not None and k.proc.poll() is None


def test_rotation_shows_up_within_the_refresh_interval(kleidi_factory):
    k = kleidi_factory(settings={"backend": {"refresh_interval": "200ms"}})
    before = k.status().key_id
    _rotate(k.keyring)
    expected = _current(_keys(k.keyring))["key_id"]
    assert k.wait_for_key_id(lambda key_id: key_id != before, timeout=5) == expected
    assert k.encrypt(SEED).key_id == expected


def test_keyring_in_a_directory_writable_by_others_is_refused(short_dir: Path) -> None:
    open_dir = short_dir / "open"
    open_dir.mkdir()
    keyring = open_dir / "ring.json"
    keygen(keyring)
    open_dir.chmod(0o777)
    result = run_kleidi("keys", "--keyring", str(keyring))
    assert result.returncode == 2
    assert "writable by others" in result.stderr and f"chmod go-w {open_dir}" in result.stderr


def test_encryption_config_without_identity_says_so() -> None:
    result = run_kleidi("encryption-config", "--endpoint", "unix:///run/k.sock", "--no-identity-fallback")
    assert result.returncode == 0
    assert "No identity fallback" in result.stdout and "Remove identity" not in result.stdout


def test_status_version_v2beta1_for_kubernetes_1_27_and_1_28(kleidi_factory: Any) -> None:
    proc = kleidi_factory(settings={"server": {"status_version": "v2beta1"}})
    assert proc.status().version == "v2beta1"
    result = run_kleidi("status", "--endpoint", proc.endpoint)
    assert result.returncode == 0, result.stdout
