"""Foreign exceptions at every boundary of the request path: the answer, the health and the audit.

A foreign exception is one kleidi did not raise on purpose (a bug, or a library tripping over a
hostile input). Wherever it comes from — the backend, the audit writer, the metrics — the caller
gets a kleidi answer with a neutral message, the call is audited, Status and /readyz tell the truth
while calls fail, and kleidi recovers by itself once the fault is gone. The gate's boundary is
tested in tests/hostile/test_gate.py.

The server runs in this process (a real gRPC server on a real unix socket, on its own event loop in
a thread), so that a test can switch a fault on and off inside it; the backend is the real local
backend with a switch in front of each method.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kleidi import audit, telemetry
from kleidi._proto.kmsv2 import api_pb2 as v2_pb
from kleidi._proto.kmsv2 import api_pb2_grpc as v2_grpc
from kleidi.backends.base import KeySet, KeyVersion
from kleidi.backends.local import LocalBackend, LocalBackendSettings
from kleidi.config import load_settings
from kleidi.server import Server
from tests.conftest import keygen, wait_for
from tests.support import free_port

SECRET_LOOKING = "fault-text-that-must-not-leave-the-process"


class FaultyBackend(LocalBackend):
    """The local backend, with a foreign exception on demand in front of each method."""

    def __init__(self, settings: LocalBackendSettings) -> None:
        super().__init__(settings)
        self.faults: set[str] = set()

    def _maybe_fail(self, method: str) -> None:
        if method in self.faults:
            raise RuntimeError(SECRET_LOOKING)

    async def load_keys(self, force: bool = False) -> KeySet:
        self._maybe_fail("load_keys")
        return await super().load_keys(force)

    async def wrap(self, key: KeyVersion, plaintext: bytes, aad: bytes) -> bytes:
        self._maybe_fail("wrap")
        return await super().wrap(key, plaintext, aad)

    async def unwrap(self, key: KeyVersion, payload: bytes, aad: bytes) -> bytes:
        self._maybe_fail("unwrap")
        return await super().unwrap(key, payload, aad)


class InProcessKleidi:
    def __init__(self, workdir: Path, **audit_settings: Any) -> None:
        keyring = workdir / "keyring.json"
        keygen(keyring)
        self.port = free_port()
        self.audit_path = workdir / "audit.jsonl"
        self.endpoint = f"unix://{workdir / 'kleidi.sock'}"
        self.settings = load_settings(overrides={
            "server.endpoint": self.endpoint,
            "telemetry.address": f"127.0.0.1:{self.port}",
            "backend.keyring": str(keyring), "backend.refresh_interval": "100ms", "backend.probe_interval": "200ms",
            "audit.path": str(self.audit_path), "audit.fsync": "always",
            **{f"audit.{k}": v for k, v in audit_settings.items()},
        }, environ={})
        assert isinstance(self.settings.backend, LocalBackendSettings)
        self.backend = FaultyBackend(self.settings.backend)
        self.loop = asyncio.new_event_loop()
        self.server: Server | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for(lambda: self._status_ok(), 20, "the in-process kleidi to serve")
        self.channel = grpc.insecure_channel(self.endpoint, options=[("grpc.default_authority", "localhost")])
        self.stub = v2_grpc.KeyManagementServiceStub(self.channel)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.server = Server(self.settings, backend=self.backend)
            await self.server.run(install_signal_handlers=False)

        try:
            self.loop.run_until_complete(main())
        finally:
            # As asyncio.run would: else the loop and its transports are left for the garbage collector,
            # whose ResourceWarning then fails whichever later test it happens to run in.
            leftover = asyncio.all_tasks(self.loop)
            for task in leftover:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    def _status_ok(self) -> bool:
        try:
            with grpc.insecure_channel(self.endpoint, options=[("grpc.default_authority", "localhost")]) as ch:
                return v2_grpc.KeyManagementServiceStub(ch).Status(v2_pb.StatusRequest(), timeout=1).healthz == "ok"
        except grpc.RpcError:
            return False

    def healthz(self) -> str:
        return str(self.stub.Status(v2_pb.StatusRequest(), timeout=3).healthz)

    def readyz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def encrypt(self) -> v2_pb.EncryptResponse:
        return self.stub.Encrypt(v2_pb.EncryptRequest(plaintext=os.urandom(32), uid="boundary"), timeout=5)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def stop(self) -> None:
        self.channel.close()
        if self.server is not None:
            self.loop.call_soon_threadsafe(self.server.stop)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the in-process kleidi did not stop"


@pytest.fixture
def in_process(short_dir: Path, caplog: pytest.LogCaptureFixture) -> Iterator[InProcessKleidi]:
    caplog.set_level("DEBUG", logger="kleidi")
    kleidi = InProcessKleidi(short_dir)
    yield kleidi
    kleidi.stop()
    for record in caplog.records:  # a foreign exception's text never reaches a log line
        assert SECRET_LOOKING not in record.getMessage() and SECRET_LOOKING not in str(getattr(record, "fields", ""))
    assert SECRET_LOOKING not in kleidi.audit_path.read_text()


def _requests(method: str, code: str) -> float:
    return telemetry.REQUESTS.labels(method, code)._value.get()


@pytest.mark.parametrize("method, operation", [("Encrypt", "wrap"), ("Decrypt", "unwrap")])
def test_a_foreign_exception_in_the_backend_is_unavailable_audited_and_reported_by_health(
        in_process: InProcessKleidi, method: str, operation: str) -> None:
    sealed = in_process.encrypt()
    before = _requests(method, "UNAVAILABLE")
    in_process.backend.faults.add(operation)
    with pytest.raises(grpc.RpcError) as info:
        if method == "Encrypt":
            in_process.encrypt()
        else:
            in_process.stub.Decrypt(v2_pb.DecryptRequest(ciphertext=sealed.ciphertext, key_id=sealed.key_id,
                                                         annotations=sealed.annotations, uid="boundary"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == (f"the local backend failed unexpectedly during {operation} (RuntimeError); "
                                    "see the kleidi log")
    assert _requests(method, "UNAVAILABLE") == before + 1
    assert in_process.records()[-1]["event"] == method and in_process.records()[-1]["outcome"] == "UNAVAILABLE"

    # The probe makes the same round trip: health says so while the fault lasts, then recovers.
    wait_for(lambda: in_process.healthz() != "ok", 10, "Status to turn unhealthy")
    assert "failed unexpectedly" in in_process.healthz()
    assert in_process.readyz()[0] == 503
    in_process.backend.faults.clear()
    wait_for(lambda: in_process.healthz() == "ok", 10, "Status to recover")
    assert in_process.readyz()[0] == 200
    assert in_process.encrypt().key_id


def test_a_foreign_exception_while_loading_keys_keeps_the_refresh_running(in_process: InProcessKleidi) -> None:
    in_process.backend.faults.add("load_keys")
    wait_for(lambda: in_process.healthz() != "ok", 10, "Status to turn unhealthy")
    assert "failed unexpectedly during load_keys" in in_process.healthz()
    assert in_process.encrypt().key_id  # the last good keys still serve
    in_process.backend.faults.clear()
    wait_for(lambda: in_process.healthz() == "ok", 10, "the refresh loop to recover by itself")


def test_a_foreign_exception_in_the_metrics_does_not_change_the_answer(in_process: InProcessKleidi,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*labels: str) -> Any:
        raise RuntimeError(SECRET_LOOKING)

    monkeypatch.setattr(telemetry.REQUESTS, "labels", broken)
    assert in_process.encrypt().key_id  # served, and audited
    assert in_process.records()[-1]["event"] == "Encrypt" and in_process.records()[-1]["outcome"] == "OK"
    monkeypatch.undo()
    assert in_process.healthz() == "ok"



def test_a_foreign_exception_in_the_audit_writer_refuses_calls_and_health_says_so(
        in_process: InProcessKleidi, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: audit.AuditLog, body: dict[str, Any]) -> None:
        raise RuntimeError(SECRET_LOOKING)

    monkeypatch.setattr(audit.AuditLog, "_append_locked", broken)
    with pytest.raises(grpc.RpcError) as info:
        in_process.encrypt()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # fail_closed, the default: no unrecorded answer
    assert info.value.details() == ("audit log cannot be written: internal error (RuntimeError); calls are refused "
                                    "until it can (audit.on_failure: fail_closed)")
    assert in_process.healthz().startswith("audit log cannot be written: internal error (RuntimeError)")
    assert in_process.readyz()[0] == 503
    monkeypatch.undo()
    wait_for(lambda: in_process.healthz() == "ok", 10, "the audit log to recover by itself")
    assert in_process.encrypt().key_id
    gap = next(r for r in in_process.records() if r["event"] == "audit_gap")
    assert gap["lost_by_event"] == {"Encrypt": 1} and gap["reason"] == "internal error (RuntimeError)"
