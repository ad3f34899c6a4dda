"""The plugin under test for the conformance suite, once per backend (tests/backend_harness.py); the
tests themselves only speak KMS v2 over the socket, as kube-apiserver does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.backend_harness import BackendUnderTest, backend_params
from tests.conftest import KleidiProcess


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


@pytest.fixture(params=backend_params())
def plugin(request: pytest.FixtureRequest, kleidi_factory: Any, short_dir: Path) -> Iterator[PluginUnderTest]:
    """kleidi on each backend (tests/backend_harness.py), and a peer on the same key material."""
    backend: BackendUnderTest = request.param(request, short_dir)
    proc: KleidiProcess = kleidi_factory("kleidi", create_keyring=False, backend=backend.config)

    def start_peer() -> KleidiProcess:
        peer: KleidiProcess = kleidi_factory("peer", create_keyring=False, backend=backend.config)
        return peer

    under_test = PluginUnderTest(proc=proc, rotate=backend.rotate, retire=backend.retire, start_peer=start_peer)
    yield under_test
    # Nothing secret in the log: no seed this test sent may appear in any encoding.
    log = under_test.proc.log()
    # Short values (a few bytes) occur in any log by chance; only seed-sized ones are meaningful.
    for seed in (s for s in under_test.seeds_sent if len(s) >= 16):
        for form in (seed.hex(), seed.hex().upper(), __import__("base64").b64encode(seed).decode()):
            assert form not in log, "a seed reached the log"
