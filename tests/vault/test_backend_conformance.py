"""The Vault backend against kleidi's backend conformance base, on real OpenBao servers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kleidi.backends.vault import VaultBackend, VaultBackendSettings
from kleidi.testing.backend import BackendConformance, OutageConformance
from tests.vault import kleidi_vault
from tests.vault.openbao import OpenBao, unique


def _settings(server: OpenBao, key: str, workdir: Path) -> VaultBackendSettings:
    auth = kleidi_vault.approle_auth(server, key, workdir, token_ttl="1h")
    return VaultBackendSettings.model_validate(kleidi_vault.backend(server, key, auth, timeout="2s"))


class TestVaultBackend(BackendConformance):
    @pytest.fixture(autouse=True)
    def _key(self, openbao: OpenBao, short_dir: Path) -> None:
        self.server = openbao
        self.key = openbao.create_key(unique("conformance"), "aes256-gcm96")
        self.settings = _settings(openbao, self.key, short_dir)

    def make_backend(self) -> VaultBackend:
        return VaultBackend(self.settings)

    def rotate(self) -> None:
        self.server.rotate_key(self.key)

    def retire(self, version: int) -> None:
        self.server.set_min_decryption_version(self.key, version + 1)


class TestVaultOutage(OutageConformance):
    @pytest.fixture(autouse=True)
    def _key(self, fresh_openbao: OpenBao, short_dir: Path) -> None:
        self.server = fresh_openbao
        self.key = fresh_openbao.create_key(unique("outage"), "aes256-gcm96")
        self.settings = _settings(fresh_openbao, self.key, short_dir)

    def make_backend(self) -> VaultBackend:
        return VaultBackend(self.settings)

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        self.server.stop()  # the server process is gone; its storage stays
        try:
            yield
        finally:
            self.server.start()
