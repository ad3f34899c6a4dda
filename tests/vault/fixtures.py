"""Fixtures for the Vault/OpenBao transit backend tests: real OpenBao servers (see openbao.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .openbao import LocalCA, OpenBao, unique


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBao]:
    """One OpenBao server for the whole session (initialised, unsealed, active). Do not stop it in tests:
    use ``fresh_openbao`` for that. Give everything you create a unique name (``unique()``)."""
    server = OpenBao()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def fresh_openbao() -> Iterator[OpenBao]:
    """A separate OpenBao server for this test only: stop/kill/restart/seal it at will."""
    server = OpenBao()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def transit_key(openbao: OpenBao) -> str:
    """A uniquely named aes256-gcm96 key on the session server's ``transit/`` mount."""
    return openbao.create_key(unique("kleidi"), "aes256-gcm96")


@pytest.fixture
def pki_dir() -> Iterator[Path]:
    """A short private directory (mode 0700) for certificates and keys."""
    path = Path(tempfile.mkdtemp(prefix="kl-pki-", dir="/tmp"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def client_ca(pki_dir: Path) -> LocalCA:
    """A test CA (separate from the server's) for TLS client certificates: ``client_ca.issue_client()``."""
    return LocalCA(pki_dir, "client-ca", common_name="kleidi test client CA")
