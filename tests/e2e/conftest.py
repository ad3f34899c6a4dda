"""Fixtures for the end-to-end suite: a real etcd, real kube-apiservers, real kleidi processes."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.backend_harness import BackendUnderTest, backend_params
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


@pytest.fixture(params=backend_params())
def any_backend_cluster(request: pytest.FixtureRequest, control_plane: ControlPlane) -> Any:
    """The quickstart's set-up on each backend (tests/backend_harness.py): kleidi, then an apiserver."""
    backend: BackendUnderTest = request.param(request, control_plane.workdir)
    kleidi = control_plane.kleidi(backend=backend.config)
    api = control_plane.apiserver(config=control_plane.encryption_config(kleidi))
    return control_plane, kleidi, api, backend
