"""The Vault backend against kleidi's backend conformance base, on real OpenBao servers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kleidi.backends.vault import VaultBackend, VaultBackendSettings
from kleidi.testing.backend import BackendConformance, OutageConformance
from tests.backend_harness import BackendUnderTest
from tests.vault import kleidi_vault
from tests.vault.openbao import OpenBao, unique


def backend_under_test(request: pytest.FixtureRequest, workdir: Path) -> BackendUnderTest:
    """A new Transit key on the shared OpenBao, used with a token limited to `kleidi policy vault`."""
    server: OpenBao = request.getfixturevalue("openbao")
    key = server.create_key(unique("plugin"))
    config = kleidi_vault.backend(server, key, kleidi_vault.token_auth(server, key, workdir))

    def retire(key_id: str) -> None:
        server.set_min_decryption_version(key, int(key_id.split(":")[2].removeprefix("v")) + 1)

    return BackendUnderTest(config, lambda: server.rotate_key(key) and None, retire)


class _OnAKeyOf:
    """A new Transit key on ``server`` and AppRole credentials for it; backends made on them."""

    def use(self, server: OpenBao, workdir: Path) -> None:
        self.server = server
        self.key = server.create_key(unique("conformance"), "aes256-gcm96")
        auth = kleidi_vault.approle_auth(server, self.key, workdir, token_ttl="1h")
        self.settings = VaultBackendSettings.model_validate(kleidi_vault.backend(server, self.key, auth,
                                                                                timeout="2s"))

    def make_backend(self) -> VaultBackend:
        return VaultBackend(self.settings)


class TestVaultBackend(_OnAKeyOf, BackendConformance):
    @pytest.fixture(autouse=True)
    def _key(self, openbao: OpenBao, short_dir: Path) -> None:
        self.use(openbao, short_dir)

    def rotate(self) -> None:
        self.server.rotate_key(self.key)

    def retire(self, version: int) -> None:
        self.server.set_min_decryption_version(self.key, version + 1)


class TestVaultOutage(_OnAKeyOf, OutageConformance):
    @pytest.fixture(autouse=True)
    def _key(self, fresh_openbao: OpenBao, short_dir: Path) -> None:
        self.use(fresh_openbao, short_dir)  # a server of its own: the outage stops it

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        self.server.stop()  # the server process is gone; its storage stays
        try:
            yield
        finally:
            self.server.start()
