"""Status never calls the backend: it is answered from state the KeyManager keeps fresh.

The server runs in-process with a LocalBackend subclass that counts backend calls, so that the test
can see every call the service makes. The socket and the gRPC client are real.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from kleidi._proto.kmsv2 import api_pb2 as pb
from kleidi._proto.kmsv2 import api_pb2_grpc
from kleidi.backends.base import KeySet, KeyVersion
from kleidi.backends.local import LocalBackend, create_keyring
from kleidi.config import load_settings
from kleidi.server import Server
from tests.support import free_port


class CountingBackend(LocalBackend):
    calls: Counter[str]

    async def load_keys(self, force: bool = False) -> KeySet:
        self.calls["load_keys"] += 1
        return await super().load_keys(force)

    async def wrap(self, key: KeyVersion, plaintext: bytes, aad: bytes) -> bytes:
        self.calls["wrap"] += 1
        return await super().wrap(key, plaintext, aad)

    async def unwrap(self, key: KeyVersion, payload: bytes, aad: bytes) -> bytes:
        self.calls["unwrap"] += 1
        return await super().unwrap(key, payload, aad)


def test_status_makes_no_backend_call(short_dir: Path) -> None:
    keyring = short_dir / "keyring.json"
    create_keyring(keyring)
    settings = load_settings(overrides={"server.endpoint": f"unix://{short_dir}/k.sock",
                                        "backend.keyring": str(keyring),
                                        "backend.refresh_interval": "1h", "backend.probe_interval": "1h",
                                        "telemetry.address": f"127.0.0.1:{free_port()}"},
                             environ={})
    backend = CountingBackend(settings.backend)
    backend.calls = Counter()
    server = Server(settings, backend=backend)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.run(install_signal_handlers=False),))
    thread.start()
    try:
        channel = grpc.insecure_channel(f"unix://{short_dir}/k.sock")
        stub: Any = api_pb2_grpc.KeyManagementServiceStub(channel)
        deadline = time.monotonic() + 10
        while True:
            try:
                if stub.Status(pb.StatusRequest(), timeout=1).healthz == "ok":
                    break
            except grpc.RpcError:
                if time.monotonic() > deadline or not thread.is_alive():
                    raise
            time.sleep(0.05)
        before = Counter(backend.calls)
        for _ in range(500):
            assert stub.Status(pb.StatusRequest(), timeout=3).healthz == "ok"
        assert backend.calls == before, "Status called the backend"
        response = stub.Encrypt(pb.EncryptRequest(plaintext=b"s" * 32, uid="u"), timeout=3)
        assert backend.calls["wrap"] == before["wrap"] + 1  # the counter does see real calls
        assert response.key_id
        channel.close()
    finally:
        loop.call_soon_threadsafe(server.stop)
        thread.join(30)
    assert not thread.is_alive()
    loop.close()
