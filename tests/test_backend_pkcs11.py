"""The PKCS#11 backend on SoftHSM2 tokens: kleidi's backend conformance base, the token's failure modes,
the `kleidi pkcs11` commands, and the hook that runs the plugin suites (tests/conformance, tests/e2e) on it.

Each test gets a token of its own: a softhsm2.conf naming a fresh token directory, in SOFTHSM2_CONF for
this process (the backend re-initialises the library when it cannot find its token, so it sees the new
one) and for every kleidi subprocess (they inherit the environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pkcs11 import Attribute, KeyType

from kleidi.backends.pkcs11 import Pkcs11Backend, Pkcs11BackendSettings, _Library
from kleidi.checks import FAIL, PASS
from kleidi.cli_support import load
from kleidi.errors import BackendUnavailable, ConfigError, DecryptionFailed, InvalidValue, KeyringError, RetiredKey
from kleidi.testing.backend import AAD, BackendConformance, OutageConformance
from tests.backend_harness import BackendUnderTest
from tests.conftest import run_kleidi

SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")
SO_PIN, USER_PIN = "so-secret-4711", "user-secret-0815"
DOCS = Path(__file__).parents[1] / "docs" / "backends" / "pkcs11.md"


@dataclass
class SoftToken:
    """A fresh SoftHSM2 token in a directory of its own, and a PIN file for it."""

    root: Path
    label: str

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    @property
    def pin_file(self) -> Path:
        return self.root / "pin"

    @classmethod
    def create(cls, root: Path, monkeypatch: pytest.MonkeyPatch) -> SoftToken:
        token = cls(root, f"kleidi-{uuid.uuid4().hex[:8]}")
        token.tokens.mkdir(parents=True)
        conf = root / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {token.tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
        monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", token.label, "--so-pin", SO_PIN,
                        "--pin", USER_PIN], check=True, capture_output=True)
        # A token was just plugged in: the previous test's wait between re-initialisations is over.
        _Library.of(SOFTHSM)._hold_off_until = 0.0
        token.pin_file.write_text(USER_PIN + "\n")
        token.pin_file.chmod(0o600)
        return token

    def config(self, **overrides: Any) -> dict[str, Any]:
        return {"kind": "pkcs11", "library": str(SOFTHSM), "token_label": self.label,
                "pin_file": str(self.pin_file), **overrides}

    def settings(self, **overrides: Any) -> Pkcs11BackendSettings:
        return Pkcs11BackendSettings.model_validate(self.config(**overrides))

    def backend(self, **overrides: Any) -> Pkcs11Backend:
        return Pkcs11Backend(self.settings(**overrides))

    def admin(self, **overrides: Any) -> Pkcs11Backend:
        """What `kleidi pkcs11 rotate/retire` use, in this process (a backend never started)."""
        return self.backend(**overrides)

    def rotate(self, **overrides: Any) -> int:
        admin = self.admin(**overrides)
        try:
            return admin.create_version().version
        finally:
            admin.close_blocking()

    def retire(self, version: int) -> None:
        admin = self.admin()
        try:
            admin.retire_version(version)
        finally:
            admin.close_blocking()

    def session(self) -> Any:
        """A session of this process on the token, logged in (for tests that make keys by hand)."""
        token = _Library.of(SOFTHSM).module().get_token(token_label=self.label)
        return token.open(rw=True)

    @contextlib.contextmanager
    def gone(self) -> Iterator[None]:
        """The token's directory is moved away and back: to the library, the token is unplugged."""
        away = self.root / "tokens.away"
        self.tokens.rename(away)
        try:
            yield
        finally:
            away.rename(self.tokens)


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftToken:
    return SoftToken.create(tmp_path, monkeypatch)


def _write_config(token: SoftToken, path: Path, **overrides: Any) -> Path:
    path.write_text(yaml.safe_dump({"backend": token.config(**overrides)}))
    return path


def backend_under_test(request: pytest.FixtureRequest, workdir: Path) -> BackendUnderTest:
    """A new SoftHSM2 token with v1 made by `kleidi pkcs11 rotate`, rotated and retired with the CLI, as
    docs/backends/pkcs11.md says."""
    token = SoftToken.create(workdir / f"hsm-{uuid.uuid4().hex[:6]}", request.getfixturevalue("monkeypatch"))
    config = _write_config(token, token.root / "admin.yaml")

    def rotate() -> None:
        result = run_kleidi("pkcs11", "rotate", "--config", str(config))
        assert result.returncode == 0, result.stderr

    def retire(key_id: str) -> None:
        listing = json.loads(run_kleidi("pkcs11", "keys", "--config", str(config), "--output", "json").stdout)
        version = next(v["version"] for v in listing["versions"] if v["key_id"] == key_id)
        result = run_kleidi("pkcs11", "retire", str(version), "--yes", "--config", str(config))
        assert result.returncode == 0, result.stderr

    rotate()
    return BackendUnderTest(token.config(), rotate, retire)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _use(backend: Pkcs11Backend, seed: bytes = b"s" * 32) -> bytes:
    try:
        key = (await backend.load_keys(force=True)).current
        return await backend.unwrap(key, await backend.wrap(key, seed, AAD), AAD)
    finally:
        await backend.close()


class _OnAFreshToken:
    mechanism = "aes_gcm"

    @pytest.fixture(autouse=True)
    def _token(self, token: SoftToken) -> None:
        self.token = token
        token.rotate(mechanism=self.mechanism)

    def make_backend(self) -> Pkcs11Backend:
        return self.token.backend(mechanism=self.mechanism)

    def rotate(self) -> None:
        self.token.rotate(mechanism=self.mechanism)

    def retire(self, version: int) -> None:
        self.token.retire(version)


class TestPkcs11GcmBackend(_OnAFreshToken, BackendConformance):
    """CKM_AES_GCM on the token, the default."""


class TestPkcs11KeyWrapBackend(_OnAFreshToken, BackendConformance):
    """CKM_AES_KEY_WRAP_PAD of a data key that seals the seed in software (tokens without GCM)."""

    mechanism = "aes_key_wrap_pad"


class TestPkcs11Outage(_OnAFreshToken, OutageConformance):
    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        with self.token.gone():
            yield


# -- the token's failure modes: each with the error and fix the docs list ------------------------------


def test_a_wrong_pin_is_a_config_error_that_names_where_the_pin_comes_from(token: SoftToken) -> None:
    token.rotate()
    _Library.of(SOFTHSM).reset(_Library.of(SOFTHSM).generation)  # log this process out
    token.pin_file.write_text("not-the-pin")
    with pytest.raises(ConfigError) as caught:
        _run(_use(token.backend()))
    assert "refused the user PIN" in caught.value.message and str(token.pin_file) in (caught.value.fix or "")
    assert "not-the-pin" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:  # the token is not asked again: it would lock the PIN
        _run(_use(token.backend()))
    assert "refused the user PIN before" in caught.value.message
    token.pin_file.write_text(USER_PIN)
    assert _run(_use(token.backend())) == b"s" * 32


def test_a_pin_file_readable_by_others_is_refused(token: SoftToken) -> None:
    token.rotate()
    _Library.of(SOFTHSM).reset(_Library.of(SOFTHSM).generation)
    token.pin_file.chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        _run(_use(token.backend()))
    assert "readable by others" in caught.value.message and caught.value.fix == f"chmod 600 {token.pin_file}"


def test_the_pin_may_come_from_an_environment_variable(token: SoftToken, monkeypatch: pytest.MonkeyPatch) -> None:
    token.rotate()
    monkeypatch.setenv("TEST_HSM_PIN", USER_PIN)
    assert _run(_use(token.backend(pin_file=None, pin_env="TEST_HSM_PIN"))) == b"s" * 32


def test_a_token_without_the_key_says_how_to_create_it(token: SoftToken) -> None:
    with pytest.raises(KeyringError) as caught:
        _run(_use(token.backend()))
    assert "no usable version of key kleidi-kek" in caught.value.message
    assert "kleidi pkcs11 rotate" in (caught.value.fix or "")


def test_a_missing_token_lists_the_tokens_the_library_sees(token: SoftToken) -> None:
    with pytest.raises(ConfigError) as caught:
        _run(_use(token.backend(token_label="no-such-token")))
    assert "no token 'no-such-token'" in caught.value.message and repr(token.label) in caught.value.message


def test_a_library_that_does_not_load_is_a_config_error(token: SoftToken, tmp_path: Path) -> None:
    not_a_module = tmp_path / "libnot.so"
    not_a_module.write_text("not an ELF file")
    for path in (not_a_module, tmp_path / "missing.so"):
        with pytest.raises(ConfigError) as caught:
            _run(_use(token.backend(library=str(path))))
        assert str(path) in caught.value.message and caught.value.fix


def _hand_made_key(token: SoftToken, version: int, template: dict[Attribute, Any] | None = None) -> None:
    session = token.session()
    try:
        attributes = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True,
                      Attribute.ENCRYPT: True, Attribute.DECRYPT: True}
        attributes.update(template or {})
        session.generate_key(KeyType.AES, 256, label=f"kleidi-kek/v{version}", id=os.urandom(16), store=True,
                             template=attributes)
    finally:
        session.close()


def test_an_extractable_key_is_refused_unless_allowed(token: SoftToken) -> None:
    token.rotate()
    _hand_made_key(token, 2, {Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False})
    with pytest.raises(KeyringError) as caught:
        _run(_use(token.backend()))
    assert "kleidi-kek/v2 is extractable or not sensitive" in caught.value.message
    assert "allow_extractable" in (caught.value.fix or "")
    assert _run(_use(token.backend(allow_extractable=True))) == b"s" * 32


def test_an_admin_made_version_is_adopted_as_current(token: SoftToken) -> None:
    token.rotate()

    async def scenario(backend: Pkcs11Backend) -> None:
        first = (await backend.load_keys(force=True)).current
        payload = await backend.wrap(first, b"k" * 32, AAD)
        _hand_made_key(token, 7)
        keys = await backend.load_keys(force=True)
        assert keys.current.version == 7 and first.key_id in keys.usable
        assert await backend.unwrap(first, payload, AAD) == b"k" * 32
        assert await backend.unwrap(keys.current, await backend.wrap(keys.current, b"n" * 32, AAD), AAD) == b"n" * 32
        await backend.close()

    _run(scenario(token.backend()))
    assert token.rotate() == 8  # the next version is past every one on the token


def test_a_key_recreated_under_the_same_label_gets_a_new_key_id(token: SoftToken) -> None:
    token.rotate()
    backend = token.backend()
    before = _run(backend.load_keys(force=True)).current
    session = token.session()
    for key in session.get_objects({Attribute.LABEL: "kleidi-kek/v1"}):
        key.destroy()
    session.close()
    _hand_made_key(token, 1)
    after = _run(backend.load_keys(force=True)).current
    _run(backend.close())
    assert after.version == before.version == 1 and after.key_id != before.key_id


def test_the_backend_logs_in_again_after_a_logout(token: SoftToken) -> None:
    token.rotate()

    async def scenario(backend: Pkcs11Backend) -> None:
        key = (await backend.load_keys(force=True)).current
        payload = await backend.wrap(key, b"a" * 32, AAD)
        library = _Library.of(SOFTHSM)
        login = library.login_session(backend._token)
        login.close()  # C_Logout: every session of the process on this token is logged out
        assert await backend.unwrap(key, payload, AAD) == b"a" * 32
        assert library.login_session(backend._token) is not login
        await backend.close()

    _run(scenario(token.backend(sessions=2)))


def test_a_payload_of_one_mechanism_decrypts_under_the_other(token: SoftToken) -> None:
    token.rotate()
    session = token.session()  # a key usable both ways, as an admin may create it
    for key in session.get_objects({Attribute.LABEL: "kleidi-kek/v1"}):
        key.destroy()
    session.close()
    _hand_made_key(token, 1, {Attribute.WRAP: True, Attribute.UNWRAP: True})

    async def scenario() -> None:
        gcm, wrap = token.backend(), token.backend(mechanism="aes_key_wrap_pad")
        key = (await gcm.load_keys(force=True)).current
        assert (await wrap.load_keys(force=True)).current == key
        assert await wrap.unwrap(key, await gcm.wrap(key, b"g" * 32, AAD), AAD) == b"g" * 32
        assert await gcm.unwrap(key, await wrap.wrap(key, b"w" * 32, AAD), AAD) == b"w" * 32
        with pytest.raises(DecryptionFailed):
            await gcm.unwrap(key, await wrap.wrap(key, b"w" * 32, AAD), AAD + b"x")
        await gcm.close()
        await wrap.close()

    _run(scenario())


def test_an_outage_before_the_first_load_is_unavailable_not_a_config_error(token: SoftToken) -> None:
    token.rotate()
    _Library.of(SOFTHSM).reset(_Library.of(SOFTHSM).generation)
    with token.gone(), pytest.raises(BackendUnavailable):
        _run(_use(token.backend()))


def test_a_version_retired_since_the_last_refresh_is_reported_retired(token: SoftToken) -> None:
    token.rotate()
    token.rotate()

    async def scenario(backend: Pkcs11Backend) -> None:
        keys = await backend.load_keys(force=True)
        first = next(k for k in keys.usable.values() if k.version == 1)
        payload = await backend.wrap(first, b"r" * 32, AAD)
        token.retire(1)  # on the token; this backend has not refreshed yet
        with pytest.raises(RetiredKey):
            await backend.unwrap(first, payload, AAD)
        await backend.close()

    _run(scenario(token.backend()))


def test_the_session_pool_is_the_worker_pool(token: SoftToken) -> None:
    token.rotate()
    backend = token.backend(sessions=3)
    assert backend._workers == 3  # one session per worker thread: no call waits for a session it cannot get

    async def scenario() -> None:
        key = (await backend.load_keys(force=True)).current
        await asyncio.gather(*(backend.wrap(key, b"p" * 32, AAD) for _ in range(50)))
        assert len(backend._idle) <= 3
        await backend.close()

    _run(scenario())


def test_settings_need_one_token_selector_and_one_pin_source(token: SoftToken) -> None:
    for overrides in ({"token_serial": "123"}, {"token_label": None}, {"pin_env": "PIN"}, {"pin_file": None},
                      {"pin_file": None, "pin_env": "1234"}):
        with pytest.raises(ValueError) as caught:
            token.settings(**overrides)
        assert "1234" not in str(caught.value)
    with pytest.raises(ValueError):
        token.settings(key_label="")
    assert issubclass(InvalidValue, ValueError)


# -- the CLI --------------------------------------------------------------------------------------------


def test_rotate_keys_and_retire_through_the_cli_and_a_second_process_agrees(token: SoftToken,
                                                                           tmp_path: Path) -> None:
    config = str(_write_config(token, tmp_path / "config.yaml"))
    for expected in ("v1", "v2", "v3"):
        result = run_kleidi("pkcs11", "rotate", "--config", config)
        assert result.returncode == 0, result.stderr
        assert f"kleidi-kek/{expected} on the token" in result.stdout
    listing = json.loads(run_kleidi("pkcs11", "keys", "--config", config, "-o", "json").stdout)
    assert [(v["version"], v["state"], v["current"]) for v in listing["versions"]] == [
        (1, "active", False), (2, "active", False), (3, "active", True)]

    backend = token.backend()  # this process, on the same token: the same key_ids
    keys = _run(backend.load_keys(force=True))
    assert set(keys.usable) == {v["key_id"] for v in listing["versions"]}
    assert keys.current.key_id == listing["versions"][2]["key_id"]
    payload = _run(backend.wrap(keys.usable[listing["versions"][0]["key_id"]], b"r" * 32, AAD))

    refused = run_kleidi("pkcs11", "retire", "3", "--yes", "--config", config)
    assert refused.returncode != 0 and "version 3 is current" in refused.stderr
    assert run_kleidi("pkcs11", "retire", "v1", "--config", config).returncode != 0  # no --yes, no terminal
    result = run_kleidi("pkcs11", "retire", "v1", "--yes", "--config", config)
    assert result.returncode == 0, result.stderr
    again = run_kleidi("pkcs11", "retire", "1", "--yes", "--config", config)
    assert again.returncode != 0 and "already retired" in again.stderr

    keys = _run(backend.load_keys(force=True))
    first = listing["versions"][0]["key_id"]
    assert first in keys.retired and first not in keys.usable
    with pytest.raises(RetiredKey):
        _run(backend.unwrap(keys.retired[first], payload, AAD))
    _run(backend.close())
    assert "kleidi-kek/v4 on the token" in run_kleidi("pkcs11", "rotate", "--config", config).stdout
    table = run_kleidi("pkcs11", "keys", "--config", config).stdout
    assert re.search(r"v1\s.*retired", table) and "v4" in table


def test_the_local_key_commands_point_at_the_pkcs11_ones(token: SoftToken, tmp_path: Path) -> None:
    config = str(_write_config(token, tmp_path / "config.yaml"))
    for command, hint in (("rotate", "kleidi pkcs11 rotate"), ("keys", "kleidi pkcs11 keys"),
                          ("keygen", "kleidi pkcs11 rotate")):
        result = run_kleidi(command, "--config", config)
        assert result.returncode != 0 and hint in result.stderr, result.stderr
    result = run_kleidi("retire", "2", "--yes", "--config", config)
    assert "kleidi pkcs11 retire 2" in result.stderr


def test_doctor_checks_the_pin_file_and_the_library(token: SoftToken, tmp_path: Path) -> None:
    checks = {c.name: c for c in Pkcs11Backend.file_checks(token.settings())}
    assert checks["PIN file"].result == PASS and checks["PKCS#11 library"].result == PASS
    token.pin_file.chmod(0o640)
    checks = {c.name: c for c in Pkcs11Backend.file_checks(token.settings(library=str(tmp_path / "none.so")))}
    assert checks["PIN file"].result == FAIL and checks["PKCS#11 library"].result == FAIL


# -- the docs page --------------------------------------------------------------------------------------


def test_the_docs_config_examples_load(tmp_path: Path) -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.S)
    configs = [block for block in blocks if "kind: pkcs11" in block]
    assert configs
    for number, block in enumerate(configs):
        path = tmp_path / f"config-{number}.yaml"
        path.write_text(block)
        settings = load(path)
        assert settings.backend.kind == "pkcs11"


def test_the_docs_list_every_error_the_backend_can_raise() -> None:
    source = (Path(__file__).parents[1] / "src" / "kleidi" / "backends" / "pkcs11.py").read_text()
    page = DOCS.read_text()
    for phrase in ("refused the user PIN", "refused the user PIN before",
                   "has no usable version of key", "is extractable or not sensitive",
                   "has no CKA_ID", "no token", "cannot load", "failed to initialise", "is not an AES-256 key",
                   "has two key objects labelled", "does not support", "the user PIN is", "has no user PIN yet"):
        assert phrase in source, phrase
        assert phrase in page, phrase


