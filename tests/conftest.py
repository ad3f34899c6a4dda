"""Shared fixtures: real kleidi processes on real unix sockets, driven like kube-apiserver drives them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from kleidi._proto.kmsv2 import api_pb2 as v2_pb
from kleidi._proto.kmsv2 import api_pb2_grpc as v2_grpc
from tests.support import free_port, private_dir
from tests.vault.fixtures import client_ca, fresh_openbao, openbao, pki_dir, transit_key  # noqa: F401

KLEIDI = str(Path(sys.executable).with_name("kleidi"))
HELPERS = Path(__file__).parent / "helpers"


def run_kleidi(*args: str, env: dict[str, str] | None = None, input: str | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real ``kleidi`` console script."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KLEIDI_")}
    full_env.update(env or {})
    return subprocess.run([KLEIDI, *args], capture_output=True, text=True, env=full_env, input=input,
                          timeout=timeout, check=False)


def wait_for(predicate: Any, timeout: float = 10, what: str = "condition", interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy and return its value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory: unix socket paths must stay under 108 bytes."""
    with private_dir("kl-") as path:
        yield path


def keygen(path: Path) -> None:
    result = run_kleidi("keygen", "--keyring", str(path))
    assert result.returncode == 0, result.stderr


class KleidiProcess:
    """One ``kleidi serve`` subprocess with a config file, its log, and a stub to call it."""

    def __init__(self, workdir: Path, name: str = "kleidi", *, keyring: Path | None = None,
                 settings: dict[str, Any] | None = None, command: list[str] | None = None,
                 backend: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.keyring = keyring or workdir / "keyring.json"
        self.socket_path = workdir / f"{name}.sock"
        self.endpoint = f"unix://{self.socket_path}"
        self.config_path = workdir / f"{name}.yaml"
        self.log_path = workdir / f"{name}.log"
        self.metrics_port = free_port()
        config: dict[str, Any] = {
            "server": {"endpoint": self.endpoint, "shutdown_timeout": "10s"},
            "telemetry": {"address": f"127.0.0.1:{self.metrics_port}"},
            "logging": {"level": "debug", "format": "json"},
            "backend": {"kind": "local", "keyring": str(self.keyring), "refresh_interval": "200ms",
                        "probe_interval": "1s"},
        }
        if backend is not None:  # another backend replaces the local one entirely
            config["backend"] = {"refresh_interval": "200ms", "probe_interval": "1s", **backend}
        for section, values in (settings or {}).items():
            config.setdefault(section, {}).update(values)
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config))
        self.command = command or [KLEIDI, "serve", "--config", str(self.config_path)]
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None
        self.plaintexts_sent: list[bytes] = []

    def start(self, wait: bool = True) -> KleidiProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KLEIDI_")}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=log, env=env)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"kleidi exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket_path.exists():
                try:
                    if self.status(timeout=1).healthz == "ok":
                        return
                except grpc.RpcError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"kleidi not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def stub(self) -> v2_grpc.KeyManagementServiceStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.endpoint, options=[("grpc.default_authority", "localhost")])
        return v2_grpc.KeyManagementServiceStub(self._channel)

    def status(self, timeout: float = 3) -> v2_pb.StatusResponse:
        return self.stub.Status(v2_pb.StatusRequest(), timeout=timeout)

    def encrypt(self, plaintext: bytes, uid: str = "test-uid") -> v2_pb.EncryptResponse:
        self.plaintexts_sent.append(plaintext)
        return self.stub.Encrypt(v2_pb.EncryptRequest(plaintext=plaintext, uid=uid), timeout=3)

    def decrypt(self, ciphertext: bytes, key_id: str, annotations: Any, uid: str = "test-uid") -> bytes:
        request = v2_pb.DecryptRequest(ciphertext=ciphertext, key_id=key_id, annotations=dict(annotations), uid=uid)
        return self.stub.Decrypt(request, timeout=3).plaintext

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"kleidi did not stop within {timeout}s:\n{self.log()}") from None

    def wait_for_key_id(self, predicate: Any, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            key_id = self.status().key_id
            if predicate(key_id):
                return key_id
            time.sleep(0.05)
        raise AssertionError(f"Status key_id did not change as expected within {timeout}s")


@pytest.fixture
def kleidi_factory(short_dir: Path) -> Iterator[Any]:
    """Start kleidi processes in one short directory; every one is stopped at the end."""
    started: list[KleidiProcess] = []

    def factory(name: str = "kleidi", *, create_keyring: bool = True, start: bool = True,
                **kwargs: Any) -> KleidiProcess:
        proc = KleidiProcess(short_dir, name, **kwargs)
        if create_keyring and not proc.keyring.exists():
            keygen(proc.keyring)
        started.append(proc)
        return proc.start() if start else proc

    yield factory
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()
    assert_no_secret_written(short_dir, [p for proc in started for p in proc.plaintexts_sent])


def assert_no_secret_written(directory: Path, plaintexts: list[bytes]) -> None:
    """No seed a test sent may appear, in any usual encoding, in any log or audit file it produced."""
    import base64

    seeds = [s for s in plaintexts if len(s) >= 16 and len(set(s)) > 4]  # short or repetitive values match by chance
    if not seeds:
        return
    files = [p for p in directory.rglob("*") if p.is_file() and (p.suffix in (".log", ".jsonl") or ".jsonl." in p.name)]
    for path in files:
        text = path.read_bytes()
        for seed in seeds:
            for form in (seed, seed.hex().encode(), seed.hex().upper().encode(), base64.b64encode(seed),
                         base64.urlsafe_b64encode(seed)):
                assert form not in text, f"a seed reached {path}"
