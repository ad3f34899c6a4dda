"""The TPM backend against real software TPMs (swtpm): the conformance bases, reboots, a cleared TPM,
PCR binding, enrolment of a second node, and the plugin-level suites (through backend_under_test)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from kleidi.backends.base import Backend
from kleidi.backends.tpm import TpmBackend, TpmBackendSettings
from kleidi.errors import BackendUnavailable, ConfigError, DecryptionFailed, KeyringError, RetiredKey
from kleidi.testing.backend import AAD, BackendConformance, OutageConformance
from tests.backend_harness import BackendUnderTest
from tests.conftest import run_kleidi
from tests.tpm.node import Node
from tests.tpm.swtpm import SWTPM, Swtpm

pytestmark = pytest.mark.skipif(SWTPM is None, reason="swtpm is not installed (scripts/system-packages.sh)")

DOCS = Path(__file__).parents[1] / "docs" / "backends" / "tpm.md"


def backend_under_test(request: pytest.FixtureRequest, workdir: Path) -> BackendUnderTest:
    """A swtpm of its own and a key store made, rotated and retired with the `kleidi tpm` CLI."""
    swtpm = Swtpm(workdir / "swtpm").start()
    request.addfinalizer(swtpm.stop)
    config = {"kind": "tpm", "tcti": swtpm.tcti, "key_store": str(workdir / "tpm-keystore.json")}
    config_file = workdir / "kleidi-tpm-cli.yaml"
    config_file.write_text(yaml.safe_dump({"backend": config}))

    def kleidi_tpm(*args: str) -> str:
        result = run_kleidi("tpm", *args, "--config", str(config_file))
        assert result.returncode == 0, result.stderr
        return result.stdout

    kleidi_tpm("init")

    def retire(key_id: str) -> None:
        listing = json.loads(kleidi_tpm("keys", "--output", "json"))
        version = next(v["version"] for v in listing["versions"] if v["key_id"] == key_id)
        kleidi_tpm("retire", str(version), "--yes")

    return BackendUnderTest(config, lambda: kleidi_tpm("rotate") and None, retire)


@pytest.fixture
def swtpms(short_dir: Path) -> Iterator[Callable[[str], Swtpm]]:
    """Start swtpm instances (each on its own state directory and free ports); all stopped at the end."""
    started: list[Swtpm] = []

    def start(name: str) -> Swtpm:
        started.append(Swtpm(short_dir / f"swtpm-{name}").start())
        return started[-1]

    yield start
    for swtpm in started:
        swtpm.stop()


@pytest.fixture
def nodes(swtpms: Callable[[str], Swtpm], short_dir: Path) -> Callable[..., Node]:
    def make(name: str, **settings: object) -> Node:
        return Node(short_dir / f"node-{name}", swtpms(name), **settings)

    return make


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _wrap(backend: Backend, seed: bytes) -> tuple[object, bytes]:
    key = (await backend.load_keys(force=True)).current
    return key, await backend.wrap(key, seed, AAD)


async def _unwrap(backend: Backend, key: object, payload: bytes) -> bytes:
    try:
        keys = await backend.load_keys(force=True)
        return await backend.unwrap(keys.usable.get(key.key_id, key), payload, AAD)  # type: ignore[attr-defined]
    finally:
        await backend.close()


# -- the conformance bases -------------------------------------------------------------------------


class _OnANode:
    settings: dict[str, object] = {}

    @pytest.fixture(autouse=True)
    def _node(self, nodes: Callable[..., Node]) -> None:
        self.node = nodes("a", **self.settings).init()

    def make_backend(self) -> TpmBackend:
        return self.node.backend()

    def rotate(self) -> None:
        self.node.kleidi_tpm("rotate")

    def retire(self, version: int) -> None:
        self.node.kleidi_tpm("retire", str(version), "--yes")


class TestTpmBackend(_OnANode, BackendConformance):
    """AES-256 keys inside the TPM (EncryptDecrypt2, CFB) encrypt each seed's data key."""


class TestTpmBackendRsaOaep(_OnANode, BackendConformance):
    """RSA-2048 keys (RSA_Decrypt, OAEP) for TPMs without the symmetric commands."""

    settings = {"mechanism": "rsa-oaep"}


class TestTpmOutage(_OnANode, OutageConformance):
    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        self.node.swtpm.stop()  # the TPM is gone; its state directory stays (a reboot)
        try:
            yield
        finally:
            self.node.swtpm.start()


# -- the TPM's life: reboots, clearing, PCRs --------------------------------------------------------


def test_a_swtpm_restart_keeps_the_key_ids_and_every_version_decrypting(nodes: Callable[..., Node]) -> None:
    node = nodes("a").init()
    seed = os.urandom(32)
    first_key, first = run(_wrap(node.backend(), seed))  # type: ignore[misc]
    node.kleidi_tpm("rotate")
    second_key, second = run(_wrap(node.backend(), seed))  # type: ignore[misc]
    node.swtpm.restart()
    backend = node.backend()
    keys = run(backend.load_keys(force=True))
    assert {first_key.key_id, second_key.key_id} == set(keys.usable)  # type: ignore[attr-defined]
    assert run(_unwrap(backend, first_key, first)) == seed
    assert run(_unwrap(node.backend(), second_key, second)) == seed


def test_a_cleared_tpm_says_so_and_never_returns_plaintext(nodes: Callable[..., Node]) -> None:
    node = nodes("a").init()
    backend = node.backend()
    key, payload = run(_wrap(backend, os.urandom(32)))  # type: ignore[misc]
    node.swtpm.clear()

    async def after_the_clear() -> None:
        try:
            with pytest.raises(KeyringError) as unwrapping:
                await backend.unwrap(key, payload, AAD)  # type: ignore[arg-type]
            assert "cleared or is another TPM" in str(unwrapping.value.fix)
            assert "re-enrol this node" in str(unwrapping.value.fix)
            with pytest.raises(KeyringError) as loading:
                await backend.load_keys(force=True)
            assert "cleared or is another TPM" in str(loading.value.fix)
        finally:
            await backend.close()

    run(after_the_clear())


def test_a_changed_pcr_makes_unwrap_fail_with_the_pcr_error(nodes: Callable[..., Node]) -> None:
    node = nodes("a", pcrs=[16]).init()
    seed = os.urandom(32)
    key, payload = run(_wrap(node.backend(), seed))  # type: ignore[misc]
    assert run(_unwrap(node.backend(), key, payload)) == seed
    node.swtpm.extend_pcr(16)
    with pytest.raises(KeyringError) as failed:
        run(_unwrap(node.backend(), key, payload))
    assert "the PCR values changed (secure boot state?)" in failed.value.message
    assert "re-enrol this node" in str(failed.value.fix)
    with pytest.raises(KeyringError, match="PCR values changed"):
        run(_wrap(node.backend(), seed))


def test_a_wrong_key_auth_is_refused_and_auth_files_must_be_private(nodes: Callable[..., Node],
                                                                     short_dir: Path) -> None:
    secret = short_dir / "key.auth"
    secret.write_text("a key password\n")
    secret.chmod(0o600)
    node = nodes("a", key_auth_file=str(secret)).init()
    seed = os.urandom(32)
    key, payload = run(_wrap(node.backend(), seed))  # type: ignore[misc]
    assert run(_unwrap(node.backend(), key, payload)) == seed
    secret.write_text("another password\n")
    with pytest.raises(KeyringError, match="refused the key's authorization") as refused:
        run(_unwrap(node.backend(), key, payload))
    assert "password" not in str(refused.value)
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        run(_unwrap(node.backend(), key, payload))


# -- several nodes ------------------------------------------------------------------------------------


def test_an_enrolled_node_decrypts_what_the_first_wrote_and_its_blobs_are_useless_elsewhere(
        nodes: Callable[..., Node]) -> None:
    a, b, c = nodes("a").init(), nodes("b"), nodes("c")
    seed = os.urandom(32)
    key, payload = run(_wrap(a.backend(), seed))  # type: ignore[misc]
    b.enrol_from(a)
    assert run(_unwrap(b.backend(), key, payload)) == seed
    keys_a, keys_b = run(a.backend().load_keys(force=True)), run(b.backend().load_keys(force=True))
    assert keys_a.current == keys_b.current  # type: ignore[attr-defined]

    # B's key store on a third TPM: the blobs do not load there.
    c.key_store.write_bytes(b.key_store.read_bytes())
    c.key_store.chmod(0o600)
    with pytest.raises(KeyringError, match="storage primary") as elsewhere:
        run(_unwrap(c.backend(), key, payload))
    assert "cleared or is another TPM" in str(elsewhere.value.fix)
    # ... and B's enrolment does not import there.
    c.key_store.unlink()
    refused = c.kleidi_tpm("import", str(b.directory / "enrolment.json"), check=False)
    assert refused.exit_code != 0 and "made for another TPM" in str(refused.exception)


def test_rotation_across_nodes_stages_enrols_then_makes_current(nodes: Callable[..., Node]) -> None:
    a, b = nodes("a").init(), nodes("b")
    b.enrol_from(a)
    a.kleidi_tpm("rotate", "--stage")
    staged = run(a.backend().load_keys(force=True))
    assert staged.current.version == 1 and len(staged.usable) == 2  # type: ignore[attr-defined]
    b.enrol_from(a)  # adds v2 only
    for node in (a, b):
        node.kleidi_tpm("make-current", "v2")
    seed = os.urandom(32)
    key, payload = run(_wrap(b.backend(), seed))  # type: ignore[misc]
    assert key.version == 2  # type: ignore[attr-defined]
    assert run(_unwrap(a.backend(), key, payload)) == seed
    listing = [json.loads(n.kleidi_tpm("keys", "--output", "json").output) for n in (a, b)]
    assert listing[0]["versions"] == listing[1]["versions"]
    a.kleidi_tpm("retire", "1", "--yes")
    old = next(iter(run(a.backend().load_keys(force=True)).retired.values()))  # type: ignore[attr-defined]
    with pytest.raises(RetiredKey):
        run(_unwrap(a.backend(), old, payload))


def test_enrolling_a_pcr_bound_version_keeps_its_binding(nodes: Callable[..., Node]) -> None:
    a, b = nodes("a", pcrs=[16]).init(), nodes("b")
    b.enrol_from(a)
    seed = os.urandom(32)
    key, payload = run(_wrap(a.backend(), seed))  # type: ignore[misc]
    assert run(_unwrap(b.backend(), key, payload)) == seed  # both swtpms start with the same PCR 16
    b.swtpm.extend_pcr(16)
    with pytest.raises(KeyringError, match="PCR values changed"):
        run(_unwrap(b.backend(), key, payload))


# -- doctor, settings, the CLI's hints and the docs ---------------------------------------------------


def test_doctor_checks_the_files_and_the_tpm(nodes: Callable[..., Node]) -> None:
    node = nodes("a").init()
    checks = TpmBackend.file_checks(node.settings)
    assert [c.result for c in checks] == ["pass"]

    async def preflight() -> list[str]:
        backend = node.backend()
        try:
            return [f"{c.name}: {c.result}" for c in await backend.preflight()]
        finally:
            await backend.close()

    assert run(preflight()) == ["TPM reachable: pass", "TPM commands and algorithms: pass",
                                "TPM storage primary: pass"]
    node.swtpm.stop()
    assert run(preflight())[0] == "TPM reachable: FAIL"
    node.key_store.chmod(0o644)
    assert TpmBackend.file_checks(node.settings)[0].result == "FAIL"


def test_an_unreachable_tpm_is_unavailable_and_a_missing_key_store_says_how_to_make_one(
        nodes: Callable[..., Node], short_dir: Path) -> None:
    node = nodes("a").init()
    unreachable = node.settings.model_copy(update={"tcti": "swtpm:host=127.0.0.1,port=1"})
    with pytest.raises(BackendUnavailable, match="cannot be reached"):
        run(_unwrap(TpmBackend(unreachable), None, b""))
    missing = node.settings.model_copy(update={"key_store": short_dir / "none.json"})
    with pytest.raises(KeyringError, match="does not exist") as failed:
        run(_unwrap(TpmBackend(missing), None, b""))
    assert "kleidi tpm init" in str(failed.value.fix)


@pytest.mark.parametrize(("field", "value"), [("tcti", "device /dev/tpm0"), ("tcti", "libtpms"),
                                              ("pcrs", [24]), ("pcrs", [7, 7]), ("mechanism", "aes-ecb")])
def test_invalid_settings_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError):
        TpmBackendSettings.model_validate({field: value})


def test_core_key_commands_point_at_kleidi_tpm(nodes: Callable[..., Node]) -> None:
    node = nodes("a")
    for command, hint in (("rotate", "kleidi tpm rotate --stage"), ("keygen", "kleidi tpm init"),
                          ("keys", "kleidi tpm keys"), ("retire", "kleidi tpm retire 1")):
        args = [command, "1", "--yes"] if command == "retire" else [command]
        result = run_kleidi(*args, "--config", str(node.config_file))
        assert result.returncode != 0 and hint in result.stderr, result.stderr


def test_the_docs_config_example_is_valid() -> None:
    from kleidi.config import load_settings

    text = DOCS.read_text()
    example = re.search(r"<!-- doc-test: config -->\s*```yaml\n(.*?)```", text, re.S)
    assert example is not None, "docs/backends/tpm.md lost its config example"
    with contextlib.chdir(DOCS.parent):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kleidi-tpm-doc-{os.getpid()}.yaml"
        path.write_text(example.group(1))
        try:
            settings = load_settings(path)
        finally:
            path.unlink()
    assert settings.backend.kind == "tpm"


def test_a_tampered_mechanism_byte_is_a_decryption_failure(nodes: Callable[..., Node]) -> None:
    node = nodes("a").init()
    key, payload = run(_wrap(node.backend(), os.urandom(32)))  # type: ignore[misc]
    with pytest.raises(DecryptionFailed):
        run(_unwrap(node.backend(), key, bytes([2]) + payload[1:]))
