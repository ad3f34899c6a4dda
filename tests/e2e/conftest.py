"""Fixtures for the end-to-end suite: a real etcd, real kube-apiservers, real kleidi processes."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KleidiProcess, keygen, run_kleidi
from tests.e2e.cluster import Etcd, KubeAPIServer, kube_apiserver_binary

PROVIDER = "kleidi"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def apiserver_binary() -> str:
    return kube_apiserver_binary()


class ControlPlane:
    """One etcd plus whatever kleidi and kube-apiserver processes a test starts; all stopped at the end."""

    def __init__(self, workdir: Path, binary: str) -> None:
        self.workdir = workdir
        self.binary = binary
        self.etcd = Etcd(workdir).start()
        self.kleidis: list[KleidiProcess] = []
        self.apiservers: list[KubeAPIServer] = []

    def kleidi(self, name: str = "kleidi", keyring: Path | None = None, start: bool = True,
               backend: dict[str, Any] | None = None) -> KleidiProcess:
        """A kleidi as the quickstart runs it (refresh tightened so rotations show up fast)."""
        proc = KleidiProcess(self.workdir, name, keyring=keyring, backend=backend)
        if backend is None and not proc.keyring.exists():
            keygen(proc.keyring)
        self.kleidis.append(proc)
        return proc.start() if start else proc

    def encryption_config(self, kleidi: KleidiProcess, resources: str = "secrets",
                          name: str = "encryption-config.yaml") -> Path:
        """The EncryptionConfiguration exactly as `kleidi encryption-config` prints it for users."""
        result = run_kleidi("encryption-config", "--name", PROVIDER, "--endpoint", kleidi.endpoint,
                            "--resources", resources)
        assert result.returncode == 0, result.stderr
        path = self.workdir / f"{kleidi.config_path.stem}-{name}"
        path.write_text(result.stdout)
        return path

    def apiserver(self, name: str = "apiserver", config: Path | None = None, start: bool = True,
                  wait: bool = True) -> KubeAPIServer:
        server = KubeAPIServer(self.workdir, name, self.etcd, self.binary, config, automatic_reload=True)
        self.apiservers.append(server)
        if start:
            server.start(wait=wait)
        return server

    def stop_all(self) -> None:
        for server in self.apiservers:
            server.stop()
        for proc in self.kleidis:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.proc.kill()
                proc.proc.wait()
        self.etcd.stop()


@pytest.fixture
def control_plane(apiserver_binary: str) -> Iterator[ControlPlane]:
    workdir = Path(tempfile.mkdtemp(prefix="kl-e2e-", dir="/tmp"))
    workdir.chmod(0o700)
    plane = ControlPlane(workdir, apiserver_binary)
    try:
        yield plane
    finally:
        plane.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def cluster(control_plane: ControlPlane) -> Any:
    """The quickstart's set-up: one kleidi, one kube-apiserver encrypting Secrets through it."""
    kleidi = control_plane.kleidi()
    api = control_plane.apiserver(config=control_plane.encryption_config(kleidi))
    return control_plane, kleidi, api


@dataclass
class KEKControls:
    """Backend-side KEK operations: rotate to a new version; retire the version behind a key_id."""

    rotate: Callable[[], None]
    retire: Callable[[str], None]


@pytest.fixture(params=["local", "vault"])
def any_backend_cluster(request: pytest.FixtureRequest, control_plane: ControlPlane) -> Any:
    """The quickstart's set-up with the local backend, and again with a real OpenBao Transit key."""
    if request.param == "local":
        kleidi = control_plane.kleidi()
        keyring = str(kleidi.keyring)

        def retire_local(key_id: str) -> None:
            listing = json.loads(run_kleidi("keys", "--keyring", keyring, "--output", "json").stdout)
            version = next(v["version"] for v in listing["versions"] if v["key_id"] == key_id)
            assert run_kleidi("retire", str(version), "--yes", "--keyring", keyring).returncode == 0

        controls = KEKControls(rotate=lambda: _ok(run_kleidi("rotate", "--keyring", keyring)), retire=retire_local)
    else:
        from tests.vault import kleidi_vault
        from tests.vault.openbao import unique

        server = request.getfixturevalue("openbao")
        key = server.create_key(unique("e2e"))
        kleidi = control_plane.kleidi(backend=kleidi_vault.backend(
            server, key, kleidi_vault.token_auth(server, key, control_plane.workdir)))
        controls = KEKControls(
            rotate=lambda: server.rotate_key(key) and None,
            retire=lambda key_id: server.set_min_decryption_version(key, int(key_id.split(":")[2][1:]) + 1))
    api = control_plane.apiserver(config=control_plane.encryption_config(kleidi))
    return control_plane, kleidi, api, controls


def _ok(result: Any) -> None:
    assert result.returncode == 0, result.stderr
