"""The plugin under test for the conformance suite. Each backend supplies one ``plugin`` fixture
variant; the tests themselves only speak KMS v2 over the socket, as kube-apiserver does."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import KleidiProcess, run_kleidi


@dataclass
class PluginUnderTest:
    """A running kleidi plus the backend-side controls the conformance tests need."""

    proc: KleidiProcess
    rotate: Callable[[], None]
    """Make a new KEK version current in the backend."""
    retire: Callable[[str], None]
    """Make the KEK version behind a key_id unusable for decryption."""
    start_peer: Callable[[], KleidiProcess]
    """Start a second kleidi on the same key material (another control-plane node)."""
    seeds_sent: list[bytes] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.proc, name)


def _local_plugin(kleidi_factory: Any) -> PluginUnderTest:
    proc: KleidiProcess = kleidi_factory("kleidi")
    keyring = str(proc.keyring)

    def rotate() -> None:
        result = run_kleidi("rotate", "--keyring", keyring)
        assert result.returncode == 0, result.stderr

    def retire(key_id: str) -> None:
        listing = json.loads(run_kleidi("keys", "--keyring", keyring, "--output", "json").stdout)
        version = next(v["version"] for v in listing["versions"] if v["key_id"] == key_id)
        result = run_kleidi("retire", str(version), "--yes", "--keyring", keyring)
        assert result.returncode == 0, result.stderr

    def start_peer() -> KleidiProcess:
        peer: KleidiProcess = kleidi_factory("peer", keyring=proc.keyring)
        return peer

    return PluginUnderTest(proc=proc, rotate=rotate, retire=retire, start_peer=start_peer)


def _vault_plugin(kleidi_factory: Any, request: pytest.FixtureRequest) -> PluginUnderTest:
    """kleidi on a real OpenBao Transit key, logged in with a token limited to `kleidi policy vault`."""
    from tests.vault import kleidi_vault
    from tests.vault.openbao import unique

    server = request.getfixturevalue("openbao")
    key = server.create_key(unique("conformance"))
    workdir = request.getfixturevalue("short_dir")
    config = kleidi_vault.backend(server, key, kleidi_vault.token_auth(server, key, workdir))
    proc: KleidiProcess = kleidi_factory("kleidi", create_keyring=False, backend=config)

    def retire(key_id: str) -> None:
        version = int(key_id.split(":")[2].removeprefix("v"))
        server.set_min_decryption_version(key, version + 1)

    def start_peer() -> KleidiProcess:
        peer: KleidiProcess = kleidi_factory("peer", create_keyring=False, backend=config)
        return peer

    return PluginUnderTest(proc=proc, rotate=lambda: server.rotate_key(key) and None, retire=retire,
                           start_peer=start_peer)


@pytest.fixture(params=["local", "vault"])
def plugin(request: pytest.FixtureRequest, kleidi_factory: Any) -> Iterator[PluginUnderTest]:
    under_test = _local_plugin(kleidi_factory) if request.param == "local" else _vault_plugin(kleidi_factory, request)
    yield under_test
    # Nothing secret in the log: no seed this test sent may appear in any encoding.
    log = under_test.proc.log()
    # Short values (a few bytes) occur in any log by chance; only seed-sized ones are meaningful.
    for seed in (s for s in under_test.seeds_sent if len(s) >= 16):
        for form in (seed.hex(), seed.hex().upper(), __import__("base64").b64encode(seed).decode()):
            assert form not in log, "a seed reached the log"
