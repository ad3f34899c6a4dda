"""The local backend against kleidi's backend conformance base (kleidi.testing.backend)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kleidi.backends.local import LocalBackend, LocalBackendSettings, create_keyring, edit_keyring
from kleidi.testing.backend import BackendConformance


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
