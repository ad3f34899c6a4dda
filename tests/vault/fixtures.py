"""Fixtures for the Vault/OpenBao transit backend tests: real OpenBao servers (see openbao.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import private_dir

from .openbao import LocalCA, OpenBao, unique


@contextmanager
def _running_server() -> Iterator[OpenBao]:
    server = OpenBao()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBao]:
    """One OpenBao server for the whole session (initialised, unsealed, active). Do not stop it in tests:
    use ``fresh_openbao`` for that. Give everything you create a unique name (``unique()``)."""
    with _running_server() as server:
        yield server


@pytest.fixture
def fresh_openbao() -> Iterator[OpenBao]:
    """A separate OpenBao server for this test only: stop/kill/restart/seal it at will."""
    with _running_server() as server:
        yield server


@pytest.fixture
def transit_key(openbao: OpenBao) -> str:
    """A uniquely named aes256-gcm96 key on the session server's ``transit/`` mount."""
    return openbao.create_key(unique("kleidi"), "aes256-gcm96")


@pytest.fixture
def pki_dir() -> Iterator[Path]:
    """A short private directory (mode 0700) for certificates and keys."""
    with private_dir("kl-pki-") as path:
        yield path


@pytest.fixture
def client_ca(pki_dir: Path) -> LocalCA:
    """A test CA (separate from the server's) for TLS client certificates: ``client_ca.issue_client()``."""
    return LocalCA(pki_dir, "client-ca", common_name="kleidi test client CA")
