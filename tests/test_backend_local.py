"""The local backend against kleidi's backend conformance base (kleidi.testing.backend)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kleidi.backends.local import LocalBackend, LocalBackendSettings, create_keyring, edit_keyring
from kleidi.testing.backend import BackendConformance
from tests.backend_harness import BackendUnderTest
from tests.conftest import keygen, run_kleidi


def backend_under_test(request: pytest.FixtureRequest, workdir: Path) -> BackendUnderTest:
    """A new keyring, rotated and retired with the CLI, as docs/backends/local.md says."""
    keyring = str(workdir / "keyring.json")
    keygen(Path(keyring))

    def rotate() -> None:
        result = run_kleidi("rotate", "--keyring", keyring)
        assert result.returncode == 0, result.stderr

    def retire(key_id: str) -> None:
        listing = json.loads(run_kleidi("keys", "--keyring", keyring, "--output", "json").stdout)
        version = next(v["version"] for v in listing["versions"] if v["key_id"] == key_id)
        result = run_kleidi("retire", str(version), "--yes", "--keyring", keyring)
        assert result.returncode == 0, result.stderr

    return BackendUnderTest({"kind": "local", "keyring": keyring}, rotate, retire)


class TestLocalBackend(BackendConformance):
    @pytest.fixture(autouse=True)
    def _keyring(self, tmp_path: Path) -> None:
        self.path = tmp_path / "keyring.json"
        create_keyring(self.path)

    def make_backend(self) -> LocalBackend:
        return LocalBackend(LocalBackendSettings(keyring=self.path))

    def rotate(self) -> None:
        with edit_keyring(self.path) as ring:
            ring.rotate()

    def retire(self, version: int) -> None:
        with edit_keyring(self.path) as ring:
            ring.retire(version)
