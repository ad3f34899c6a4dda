"""kleidi's errors on the request path: each maps to a gRPC code, and none keeps a seed alive.

An exception's traceback keeps every frame it passed through alive, with their locals: the request,
the seed, the token. An error raised as one shared instance (a module-level constant) gathers the
traceback of every raise and keeps those frames for the life of the process. These tests fail a
call on each backend in the ways a request can fail, drop every reference the test holds, and look
through every exception object still alive for the seed.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import os
import pkgutil
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import kleidi
from kleidi.backends.base import Backend
from kleidi.backends.local import LocalBackend, LocalBackendSettings, create_keyring, edit_keyring
from kleidi.backends.vault import VaultBackendSettings
from kleidi.errors import BackendUnavailable, DecryptionFailed, KleidiError, RetiredKey
from kleidi.service.grpc_api import grpc_code
from tests.vault import kleidi_vault
from tests.vault.openbao import OpenBao, unique


def _every_kleidi_error() -> Iterator[type[KleidiError]]:
    for module in pkgutil.walk_packages(kleidi.__path__, "kleidi."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)  # the test environment has every extra

    def walk(cls: type[KleidiError]) -> Iterator[type[KleidiError]]:
        yield cls
        for sub in cls.__subclasses__():
            yield from walk(sub)

    yield from walk(KleidiError)


def test_every_kleidi_error_class_has_a_grpc_code() -> None:
    classes = {cls for cls in _every_kleidi_error() if cls is not KleidiError}
    assert len(classes) >= 10, classes  # the walk found the tree, including the backends' own errors
    internal = sorted(cls.__qualname__ for cls in classes
                      if grpc_code(cls.__new__(cls)) == grpc.StatusCode.INTERNAL)
    assert not internal, f"no gRPC code (they would be INTERNAL): {internal}"


def _frames(tb: types.TracebackType | None) -> Iterator[types.FrameType]:
    while tb is not None:
        frame: types.FrameType | None = tb.tb_frame
        while frame is not None:  # the frames it was called from stay alive too
            yield frame
            frame = frame.f_back
        tb = tb.tb_next


def _holds(value: Any, seed: bytes, depth: int = 0) -> bool:
    if isinstance(value, bytes | bytearray | memoryview):
        return seed in bytes(value)
    if depth < 3 and isinstance(value, list | tuple | set | frozenset):
        return any(_holds(item, seed, depth + 1) for item in value)
    if depth < 3 and isinstance(value, dict):
        return any(_holds(item, seed, depth + 1) for item in value.values())
    return False


def _exceptions_holding(seed: bytes) -> list[str]:
    gc.collect()
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, BaseException):
            for frame in _frames(obj.__traceback__):
                names = [name for name, value in frame.f_locals.items() if _holds(value, seed)]
                if names:
                    found.append(f"{type(obj).__name__} ({obj}) keeps {frame.f_code.co_qualname}'s {names} alive")
    return found


async def _fail_calls(backend: Backend, seed: bytes, failures: int = 3) -> list[type[BaseException]]:
    """Wrap ``seed``, then fail Decrypt in every way a request can; returns what was raised."""
    key_set = await backend.load_keys()
    key = key_set.current
    payload = await backend.wrap(key, seed, b"aad")
    raised: list[type[BaseException]] = []
    for attempt in range(failures):
        for bad_payload, aad in ((payload, b"other aad"), (payload[:-1] + bytes([payload[-1] ^ 1]), b"aad")):
            try:
                await backend.unwrap(key, bad_payload, aad + str(attempt).encode())
            except KleidiError as exc:
                raised.append(type(exc))
    return raised


def test_no_failed_local_call_keeps_the_seed_alive(tmp_path: Path) -> None:
    keyring = tmp_path / "keyring.json"
    create_keyring(keyring)
    backend = LocalBackend(LocalBackendSettings(keyring=keyring))
    seed = os.urandom(32)

    async def scenario() -> list[type[BaseException]]:
        raised = await _fail_calls(backend, seed)
        retired = (await backend.load_keys()).current
        with edit_keyring(keyring) as ring:
            ring.rotate()
            ring.retire(retired.version)
        await backend.load_keys(force=True)
        for _ in range(3):
            try:
                await backend.wrap(retired, seed, b"aad")
            except RetiredKey as exc:
                raised.append(type(exc))
        return raised

    raised = asyncio.run(scenario())
    assert set(raised) == {DecryptionFailed, RetiredKey}
    assert _exceptions_holding(seed) == []


def test_no_failed_vault_call_keeps_the_seed_alive(openbao: OpenBao, transit_key: str, short_dir: Path) -> None:
    """Against real OpenBao: a policy that allows encrypt but not decrypt gives kleidi's 'denied'
    error on every Decrypt, the error that used to be one shared instance."""
    encrypt_only = openbao.write_policy(unique("encrypt-only"), f"""
path "transit/encrypt/{transit_key}" {{ capabilities = ["update"] }}
path "transit/keys/{transit_key}" {{ capabilities = ["read"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
""")
    auth = kleidi_vault.approle_auth(openbao, transit_key, short_dir, policies=[encrypt_only], token_ttl="1h")
    settings = VaultBackendSettings.model_validate(kleidi_vault.backend(openbao, transit_key, auth))
    from kleidi.backends.vault import VaultBackend

    seed = os.urandom(32)

    async def scenario() -> list[type[BaseException]]:
        backend = VaultBackend(settings)
        try:
            return await _fail_calls(backend, seed)
        finally:
            await backend.close()

    raised = asyncio.run(scenario())
    assert raised and set(raised) == {BackendUnavailable}
    assert _exceptions_holding(seed) == []


def test_the_check_finds_a_seed_kept_by_a_shared_exception_instance() -> None:
    """The check itself: the pattern the Vault backend used to have is caught."""
    shared = BackendUnavailable("denied")
    seed = os.urandom(32)

    def request(plaintext: bytes) -> None:
        raise shared

    with pytest.raises(BackendUnavailable):
        request(seed)
    assert _exceptions_holding(seed), "a shared instance's traceback keeps the request frame alive"
    shared.__traceback__ = None
    assert _exceptions_holding(seed) == []
