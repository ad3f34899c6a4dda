"""Supply chain (#13): cosign signatures over the wheel, the image archive and its SBOM, and the
dependency vulnerability check over the packages the image ships.

Signing drives a real cosign (built from the Go module proxy by scripts/build-go-tool.sh, cached) through
scripts/sign-artifacts.sh. The audit drives the real pip-audit through scripts/audit-deps.sh; PyPI's
per-version vulnerability endpoint does not answer from these machines, so the policy tests put a
loopback HTTPS proxy in front of pip-audit that plays that endpoint with advisories made here, and one
test proves the audit fails closed when nothing answers.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.utils import canonicalize_name

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
SIGN = ROOT / "scripts" / "sign-artifacts.sh"
AUDIT = ROOT / "scripts" / "audit-deps.sh"
VENV_BIN = Path(sys.executable).parent


def run(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "COSIGN_PASSWORD"}
    full_env.update(env or {})
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=full_env, timeout=timeout,
                          check=False, cwd=ROOT)


# --- artifacts --------------------------------------------------------------------------------------------


def _artifacts(tmp: Path) -> list[Path]:
    """The release artifacts: wheel, OCI archive and SBOM from tests/deploy/images.py once that exists;
    until then a wheel built here and an SBOM of this environment."""
    try:
        images: Any = importlib.import_module("tests.deploy.images")
    except ModuleNotFoundError:
        images = None
    if images is not None:
        built = images.kleidi_image()
        return [Path(built.wheel), Path(built.archive), Path(built.sbom)]
    wheel_dir = tmp / "wheel"
    result = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheel_dir,
                 ROOT)
    assert result.returncode == 0, result.stderr
    sbom = tmp / "env.sbom.cdx.json"
    result = run(VENV_BIN / "cyclonedx-py", "environment", "--output-format", "JSON", "--output-file", sbom,
                 VENV_BIN.parent)
    assert result.returncode == 0, result.stderr
    return [*wheel_dir.glob("kleidi-*.whl"), sbom]


@dataclass
class Keys:
    key: Path
    pub: Path
    password: str


@pytest.fixture(scope="module")
def cosign() -> str:
    result = run(SIGN, "cosign")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def _keygen(directory: Path, cosign: str) -> Keys:
    password = secrets.token_urlsafe(24)
    result = run(SIGN, "keygen", directory, env={"COSIGN_PASSWORD": password, "COSIGN": cosign})
    assert result.returncode == 0, result.stderr
    assert password not in result.stdout + result.stderr
    return Keys(directory / "kleidi.key", directory / "kleidi.pub", password)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, cosign: str) -> tuple[Keys, list[Path]]:
    """A key pair and copies of every artifact, each signed with it."""
    tmp = tmp_path_factory.mktemp("signed")
    keys = _keygen(tmp / "keys", cosign)
    copies = []
    for artifact in _artifacts(tmp):
        copy = tmp / "release" / artifact.name
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(artifact, copy)
        copies.append(copy)
    result = run(SIGN, "sign", keys.key, *copies, env={"COSIGN_PASSWORD": keys.password, "COSIGN": cosign})
    assert result.returncode == 0, result.stderr
    assert keys.password not in result.stdout + result.stderr
    return keys, copies


def test_private_key_is_encrypted_and_private(signed: tuple[Keys, list[Path]]) -> None:
    keys, _ = signed
    text = keys.key.read_text()
    assert "ENCRYPTED SIGSTORE PRIVATE KEY" in text
    assert keys.key.stat().st_mode & 0o077 == 0
    assert "PUBLIC KEY" in keys.pub.read_text()


def test_every_artifact_verifies_with_the_public_key(signed: tuple[Keys, list[Path]], cosign: str) -> None:
    keys, copies = signed
    assert any(p.suffix == ".whl" for p in copies) and any(p.name.endswith(".cdx.json") for p in copies)
    result = run(SIGN, "verify", keys.pub, *copies, env={"COSIGN": cosign})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("OK ") == len(copies)


def test_one_changed_byte_fails_verification(signed: tuple[Keys, list[Path]], cosign: str,
                                             tmp_path: Path) -> None:
    keys, copies = signed
    for original in copies:
        tampered = tmp_path / original.name
        data = bytearray(original.read_bytes())
        data[len(data) // 2] ^= 0x01
        tampered.write_bytes(bytes(data))
        shutil.copyfile(original.with_name(original.name + ".sig"), tampered.with_name(tampered.name + ".sig"))
        result = run(SIGN, "verify", keys.pub, tampered, env={"COSIGN": cosign})
        assert result.returncode == 1, f"{original.name}: a changed byte still verified"
        assert f"FAIL {tampered}" in result.stderr


def test_another_key_fails_verification(signed: tuple[Keys, list[Path]], cosign: str, tmp_path: Path) -> None:
    _, copies = signed
    other = _keygen(tmp_path / "other", cosign)
    result = run(SIGN, "verify", other.pub, *copies, env={"COSIGN": cosign})
    assert result.returncode == 1
    assert result.stderr.count("FAIL ") == len(copies) and "OK " not in result.stdout


def test_a_missing_signature_fails_verification(signed: tuple[Keys, list[Path]], cosign: str,
                                                tmp_path: Path) -> None:
    keys, copies = signed
    unsigned = tmp_path / copies[0].name
    shutil.copyfile(copies[0], unsigned)
    result = run(SIGN, "verify", keys.pub, unsigned, env={"COSIGN": cosign})
    assert result.returncode == 1 and "no signature" in result.stderr


def test_signing_needs_the_password_from_the_environment(signed: tuple[Keys, list[Path]], cosign: str,
                                                          tmp_path: Path) -> None:
    keys, _ = signed
    target = tmp_path / "artifact.bin"
    target.write_bytes(b"kleidi")
    result = run(SIGN, "sign", keys.key, target, env={"COSIGN": cosign})
    assert result.returncode == 2 and "COSIGN_PASSWORD" in result.stderr
    wrong = secrets.token_urlsafe(24)
    result = run(SIGN, "sign", keys.key, target, env={"COSIGN_PASSWORD": wrong, "COSIGN": cosign})
    assert result.returncode != 0
    assert not target.with_name("artifact.bin.sig").exists()
    assert wrong not in result.stdout + result.stderr


def test_keygen_never_overwrites_a_key(signed: tuple[Keys, list[Path]], cosign: str) -> None:
    keys, _ = signed
    before = keys.key.read_bytes()
    result = run(SIGN, "keygen", keys.key.parent, env={"COSIGN_PASSWORD": keys.password, "COSIGN": cosign})
    assert result.returncode == 1 and "refusing to overwrite" in result.stderr
    assert keys.key.read_bytes() == before


# --- dependency audit -------------------------------------------------------------------------------------


def _sbom(path: Path, packages: dict[str, str]) -> Path:
    components = [{"type": "library", "name": n, "version": v, "purl": f"pkg:pypi/{n}@{v}"}
                  for n, v in packages.items()]
    components.append({"type": "library", "name": "kleidi", "version": "0.1.0", "purl": "pkg:pypi/kleidi@0.1.0"})
    path.write_text(json.dumps({"bomFormat": "CycloneDX", "specVersion": "1.6", "components": components}))
    return path


class FakePyPIFeed:
    """A loopback HTTPS proxy that answers pip-audit's CONNECT to pypi.org itself, with a certificate from a
    CA made here, and serves /pypi/NAME/VERSION/json from ``advisories``; any other package is unknown (404),
    as PyPI answers for a package it does not have."""

    def __init__(self, directory: Path, advisories: dict[str, list[dict[str, Any]]]) -> None:
        self.advisories = advisories
        self.requests: list[str] = []
        self.ca_file = directory / "ca.pem"
        cert_file, key_file = directory / "leaf.pem", directory / "leaf.key"
        ext = directory / "leaf.ext"
        ext.write_text("subjectAltName=DNS:pypi.org\nbasicConstraints=critical,CA:FALSE\n"
                       "extendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\n")
        steps: list[list[str | Path]] = [
            ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
             "-subj", "/CN=kleidi test feed CA", "-keyout", directory / "ca.key", "-out", self.ca_file,
             "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0", "-addext", "keyUsage=critical,keyCertSign"],
            ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=pypi.org",
             "-keyout", key_file, "-out", directory / "leaf.csr"],
            ["x509", "-req", "-in", directory / "leaf.csr", "-CA", self.ca_file, "-CAkey", directory / "ca.key",
             "-CAcreateserial", "-days", "1", "-extfile", ext, "-out", cert_file],
        ]
        for args in steps:
            made = run("openssl", *args, timeout=60)
            assert made.returncode == 0, made.stderr
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(cert_file, key_file)
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_head(conn: socket.socket | ssl.SSLSocket) -> str:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.decode("latin-1")

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            head = self._read_head(conn)
            if not head.startswith("CONNECT pypi.org:443 "):
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            try:
                with self.tls.wrap_socket(conn, server_side=True) as tls:
                    while True:
                        request = self._read_head(tls)
                        if not request:
                            return
                        path = request.split(" ", 2)[1]
                        self.requests.append(path)
                        parts = path.strip("/").split("/")
                        key = f"{parts[1]}=={parts[2]}" if len(parts) == 4 else ""
                        if key in self.advisories:
                            body = json.dumps({"info": {"name": parts[1], "version": parts[2]},
                                               "vulnerabilities": self.advisories[key]}).encode()
                            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                        else:
                            tls.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            except (OSError, ssl.SSLError):
                return

    def env(self) -> dict[str, str]:
        proxy = f"http://127.0.0.1:{self.port}"
        return {"HTTPS_PROXY": proxy, "https_proxy": proxy, "NO_PROXY": "", "no_proxy": "",
                "REQUESTS_CA_BUNDLE": str(self.ca_file)}

    def close(self) -> None:
        self.listener.close()


def _advisory(ident: str, fixed_in: list[str], alias: str) -> dict[str, Any]:
    return {"id": ident, "aliases": [alias], "fixed_in": fixed_in, "summary": f"test advisory {ident}",
            "details": "made by the test", "link": f"https://osv.dev/vulnerability/{ident}", "withdrawn": None}


@pytest.fixture
def feed(tmp_path: Path) -> Iterator[FakePyPIFeed]:
    served = FakePyPIFeed(tmp_path, {
        "clean-pkg==1.0": [],
        "fixable-pkg==2.0": [_advisory("PYSEC-0000-1", ["2.1"], "CVE-0000-0001")],
        "unfixed-pkg==3.0": [_advisory("PYSEC-0000-2", [], "CVE-0000-0002")],
    })
    yield served
    served.close()


def test_audit_passes_clean_packages_and_warns_about_unfixed_advisories(feed: FakePyPIFeed, tmp_path: Path) -> None:
    sbom = _sbom(tmp_path / "s.cdx.json", {"clean-pkg": "1.0", "unfixed-pkg": "3.0"})
    result = run(AUDIT, sbom, tmp_path / "no-ignore-file", env=feed.env(), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning  unfixed-pkg 3.0: PYSEC-0000-2, no fixed version yet" in result.stdout
    assert "audited 2 packages" in result.stdout
    # kleidi itself is not looked up: it is not on PyPI
    assert sorted(feed.requests) == ["/pypi/clean-pkg/1.0/json", "/pypi/unfixed-pkg/3.0/json"]


def test_audit_fails_on_a_fixable_vulnerability_unless_ignored_with_a_reason(feed: FakePyPIFeed,
                                                                             tmp_path: Path) -> None:
    sbom = _sbom(tmp_path / "s.cdx.json", {"clean-pkg": "1.0", "fixable-pkg": "2.0"})
    result = run(AUDIT, sbom, tmp_path / "no-ignore-file", env=feed.env(), timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "VULNERABLE fixable-pkg 2.0: PYSEC-0000-1, fixed in 2.1" in result.stderr
    ignore = tmp_path / "ignore"
    ignore.write_text("CVE-0000-0001\n")
    result = run(AUDIT, sbom, ignore, env=feed.env(), timeout=120)
    assert result.returncode == 2 and "needs a justification" in result.stderr
    ignore.write_text("# kleidi never calls the affected function\nCVE-0000-0001  # affected API unused by kleidi\n")
    result = run(AUDIT, sbom, ignore, env=feed.env(), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ignored  fixable-pkg 2.0: PYSEC-0000-1 (affected API unused by kleidi)" in result.stdout


def test_audit_fails_closed_when_a_package_is_unknown_to_the_database(feed: FakePyPIFeed, tmp_path: Path) -> None:
    # pip-audit alone reports "No known vulnerabilities found" and exits 0 here
    sbom = _sbom(tmp_path / "s.cdx.json", {"clean-pkg": "1.0", "not-in-the-feed": "9.9"})
    result = run(AUDIT, sbom, tmp_path / "no-ignore-file", env=feed.env(), timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "answered for 1 of 2 packages; not audited: not-in-the-feed" in result.stderr


def test_audit_fails_closed_when_the_database_cannot_be_reached(tmp_path: Path) -> None:
    sbom = _sbom(tmp_path / "s.cdx.json", {"clean-pkg": "1.0"})
    closed = f"http://127.0.0.1:{free_port()}"
    result = run(AUDIT, sbom, env={"HTTPS_PROXY": closed, "https_proxy": closed, "NO_PROXY": "", "no_proxy": ""},
                 timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "vulnerability database unreachable" in result.stderr


def test_audit_covers_every_package_of_the_image_sbom(tmp_path: Path) -> None:
    """Every pinned PyPI package in the SBOM the image ships (or, before tests/deploy/images.py exists, this
    environment's) is looked up, and only kleidi is left out."""
    sbom = next(p for p in _artifacts(tmp_path) if p.name.endswith(".cdx.json"))
    pins = {(canonicalize_name(c["name"]), c["version"]) for c in json.loads(sbom.read_text())["components"]
            if c.get("purl", "").startswith("pkg:pypi/") and c["name"] != "kleidi"}
    assert len(pins) > 5
    feed = FakePyPIFeed(tmp_path, {f"{n}=={v}": [] for n, v in pins})
    try:
        result = run(AUDIT, sbom, tmp_path / "no-ignore-file", env=feed.env(), timeout=180)
    finally:
        feed.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"audited {len(pins)} packages" in result.stdout
    assert sorted(feed.requests) == sorted(f"/pypi/{n}/{v}/json" for n, v in pins)
