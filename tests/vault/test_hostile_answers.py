"""A hostile or broken server at backend.address: every answer is untrusted input.

Real OpenBao never sends these answers, so this module (and only it) talks to a loopback stand-in
that speaks the Transit API's shape and can be told to send malformed bodies: a decrypt plaintext
that is not base64, key versions that are not numbers, a login without a token, and so on. The
kleidi under test is the real `kleidi serve` on a real unix socket.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import wait_for

KEY = "kek"
CREATED = "2026-12-01T10:00:00.000000000Z"


class FakeTransit:
    """Just enough of Vault's Transit API for kleidi, with a switch per endpoint to answer badly.

    Its "encryption" is base64 of the plaintext: this stand-in tests kleidi's handling of answers,
    never cryptography."""

    def __init__(self) -> None:
        self.latest = 1
        self.overrides: dict[str, Any] = {}  # endpoint name -> the JSON body (or raw bytes) to send instead
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(length) or b"{}")
                name, body = outer.route(self.path, request)
                outer.requests.append(name)
                if name in outer.overrides:
                    body = outer.overrides[name]
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def route(self, path: str, request: dict[str, Any]) -> tuple[str, Any]:
        if path.endswith("/auth/token/lookup-self"):
            return "lookup", {"data": {"ttl": 0, "renewable": False}}
        if path.endswith("/auth/approle/login"):
            return "login", {"auth": {"client_token": "s.fake", "lease_duration": 3600, "renewable": True}}
        if path.endswith(f"/transit/keys/{KEY}"):
            return "keys", {"data": {"type": "aes256-gcm96", "latest_version": self.latest, "min_decryption_version": 1,
                                     "supports_encryption": True,
                                     "keys": {str(v): CREATED for v in range(1, self.latest + 1)}}}
        if path.endswith(f"/transit/encrypt/{KEY}"):
            version = request.get("key_version") or self.latest
            return "encrypt", {"data": {"ciphertext": f"vault:v{version}:{request['plaintext']}"}}
        if path.endswith(f"/transit/decrypt/{KEY}"):
            return "decrypt", {"data": {"plaintext": request["ciphertext"].split(":", 2)[2]}}
        return "unknown", {"errors": ["no handler"]}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_vault() -> Iterator[FakeTransit]:
    fake = FakeTransit()
    yield fake
    fake.close()


def _kleidi(kleidi_factory: Any, short_dir: Path, fake: FakeTransit, *, auth: dict[str, Any] | None = None,
            wait: bool = True) -> Any:
    token = short_dir / "token"
    token.write_text("s.fake-static-token")
    token.chmod(0o600)
    backend = {"kind": "vault", "address": fake.address, "key": KEY, "timeout": "2s",
               "auth": auth or {"method": "token", "token_file": str(token)}}
    proc = kleidi_factory(backend=backend, start=False)
    proc.start(wait=wait)
    return proc


def _healthz(proc: Any) -> str:
    return str(proc.status().healthz)


def _no_traceback(proc: Any) -> None:
    for line in proc.log().splitlines():
        assert "Traceback" not in line or '"traceback"' in line, line  # only our own framed field


def test_a_decrypt_answer_that_is_not_base64_is_unavailable_not_internal(kleidi_factory, short_dir, fake_vault):
    proc = _kleidi(kleidi_factory, short_dir, fake_vault)
    seed = os.urandom(32)
    sealed = proc.encrypt(seed)
    assert proc.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations) == seed

    fake_vault.overrides["decrypt"] = {"data": {"plaintext": "%%% not base64 %%%"}}
    with pytest.raises(grpc.RpcError) as info:
        proc.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "unexpected answer from Vault: the decrypted plaintext is malformed"

    # The health probe makes the same round trip: Status must stop saying ok.
    wait_for(lambda: _healthz(proc) != "ok", 10, "Status to report the malformed answers")
    assert "malformed" in _healthz(proc)
    del fake_vault.overrides["decrypt"]
    wait_for(lambda: _healthz(proc) == "ok", 10, "Status to recover")
    assert proc.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations) == seed
    _no_traceback(proc)


@pytest.mark.parametrize("answer", [
    {"data": {"plaintext": base64.b64encode(b"x" * 4096).decode()}},  # far longer than any seed
    {"data": {"plaintext": ""}},
    {"data": {"plaintext": 12345}},
    {"data": {"plaintext": None}},
    {"data": "not an object"},
    b"not json at all",
    {"data": {"batch_results": "x"}},
], ids=["oversized", "empty", "number", "null", "data-not-object", "not-json", "junk-field"])
def test_every_malformed_decrypt_answer_is_unavailable(kleidi_factory, short_dir, fake_vault, answer):
    proc = _kleidi(kleidi_factory, short_dir, fake_vault)
    sealed = proc.encrypt(os.urandom(32))
    fake_vault.overrides["decrypt"] = answer
    with pytest.raises(grpc.RpcError) as info:
        proc.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    _no_traceback(proc)


@pytest.mark.parametrize("answer", [
    {"data": {"ciphertext": 7}},
    {"data": {"ciphertext": "vault:v1:" + "A" * 5000}},
    {"data": {"ciphertext": "vault:v1:\n\u0000"}},
    {"data": {}},
], ids=["number", "oversized", "control-characters", "missing"])
def test_every_malformed_encrypt_answer_is_unavailable(kleidi_factory, short_dir, fake_vault, answer):
    proc = _kleidi(kleidi_factory, short_dir, fake_vault)
    fake_vault.overrides["encrypt"] = answer
    with pytest.raises(grpc.RpcError) as info:
        proc.encrypt(os.urandom(32))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    _no_traceback(proc)


@pytest.mark.parametrize("data", [
    {"type": "aes256-gcm96", "latest_version": "one", "keys": {"1": CREATED}},
    {"type": "aes256-gcm96", "latest_version": 1, "keys": ["not", "a", "map"]},
    {"type": "aes256-gcm96", "latest_version": 1, "keys": {"v1": CREATED}},
    {"type": "aes256-gcm96", "latest_version": 2**40, "keys": {"1": CREATED}},
    {"type": ["x"], "latest_version": 1, "keys": {"1": CREATED}, "min_decryption_version": {"a": 1}},
], ids=["version-not-a-number", "keys-not-a-map", "key-version-not-a-number", "version-too-large", "wrong-types"])
def test_a_malformed_key_listing_turns_status_unhealthy_and_the_refresh_keeps_running(
        kleidi_factory, short_dir, fake_vault, data):
    proc = _kleidi(kleidi_factory, short_dir, fake_vault)
    first = proc.status().key_id
    fake_vault.overrides["keys"] = {"data": data}
    wait_for(lambda: _healthz(proc) != "ok", 10, "Status to report the malformed key listing")
    assert "malformed" in _healthz(proc) or "unexpected answer" in _healthz(proc), _healthz(proc)
    assert proc.status().key_id == first  # the last good keys still serve

    # The background refresh survived: a rotation made after the bad answers is still seen.
    del fake_vault.overrides["keys"]
    fake_vault.latest = 2
    second = proc.wait_for_key_id(lambda k: k != first)
    assert second.startswith("kleidi:vault:v2:")
    wait_for(lambda: _healthz(proc) == "ok", 10, "Status to recover")
    _no_traceback(proc)


def test_a_login_answer_without_a_usable_token_is_unavailable(kleidi_factory, short_dir, fake_vault):
    for name in ("role_id", "secret_id"):
        (short_dir / name).write_text(f"fake-{name}")
        (short_dir / name).chmod(0o600)
    auth = {"method": "approle", "role_id_file": str(short_dir / "role_id"),
            "secret_id_file": str(short_dir / "secret_id")}
    fake_vault.overrides["login"] = {"auth": {"client_token": {"nested": "object"}, "lease_duration": "soon"}}
    proc = _kleidi(kleidi_factory, short_dir, fake_vault, auth=auth, wait=False)
    wait_for(lambda: "serving KMS" in proc.log(), 20, "kleidi to start despite the bad login answer")
    wait_for(lambda: "no usable token" in _healthz(proc), 10, "Status to name the bad login answer")
    with pytest.raises(grpc.RpcError) as info:
        proc.encrypt(os.urandom(32))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    fake_vault.overrides.clear()
    wait_for(lambda: _healthz(proc) == "ok", 15, "kleidi to log in once the answers are sane")
    assert proc.encrypt(os.urandom(32)).key_id
    _no_traceback(proc)


def test_malformed_answers_at_start_up_neither_crash_kleidi_nor_leave_its_socket_behind(
        kleidi_factory, short_dir, fake_vault):
    fake_vault.overrides["keys"] = {"data": {"latest_version": "x", "keys": 3}}
    proc = _kleidi(kleidi_factory, short_dir, fake_vault, wait=False)
    wait_for(lambda: "serving KMS" in proc.log(), 20, "kleidi to start and report unhealthy")
    assert _healthz(proc) != "ok"
    assert proc.stop(signal.SIGTERM) == 0
    assert not proc.socket_path.exists()
    assert not [p for p in short_dir.iterdir() if p.name.startswith(".kleidi-") or p.name.startswith("kleidi-")]
    _no_traceback(proc)
