"""Moving a cluster from one kleidi backend to another (#14), end to end: local keyring to Vault (OpenBao),
then Vault to PKCS#11 (SoftHSM2), as docs/rotation.md "Moving to another backend" tells an operator to.

Each move: a second kleidi on the new backend on its own socket; the apiserver's EncryptionConfiguration
lists two kms providers, the new one first (it encrypts every write) and the old one second (it still
decrypts what is stored with it), under different names; ``kleidi migrate`` rewrites every Secret;
``kleidi scan --fail-if key-id=<old>`` proves etcd holds nothing on the old key; the old provider is
removed, the old kleidi stopped, and every Secret still reads. A backup taken before the moves is then
recovered with the first kleidi's config (not with the last one's), and one taken during the first move
with each kleidi's config for its provider's values. Real etcd, real kube-apiserver (the e2e
suite's, restarted on each configuration change but the last, which it takes up by its automatic reload:
that polls the file once a minute, too slow for every step), real kleidi processes, a real OpenBao server
and a real SoftHSM2 token.
"""

from __future__ import annotations

import base64
import json
import subprocess
from typing import Any

import pytest
import yaml

from kleidi.tools import migrate as mig
from tests.conftest import KleidiProcess, run_kleidi, wait_for
from tests.e2e.cluster import ETCDCTL, KubeAPIServer
from tests.e2e.conftest import ControlPlane
from tests.e2e.test_kube_apiserver import assert_reads_back, create_secrets, key_id_of, stored
from tests.test_backend_pkcs11 import backend_under_test as pkcs11_backend
from tests.vault.test_backend_vault import backend_under_test as vault_backend

pytestmark = pytest.mark.e2e

NAMESPACES = ("default", "team-a")


def encryption_config(plane: ControlPlane, file_name: str, *providers: tuple[str, KleidiProcess]) -> Any:
    """The EncryptionConfiguration ``kleidi encryption-config`` prints with one kms provider per (name, kleidi),
    in this order (the first with --name/--endpoint, the others with --previous), then identity."""
    (name, kleidi), *previous = providers
    result = run_kleidi("encryption-config", "--name", name, "--endpoint", kleidi.endpoint,
                        *[arg for old, process in previous for arg in ("--previous", f"{old}={process.endpoint}")])
    assert result.returncode == 0, result.stderr
    kinds = [next(iter(p)) for p in yaml.safe_load(result.stdout)["resources"][0]["providers"]]
    assert kinds == ["kms"] * len(providers) + ["identity"], kinds
    path = plane.workdir / file_name
    path.write_text(result.stdout)
    return path


def stored_as(plane: ControlPlane) -> dict[tuple[str, str], int]:
    """(provider name, key_id) -> how many Secrets etcd holds so, read from the raw values."""
    counts: dict[tuple[str, str], int] = {}
    for value in plane.etcd.items("/registry/secrets/").values():
        provider = value.split(b":")[4].decode()  # k8s:enc:kms:v2:<provider>:<EncryptedObject>
        key = (provider, key_id_of(value))
        counts[key] = counts.get(key, 0) + 1
    return counts


def snapshot(plane: ControlPlane, name: str) -> Any:
    path = plane.workdir / f"{name}.snapshot"
    subprocess.run([ETCDCTL, "--endpoints", plane.etcd.url, "snapshot", "save", str(path)], capture_output=True,
                   check=True)
    return path


def recovered(plane: ControlPlane, out: str) -> dict[str, dict[str, dict[str, bytes]]]:
    """namespace -> name -> data of every Secret ``kleidi recover`` wrote under ``out``."""
    found: dict[str, dict[str, dict[str, bytes]]] = {}
    for path in (plane.workdir / out / "secrets").glob("*/*.yaml"):
        obj = yaml.safe_load(path.read_text())
        found.setdefault(path.parent.name, {})[path.stem] = {k: base64.b64decode(v) for k, v in obj["data"].items()}
    return found


def reloads(api: KubeAPIServer) -> int:
    """How many times the apiserver reloaded its EncryptionConfiguration successfully (its own metric)."""
    status, text = api.get("/metrics")
    assert status == 200, text[:200]
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("apiserver_encryption_config_controller_automatic_reloads_total{")
               and 'status="success"' in line)


def scan(plane: ControlPlane, old_key_id: str, new: KleidiProcess) -> tuple[int, dict[str, Any]]:
    result = run_kleidi("scan", "--etcd-endpoints", plane.etcd.url, "--resources", "secrets", "--endpoint",
                        new.endpoint, "--fail-if", f"key-id={old_key_id}", "--output", "json")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def move(plane: ControlPlane, api: KubeAPIServer, expected: dict[str, dict[str, dict[str, bytes]]],
         old: tuple[str, KleidiProcess], new: tuple[str, KleidiProcess], step: str,
         reload: bool = False) -> KubeAPIServer:
    """One move from ``old`` to ``new`` (provider name, kleidi) as the docs describe; returns the apiserver
    left running on ``new`` alone. ``expected``: namespace -> Secret name -> data, every Secret there is."""
    (old_name, old_kleidi), (new_name, new_kleidi) = old, new
    old_key_id, new_key_id = old_kleidi.status().key_id, new_kleidi.status().key_id
    total = sum(len(names) for names in expected.values())
    assert stored_as(plane) == {(old_name, old_key_id): total}

    # 1. Both providers, the new one first: old Secrets still read, new writes go to the new backend.
    api.stop()
    api = plane.apiserver(f"{step}-both", config=encryption_config(plane, f"{step}-both.yaml", new, old))
    for namespace, secrets in expected.items():
        assert_reads_back(api, secrets, namespace)
    expected["default"].update(create_secrets(api, [f"during-{step}"]))
    assert stored(plane, f"during-{step}").startswith(f"k8s:enc:kms:v2:{new_name}:".encode())
    assert key_id_of(stored(plane, f"during-{step}")) == new_key_id
    snapshot(plane, f"{step}-during")  # a backup taken during the move: both providers' values
    code, report = scan(plane, old_key_id, new_kleidi)  # the proof can fail: here it must
    assert code == 1 and report["key_ids"] == {old_key_id: total, new_key_id: 1}, report

    # 2. kleidi migrate rewrites every Secret (and proves it with its own scan of etcd).
    result = run_kleidi("migrate", "--kubeconfig", str(api.kubeconfig), "--state-file",
                        str(plane.workdir / f"{step}.state.json"), "--etcd-endpoints", plane.etcd.url,
                        "--old-key-id", old_key_id, "--qps", "200", "--output", "json", timeout=120)
    assert result.returncode == mig.EXIT_OK, result.stdout + result.stderr
    proof = json.loads(result.stdout)["proof"]
    assert proof["passed"] and proof["left"] == 0 and proof["old_key_ids"] == [old_key_id], proof

    # 3. kleidi scan is the proof: every Secret on the new key_id, none on the old one.
    code, report = scan(plane, old_key_id, new_kleidi)
    assert code == 0 and report["key_ids"] == {new_key_id: total + 1}, report
    assert {(row["provider"], row["key_state"]) for row in report["rows"]} == {(new_name, "current")}, report
    assert stored_as(plane) == {(new_name, new_key_id): total + 1}

    # 4. The old provider removed from the config, then the old kleidi stopped: everything still reads.
    if reload:  # the apiserver's automatic reload of the file it was started with (polled once a minute)
        assert api.encryption_config is not None
        encryption_config(plane, api.encryption_config.name, new)
        wait_for(lambda: reloads(api) >= 1, 150, "the apiserver to reload its EncryptionConfiguration", interval=2)
        old_kleidi.stop()
        assert api.get("/readyz")[0] == 200, api.get("/readyz?verbose")[1]
    else:  # a restart, as without --encryption-provider-config-automatic-reload
        api.stop()
        old_kleidi.stop()
        api = plane.apiserver(f"{step}-done", config=encryption_config(plane, f"{step}-done.yaml", new))
    for namespace, secrets in expected.items():
        assert_reads_back(api, secrets, namespace)
    return api


def test_local_to_vault_to_pkcs11(request: pytest.FixtureRequest, control_plane: ControlPlane) -> None:
    plane = control_plane
    local = plane.kleidi("kleidi-local")
    api = plane.apiserver("local", config=encryption_config(plane, "local.yaml", ("kleidi-local", local)))
    api.kubectl("create", "namespace", "team-a")
    expected = {"default": create_secrets(api, [f"s{i}" for i in range(20)]),
                "team-a": create_secrets(api, ["token", "db"], namespace="team-a")}

    backup = snapshot(plane, "before-move")  # a backup taken before the move
    before = {namespace: dict(secrets) for namespace, secrets in expected.items()}

    vault = plane.kleidi("kleidi-vault", backend=vault_backend(request, plane.workdir).config)
    api = move(plane, api, expected, ("kleidi-local", local), ("kleidi-vault", vault), "to-vault")

    hsm = plane.kleidi("kleidi-hsm", backend=pkcs11_backend(request, plane.workdir).config)
    api = move(plane, api, expected, ("kleidi-vault", vault), ("kleidi-hsm", hsm), "to-hsm", reload=True)

    # The backup taken before the move is still on the old KEK: the new kleidi cannot open it, the old
    # kleidi's config (and its keyring, kept) can, with no kleidi running.
    def recover(config: Any, source: Any, out: str, *args: str) -> subprocess.CompletedProcess[str]:
        return run_kleidi("recover", "--config", str(config), "--snapshot", str(source), "--resource", "secrets",
                          "--output-dir", str(plane.workdir / out), *args, timeout=120)

    assert recover(hsm.config_path, backup, "with-new").returncode == 1
    assert not (plane.workdir / "with-new").exists()
    result = recover(local.config_path, backup, "with-old")
    assert result.returncode == 0, result.stderr
    assert recovered(plane, "with-old") == before
    # A backup taken during the first move holds values of both providers: one run per config and provider.
    during = plane.workdir / "to-vault-during.snapshot"
    result = recover(local.config_path, during, "during-local", "--provider", "kleidi-local")
    assert result.returncode == 0, result.stderr
    assert recovered(plane, "during-local") == before
    result = recover(vault.config_path, during, "during-vault", "--provider", "kleidi-vault")
    assert result.returncode == 0, result.stderr
    assert recovered(plane, "during-vault") == {"default": {"during-to-vault": expected["default"]["during-to-vault"]}}
