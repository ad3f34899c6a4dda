"""The plugins under test, each one process on a unix socket: kleidi (through the test suite's
``KleidiProcess``), the no-op Go plugin, and the Go peer on Transit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from bench.common import PeerBinary
from kleidi._proto.kmsv2 import api_pb2 as v2_pb
from kleidi._proto.kmsv2 import api_pb2_grpc as v2_grpc
from tests.conftest import KleidiProcess, keygen
from tests.support import free_port

# kleidi as a user runs it: production intervals and log level, not the test suite's tightened ones.
KLEIDI_SETTINGS: dict[str, Any] = {"logging": {"level": "info", "format": "json"}}
KLEIDI_INTERVALS: dict[str, Any] = {"refresh_interval": "5s", "probe_interval": "30s"}


def status_ok(socket_path: Path, timeout: float = 0.5) -> bool:
    """One Status call on a fresh channel (a cached channel would sit in reconnect back-off)."""
    if not socket_path.exists():
        return False
    with grpc.insecure_channel(f"unix://{socket_path}", options=[("grpc.default_authority", "localhost")]) as chan:
        try:
            stub = v2_grpc.KeyManagementServiceStub(chan)  # type: ignore[no-untyped-call]
            response = stub.Status(v2_pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(response.healthz == "ok")


def wait_ready(proc: subprocess.Popen[bytes], socket_path: Path, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"plugin exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        if status_ok(socket_path):
            return
        time.sleep(0.002 if not socket_path.exists() else 0.005)
    raise RuntimeError(f"plugin not ready after {timeout}s:\n{log_path.read_text(errors='replace')[-3000:]}")


class Plugin:
    """A running plugin: ``name``, ``endpoint``, ``pid``; ``stop()``."""

    name: str
    socket_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Kleidi(Plugin):
    """``kleidi serve`` with the local backend (a fresh keyring) or a given backend section."""

    def __init__(self, workdir: Path, name: str, backend: dict[str, Any] | None = None,
                 server: dict[str, Any] | None = None) -> None:
        self.name = name
        keyring = workdir / f"{name}-keyring.json"
        if backend is None:
            keygen(keyring)
            backend = {"kind": "local", "keyring": str(keyring)}
        settings = {**KLEIDI_SETTINGS, "server": server or {}}
        self.process = KleidiProcess(workdir, name, keyring=keyring, settings=settings,
                                     backend={**backend, **KLEIDI_INTERVALS})
        self.socket_path = self.process.socket_path

    def start(self, timeout: float = 30) -> float:
        """Start and wait until Status answers ``ok``; return the seconds from spawn to that answer."""
        self.socket_path.unlink(missing_ok=True)
        began = time.perf_counter()
        self.process.start(wait=False)
        self.proc = self.process.proc
        assert self.proc is not None
        wait_ready(self.proc, self.socket_path, timeout, self.process.log_path)
        return time.perf_counter() - began

    def stop(self) -> None:
        super().stop()
        self.process.stop()

    def metrics(self) -> dict[str, float]:
        """``kleidi_requests_total`` by method (all codes), and ``kleidi_backend_calls_total`` by operation."""
        url = f"http://127.0.0.1:{self.process.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        totals: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r'kleidi_requests_total\{(.*)\} ([0-9.e+]+)$', line)
            if m and (method := re.search(r'method="([^"]+)"', m.group(1))):
                totals[method.group(1)] = totals.get(method.group(1), 0.0) + float(m.group(2))
            m = re.match(r'kleidi_backend_calls_total\{(.*)\} ([0-9.e+]+)$', line)
            if m and (operation := re.search(r'operation="([^"]+)"', m.group(1))):
                key = f"backend:{operation.group(1)}"
                totals[key] = totals.get(key, 0.0) + float(m.group(2))
        return totals

    def log_text(self) -> str:
        return self.process.log()


class GoPlugin(Plugin):
    """A Go plugin binary: the no-op plugin, the Transit reference plugin, or vault-kubernetes-kms."""

    def __init__(self, workdir: Path, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.workdir = workdir
        self.socket_path = workdir / f"{name}.sock"
        self.log_path = workdir / f"{name}.log"
        self.command = [part.replace("{socket}", str(self.socket_path)) for part in command]
        self.env = {**os.environ, **(env or {})}

    def start(self, timeout: float = 30) -> float:
        self.socket_path.unlink(missing_ok=True)
        began = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=log, env=self.env,
                                         stdin=subprocess.DEVNULL)
        wait_ready(self.proc, self.socket_path, timeout, self.log_path)
        return time.perf_counter() - began


def noop_plugin(workdir: Path, loadgen: Path) -> GoPlugin:
    return GoPlugin(workdir, "noop", [str(loadgen), "noop", "-socket", "{socket}"])


def peer_plugin(workdir: Path, peer: PeerBinary, address: str, key: str, token_file: Path) -> GoPlugin:
    """The Go peer against the same Transit key. vault-kubernetes-kms gets its token from the environment
    (never argv); the reference plugin from a 0600 file."""
    if peer.kind == "vault-kubernetes-kms":
        command = [str(peer.path), "-socket", "unix://{socket}", "-force-socket-overwrite",
                   "-vault-address", address, "-auth-method", "token", "-transit-mount", "transit",
                   "-transit-key", key, "-health-port", str(free_port()), "-disable-v1"]
        return GoPlugin(workdir, "vault-kubernetes-kms", command,
                        env={"VAULT_KMS_TOKEN": token_file.read_text().strip()})
    command = [str(peer.path), "transit-ref", "-socket", "{socket}", "-vault-address", address,
               "-token-file", str(token_file), "-transit-key", key]
    return GoPlugin(workdir, "go-transit-ref", command)
