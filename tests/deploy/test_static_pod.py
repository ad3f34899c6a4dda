"""The static pod manifest (`kleidi deploy static-pod`, deploy/static-pod/kleidi.yaml).

For an example config of every backend: the real kube-apiserver accepts the manifest (server-side
dry run), the pod runs as 10001 with no capabilities and no ServiceAccount token, and it mounts
exactly what the config reads, read-only except the socket directory and what kleidi writes. The
shipped file is the command's default output; a config a static pod cannot run fails with the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from kleidi.cli import main
from kleidi.config import load_settings
from kleidi.deploy import static_pod
from tests.e2e.cluster import KubeAPIServer

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "static-pod" / "kleidi.yaml"

EXAMPLES: dict[str, dict[str, Any]] = {
    "local": {"backend": {"kind": "local", "keyring": "/var/lib/kleidi/keyring.json"}},
    "vault": {"backend": {"kind": "vault", "address": "https://vault.example.com:8200", "key": "kubernetes",
                          "auth": {"method": "approle", "role_id_file": "/etc/kleidi/vault/role-id",
                                   "secret_id_file": "/etc/kleidi/vault/secret-id"},
                          "tls": {"ca_file": "/etc/pki/vault/ca.pem"}},
              "audit": {"path": "/var/log/kleidi/audit.jsonl", "anchor_path": "/var/lib/kleidi-audit/anchor"}},
    "pkcs11": {"backend": {"kind": "pkcs11", "library": "/usr/lib/softhsm/libsofthsm2.so",
                           "token_label": "kleidi", "pin_file": "/etc/kleidi/pkcs11/pin"}},
    "tpm": {"backend": {"kind": "tpm", "tcti": "device:/dev/tpmrm0",
                        "key_store": "/var/lib/kleidi/tpm/keystore.json"}},
}


def _env() -> dict[str, str | None]:
    return {k: None for k in os.environ if k.startswith("KLEIDI_")}


def _render(tmp_path: Path, config: dict[str, Any], *args: str) -> tuple[int, str, str]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"server": {"endpoint": "unix:///var/run/kleidi/kleidi.sock"}, **config}))
    result = CliRunner().invoke(main, ["deploy", "static-pod", "--config", str(path), *args], env=_env())
    return result.exit_code, result.stdout, result.stderr


def _mounts(manifest: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """mountPath -> (read-only, hostPath type); every mount at the host's own path."""
    container = manifest["spec"]["containers"][0]
    volumes = {v["name"]: v["hostPath"] for v in manifest["spec"]["volumes"]}
    found = {}
    for mount in container["volumeMounts"]:
        host = volumes[mount["name"]]
        assert host["path"] == mount["mountPath"]
        found[mount["mountPath"]] = (mount["readOnly"], host.get("type", ""))
    assert len(volumes) == len(found)
    return found


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_manifest_for_every_backend_is_accepted_by_the_apiserver(kind: str, tmp_path: Path,
                                                                 apiserver: KubeAPIServer) -> None:
    code, out, err = _render(tmp_path, EXAMPLES[kind])
    assert code == 0, err
    result = apiserver.kubectl("apply", "--dry-run=server", "-o", "yaml", "-f", "-", input=out)
    accepted = yaml.safe_load(result.stdout)
    assert accepted["kind"] == "Pod" and accepted["metadata"]["namespace"] == "kube-system"
    # the apiserver resolved the priority class: system-node-critical exists on every cluster
    assert accepted["spec"]["priority"] == 2000001000
    # the apiserver kept every security setting as written
    manifest = yaml.safe_load(out)
    for key in ("securityContext", "automountServiceAccountToken", "hostNetwork", "enableServiceLinks"):
        assert accepted["spec"][key] == manifest["spec"][key], key
    assert accepted["spec"]["containers"][0]["securityContext"] == manifest["spec"]["containers"][0]["securityContext"]
    assert not any(v.get("projected") or v.get("secret") for v in accepted["spec"].get("volumes", []))


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_security_settings(kind: str, tmp_path: Path) -> None:
    code, out, err = _render(tmp_path, EXAMPLES[kind])
    assert code == 0, err
    spec = yaml.safe_load(out)["spec"]
    assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                       "seccompProfile": {"type": "RuntimeDefault"}}
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    assert spec["hostNetwork"] is True and spec["priorityClassName"] == "system-node-critical"
    container = spec["containers"][0]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["capabilities"] == {"drop": ["ALL"]}
    # privileged only where a TPM device must be opened (no device-cgroup rule for static pods otherwise)
    assert security.get("privileged", False) is (kind == "tpm")
    assert security.get("allowPrivilegeEscalation") is (None if kind == "tpm" else False)
    assert container["args"] == ["serve", "--config", str(tmp_path / "config.yaml")]
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz"), ("startupProbe", "/livez")):
        assert container[probe]["httpGet"] == {"host": "127.0.0.1", "port": 9464, "path": path, "scheme": "HTTP"}
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    assert "env" not in container and "envFrom" not in container


def test_mounts_are_what_each_config_reads(tmp_path: Path) -> None:
    config_dir = str(tmp_path)
    expected = {
        "local": {"/var/run/kleidi": (False, "DirectoryOrCreate"), config_dir: (True, "Directory"),
                  "/var/lib/kleidi": (True, "Directory")},
        "vault": {"/var/run/kleidi": (False, "DirectoryOrCreate"), config_dir: (True, "Directory"),
                  "/etc/kleidi/vault": (True, "Directory"), "/etc/pki/vault": (True, "Directory"),
                  "/var/log/kleidi": (False, "DirectoryOrCreate"),
                  "/var/lib/kleidi-audit": (False, "DirectoryOrCreate")},
        "pkcs11": {"/var/run/kleidi": (False, "DirectoryOrCreate"), config_dir: (True, "Directory"),
                   "/usr/lib/softhsm/libsofthsm2.so": (True, "File"), "/etc/kleidi/pkcs11": (True, "Directory")},
        "tpm": {"/var/run/kleidi": (False, "DirectoryOrCreate"), config_dir: (True, "Directory"),
                "/var/lib/kleidi/tpm": (False, "Directory"), "/dev/tpmrm0": (False, "CharDevice")},
    }
    for kind, mounts in expected.items():
        code, out, err = _render(tmp_path, EXAMPLES[kind])
        assert code == 0, err
        assert _mounts(yaml.safe_load(out)) == mounts, kind


def test_a_second_kleidi_gets_its_own_pod_name(tmp_path: Path) -> None:
    """While moving to another backend two kleidis run side by side: each static pod needs its own name."""
    code, out, err = _render(tmp_path, EXAMPLES["vault"], "--name", "kleidi-vault")
    assert code == 0, err
    manifest = yaml.safe_load(out)
    assert manifest["metadata"]["name"] == "kleidi-vault"
    assert manifest["spec"]["containers"][0]["name"] == "kleidi"
    assert "/etc/kubernetes/manifests/kleidi-vault.yaml" in out.splitlines()[0]
    assert "--name kleidi-vault" in out.splitlines()[1]
    for bad in ("Kleidi", "kleidi_vault", "-kleidi", "k" * 41):
        code, out, err = _render(tmp_path, EXAMPLES["vault"], "--name", bad)
        assert code == 2 and "not a valid pod name" in err and "fix:" in err, (bad, err)
        assert out == ""


def test_extra_mounts_and_groups(tmp_path: Path) -> None:
    code, out, err = _render(tmp_path, EXAMPLES["pkcs11"], "--mount", "/etc/softhsm2.conf",
                             "--mount", "/var/lib/softhsm:rw", "--supplemental-group", "107",
                             "--image", "registry.example/kleidi:1.0")
    assert code == 0, err
    manifest = yaml.safe_load(out)
    mounts = _mounts(manifest)
    assert mounts["/etc/softhsm2.conf"] == (True, "") and mounts["/var/lib/softhsm"] == (False, "")
    assert manifest["spec"]["securityContext"]["supplementalGroups"] == [107]
    assert manifest["spec"]["containers"][0]["image"] == "registry.example/kleidi:1.0"
    assert "--mount /etc/softhsm2.conf --mount /var/lib/softhsm:rw" in out.splitlines()[1]


def test_shipped_manifest_is_the_default_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(static_pod, "default_config_exists", lambda: False)
    result = CliRunner().invoke(main, ["deploy", "static-pod"], env=_env())
    assert result.exit_code == 0, result.stderr
    assert result.stdout == SHIPPED.read_text(), \
        "deploy/static-pod/kleidi.yaml drifted: regenerate it with " \
        "`kleidi deploy static-pod > deploy/static-pod/kleidi.yaml`"
    manifest = yaml.safe_load(result.stdout)
    assert manifest["spec"]["containers"][0]["image"] == "localhost/kleidi:0.1.0"
    assert manifest["spec"]["containers"][0]["args"] == ["serve", "--config", "/etc/kleidi/config.yaml"]
    keyring: Path = load_settings(None, {}).backend.keyring  # type: ignore[attr-defined]
    assert _mounts(manifest) == {"/var/run/kleidi": (False, "DirectoryOrCreate"), "/etc/kleidi": (True, "Directory"),
                                 str(keyring.parent): (True, "Directory")}


@pytest.mark.parametrize(("config", "args", "message", "fix"), [
    ({"server": {"endpoint": "unix:///@kleidi"}}, (), "not a socket file", "set server.endpoint to a path"),
    ({"telemetry": {"address": None}}, (), "telemetry.address is null", "set telemetry.address"),
    ({"server": {"lock_memory": True}}, (), "server.lock_memory", "lock_memory: false"),
    ({"backend": {"kind": "vault", "address": "https://vault:8200", "key": "k",
                  "auth": {"method": "kubernetes", "role": "kleidi"}}}, (), "ServiceAccount token",
     "token, approle or cert"),
    ({"backend": {"kind": "pkcs11", "library": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "t",
                  "pin_env": "PIN"}}, (), "pin_env", "backend.pin_file"),
    ({"backend": {"kind": "local", "keyring": "/var/lib/kleidi/keyring.json"}}, ("--mount", "relative"),
     "--mount relative", "--mount /etc/softhsm2.conf"),
    ({"backend": {"kind": "local", "keyringg": "/x"}}, (), "keyringg", ""),
])
def test_configs_a_static_pod_cannot_run_fail_with_the_fix(tmp_path: Path, config: dict[str, Any],
                                                           args: tuple[str, ...], message: str, fix: str) -> None:
    path = tmp_path / "config.yaml"
    server = {"endpoint": "unix:///var/run/kleidi/kleidi.sock", **config.pop("server", {})}
    path.write_text(yaml.safe_dump({"server": server, **config}))
    result = CliRunner().invoke(main, ["deploy", "static-pod", "--config", str(path), *args], env=_env())
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "fix: " in result.stderr and fix in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_relative_config_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("config.yaml").write_text("{}\n")
    result = CliRunner().invoke(main, ["deploy", "static-pod", "--config", "config.yaml"], env=_env())
    assert result.exit_code == 2 and "is relative" in result.stderr and "--config /etc/kleidi" in result.stderr
