"""A real control plane for the end-to-end tests: etcd and kube-apiserver processes on loopback.

Set up the way envtest does it: a temp dir, a service-account key pair, a static token for the test
client, AlwaysAllow authorization, a self-signed serving cert in --cert-dir, and an
EncryptionConfiguration produced by ``kleidi encryption-config``. Every process is stopped by its
own pid, also when a test fails.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization  # noqa: TID251 - test fixture key pair
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: TID251

from tests.support import free_port

BIN = Path(sys.executable).parent
ETCD = str(BIN / "etcd")
ETCDCTL = str(BIN / "etcdctl")
KUBECTL = str(BIN / "kubectl")
ROOT = Path(__file__).resolve().parents[2]
KUBE_VERSION = os.environ.get("KUBE_VERSION", "v1.36.3")
TOKEN = "kleidi-e2e-token"


def kube_apiserver_binary() -> str:
    """Build (first time) or reuse the cached kube-apiserver binary."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / "build-kube-apiserver.sh"), KUBE_VERSION],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"building kube-apiserver failed:\n{result.stderr[-4000:]}")
    return result.stdout.strip().splitlines()[-1]


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Etcd:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "etcd"
        self.port, self.peer_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Etcd:
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.dir.parent / "etcd.log", "ab")
        self.proc = subprocess.Popen(
            [ETCD, "--name", "e2e", "--data-dir", str(self.dir), "--listen-client-urls", self.url,
             "--advertise-client-urls", self.url, "--listen-peer-urls", peer,
             "--initial-advertise-peer-urls", peer, "--initial-cluster", f"e2e={peer}",
             "--unsafe-no-fsync", "--log-level", "warn"], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if json.load(response).get("health") == "true":
                        return self
            except (OSError, ValueError):
                time.sleep(0.1)
        raise RuntimeError("etcd did not become healthy")

    def stop(self) -> None:
        _stop(self.proc)

    def _ctl(self, *args: str) -> Any:
        result = subprocess.run([ETCDCTL, "--endpoints", self.url, "-w", "json", *args], capture_output=True,
                                check=True, env={**os.environ, "ETCDCTL_API": "3"})
        return json.loads(result.stdout)

    def get(self, key: str) -> bytes:
        """The raw stored value of one key."""
        kvs = self._ctl("get", key).get("kvs") or []
        if not kvs:
            raise KeyError(key)
        return base64.b64decode(kvs[0]["value"])

    def items(self, prefix: str) -> dict[str, bytes]:
        """Every key under a prefix with its raw value."""
        kvs = self._ctl("get", prefix, "--prefix").get("kvs") or []
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]) for kv in kvs}


class KubeAPIServer:
    """One kube-apiserver. ``kubectl(...)`` runs the real kubectl against it."""

    def __init__(self, workdir: Path, name: str, etcd: Etcd, binary: str, encryption_config: Path | None,
                 automatic_reload: bool = False) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name, self.etcd, self.binary = name, etcd, binary
        self.encryption_config = encryption_config
        self.automatic_reload = automatic_reload
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "kube-apiserver.log"
        self.kubeconfig = self.dir / "kubeconfig"
        self._write_credentials()

    def _write_credentials(self) -> None:
        sa_key = workdir_key = self.dir.parent / "sa.key"
        if not workdir_key.exists():  # one service-account key per cluster, shared by HA apiservers
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            sa_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
            (self.dir.parent / "sa.pub").write_bytes(key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        (self.dir / "tokens.csv").write_text(f"{TOKEN},admin,admin-uid,system:masters\n")

    def flags(self) -> list[str]:
        flags = [
            f"--etcd-servers={self.etcd.url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--cert-dir={self.dir / 'certs'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={self.dir.parent / 'sa.pub'}",
            f"--service-account-signing-key-file={self.dir.parent / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=AlwaysAllow", f"--token-auth-file={self.dir / 'tokens.csv'}",
            "--disable-admission-plugins=ServiceAccount", "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
        ]
        if self.encryption_config is not None:
            flags.append(f"--encryption-provider-config={self.encryption_config}")
            if self.automatic_reload:
                flags.append("--encryption-provider-config-automatic-reload=true")
        return flags

    def start(self, wait: bool = True, ready_timeout: float = 120) -> KubeAPIServer:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, *self.flags()], stdout=log, stderr=log)
        log.close()
        if wait:
            self.wait_ready(ready_timeout)
        return self

    def _ssl(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.dir / "certs" / "apiserver.crt"))
        return context

    def get(self, path: str, timeout: float = 10) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self._ssl()) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout: float = 120, path: str = "/readyz") -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"kube-apiserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, last = self.get(path, timeout=5)
                if status == 200:
                    self._write_kubeconfig()
                    return
            except (OSError, ssl.SSLError) as exc:
                last = str(exc)
            time.sleep(0.5)
        raise RuntimeError(f"kube-apiserver not ready after {timeout}s: {last}\n{self.log_tail()}")

    def wait_started(self, timeout: float = 120) -> None:
        """Serving HTTPS (livez), whether or not every readiness check passes."""
        self.wait_ready(timeout, path="/livez")

    def _write_kubeconfig(self) -> None:
        ca = base64.b64encode((self.dir / "certs" / "apiserver.crt").read_bytes()).decode()
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
            "clusters": [{"name": "e2e", "cluster": {"server": self.url, "certificate-authority-data": ca}}],
            "users": [{"name": "admin", "user": {"token": TOKEN}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "admin"}}]}))

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([KUBECTL, "--kubeconfig", str(self.kubeconfig), *args], input=input,
                                capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        _stop(self.proc)


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
